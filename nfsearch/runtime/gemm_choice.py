"""The GEMM kernel of each bucket, chosen by timing the bucket's own row count at start-up.

The engine's graphs run every GEMM of a bucket at exactly the bucket's rows (runtime/paged_model.py),
and cuBLAS picks its kernel per shape by heuristics that are sometimes far off: in E1's record on an
H100 (docs/results.md section 0) the 448-row bucket's GEMMs took 15.4 ms per iteration against 17.8 ms
for the 896-row bucket, one cuBLAS kernel taking as long at 448 rows as the 896 bucket's at 896. The
bundled profile's GEMM rows are at 384 and 512; `profile --family` adds each bucket's own). So before
the graphs are captured, each (bucket rows, GEMM) is timed with each candidate impl on the layer's own
weights, alone on the whole GPU under a CUDA graph, and a candidate replaces cuBLAS only where it is at
least MIN_GAIN faster. A candidate that raises here is left out.

Only the default engine chooses (one GPU, bf16 GEMMs, no plan family): a family's plans name their
kernels, FP8 GEMMs have one impl, and `--compare`'s baseline keeps cuBLAS by definition.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from functools import partial

from nfsearch.runtime.fp8 import GEMM_WEIGHTS
from nfsearch.runtime.kernels import IMPLS
from nfsearch.runtime.paged_model import FP8_GEMM_OPS

WEIGHTS = dict(zip(FP8_GEMM_OPS, GEMM_WEIGHTS))      # GEMM op -> its LayerWeights field
CANDIDATES = ("tma",)              # beside "torch" (cuBLAS), the engine's own
MIN_GAIN = 0.05                    # a candidate must be this much faster than cuBLAS to replace it
NUM_REPLAYS = 20
HAS_RESIDUAL = {"kqv": False, "o": True, "ug": False, "d": True}


@dataclass(frozen=True)
class GemmChoice:
    num_rows: int
    op: str
    times_ms: dict[str, float]       # impl -> median ms of one call (CUDA events over graph replays)
    impl: str                        # the chosen one

    def to_dict(self) -> dict:
        return asdict(self)


def choose(times_ms: dict[str, float], min_gain: float = MIN_GAIN) -> str:
    """cuBLAS ("torch") unless a candidate is at least min_gain faster (the fastest such)."""
    base = times_ms["torch"]
    faster = {impl: ms for impl, ms in times_ms.items() if impl != "torch" and ms <= base * (1 - min_gain)}
    return min(faster, key=faster.get) if faster else "torch"


def gemm_shapes(layer) -> dict[str, tuple[int, int]]:
    """(K, N) of each GEMM of a layer's weights (runtime/weights.LayerWeights: w is [K, N]) that may
    choose: the QKV GEMM of a model with a QKV bias keeps cuBLAS (the candidates add [M, N] residuals,
    not a bias vector)."""
    shapes = {op: tuple(getattr(layer, name).shape) for op, name in WEIGHTS.items()}
    if getattr(layer, "bqkv", None) is not None:
        del shapes["kqv"]
    return shapes


def _replay_ms(torch, stream, calls) -> float:
    """Median ms of one call inside a CUDA graph of `calls` (one after another, each once) captured on
    `stream`, over 3 replays (one stream for every timing: the TMA GEMM keeps a workspace per stream)."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls[0]()                                # compile / heuristics outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def measure(torch, layers, row_counts, num_sms: int, candidates=CANDIDATES, log=None) -> list[GemmChoice]:
    """Each GEMM at each row count with cuBLAS and each candidate that runs here; the choice of each.
    The NUM_REPLAYS calls of a timing read the layers' weights in turn, as the engine's layers do: one
    weight replayed would sit in L2 (an 8B model's O and QKV weights fit in an H100's 50 MiB)."""
    say = log or (lambda line: None)
    stream, out = torch.cuda.Stream(), []
    try:
        for op, (k, n) in gemm_shapes(layers[0]).items():
            weights = [getattr(layer, WEIGHTS[op]) for layer in layers]
            w0 = weights[0]
            for rows in sorted(set(row_counts)):
                a = torch.randn(rows, k, device=w0.device, dtype=w0.dtype)
                c = torch.empty(rows, n, device=w0.device, dtype=w0.dtype)
                r = torch.randn(rows, n, device=w0.device, dtype=w0.dtype) if HAS_RESIDUAL[op] else None
                times = {}
                for impl in ("torch", *candidates):
                    fn = IMPLS[op][impl]
                    calls = [partial(fn, a, weights[i % len(weights)], c, num_sms, residual=r)
                             for i in range(NUM_REPLAYS)]
                    try:
                        times[impl] = _replay_ms(torch, stream, calls)
                    except Exception as exc:  # a kernel that cannot run here is left out
                        if impl == "torch":
                            raise
                        say(f"gemm choice: {op} {impl} at {rows} rows left out ({type(exc).__name__}: "
                            f"{str(exc)[:80]})")
                out.append(GemmChoice(rows, op, times, choose(times)))
    finally:
        torch.cuda.empty_cache()    # the inputs and the timing graphs' pools go back before the engine's capture
    return out


def apply(engine, choices: list[GemmChoice]) -> dict:
    """Give each bucket whose rows chose a kernel other than cuBLAS a model with those kernels (before
    capture); returns the report's block."""
    from nfsearch.runtime.engine import PLAN_OPS
    by_rows: dict[int, dict[str, str]] = {}
    for c in choices:
        if c.impl != "torch":
            by_rows.setdefault(c.num_rows, {})[c.op] = c.impl
    model = engine.runner.models["plan"]
    for bucket in engine.buckets:
        impls = by_rows.get(bucket.max_tokens)
        if impls:
            engine.runner.bucket_models[("plan", bucket)] = model.with_ops(PLAN_OPS | impls)
    for rows, impls in sorted(by_rows.items()):
        engine.log(f"gemm choice: {rows}-row buckets run " + ", ".join(f"{op} {impl}" for op, impl in impls.items())
                   + f" (faster than cuBLAS at that shape by >= {MIN_GAIN:.0%})")
    return {"min_gain": MIN_GAIN, "candidates": list(CANDIDATES), "choices": [c.to_dict() for c in choices]}
