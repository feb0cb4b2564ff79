"""An overlapped bucket in the engine's CUDA graphs (issue 25): a family of two buckets, the larger split
into 2 nano-batches on 3 streams, captured and replayed over a small trace, gives the tokens of the
same family run sequentially (greedy, same seed); prints each bucket's mean iteration time both ways."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from conftest import ENGINE_TINY as TINY

from nfsearch.family import artifact
from nfsearch.runtime.engine import Engine, TraceShape
from nfsearch.runtime.engine_overlap import OverlappedModel
from nfsearch.serving.traces import load_trace

TRACE = "const:8:8"          # 16-token requests: two buckets (16 and 32 tokens, one context)
NUM_REQUESTS = 24


FIXTURES = Path(__file__).parent.parent / "fixtures" / "engine-tiny"
# made on the CPU (the device may lack ortools, which the search imports): solve_family(TRACE, TINY,
# dense_batch=32, num_requests=24, num_pages=256), and the same with the 32-token bucket's plan replaced
# by tests.test_engine_overlap.split_plan of its workload (tests/test_engine_overlap.py checks both)
SEQ_FAMILY, SPLIT_FAMILY = FIXTURES / "two-buckets.family.json", FIXTURES / "two-buckets-split.family.json"


@pytest.fixture(scope="module")
def families():
    top = max(artifact.read(SPLIT_FAMILY).buckets, key=lambda b: b.bucket)
    return SEQ_FAMILY, SPLIT_FAMILY, top.bucket


def _run(path, reqs):
    engine = Engine(TINY, device="cuda", dtype="fp32", gpu_memory_utilization=0.25,
                    trace_shape=TraceShape.of(reqs), plans=str(path), seed=0)
    run = engine.run(reqs)
    times = {b: [it.time_ms for it in run.iterations if it.bucket == k] for k, b in enumerate(engine.buckets)}
    return engine, run, times


def test_an_overlapped_bucket_in_cuda_graphs_gives_the_sequential_tokens(families):
    seq_path, split_path, top = families
    reqs = load_trace(TRACE, NUM_REQUESTS).requests
    engine, run, times = _run(split_path, reqs)
    assert engine.use_cuda_graphs and isinstance(engine.runner.model_for("plan", top), OverlappedModel)
    assert any(key[1] == top for key in engine.runner.graphs)
    assert len(engine.runner.model_for("plan", top).program.streams) == 3
    assert engine.runner.num_eager_launches == 0
    _, seq_run, seq_times = _run(seq_path, reqs)
    assert [s.output_ids for s in run.sequences] == [s.output_ids for s in seq_run.sequences]
    assert times[top], "no iteration ran the overlapped bucket"
    for b in engine.buckets:
        name = f"{b.max_tokens}/{b.max_decode}/{b.max_segments}/{b.max_context}"
        over, seq = times[b], seq_times[b]
        print(f"bucket {name}{' (overlapped)' if b == top else ''}: {len(over)} iterations, median "
              f"{statistics.median(over) if over else float('nan'):.3f} ms vs sequential "
              f"{statistics.median(seq) if seq else float('nan'):.3f} ms ({len(seq)} iterations)")
