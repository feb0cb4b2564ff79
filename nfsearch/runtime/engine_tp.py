"""The engine across tensor-parallel ranks: one process per device, each running the whole loop.

Tensor parallelism is a transformation of the plain model. Each rank keeps its shard of the weights
(Megatron-style): wqkv column-parallel by its query heads and the KV heads they read, wo row-parallel
over the same heads, wug column-parallel by its slice of gate and of up, wd row-parallel over that
slice; norms, embedding and LM head replicated. Its PagedModel is the plain one built on the shard's
shapes (num_heads / tp, num_kv_heads / tp, intermediate_size / tp), so its paged KV cache holds its KV
heads only. The O and D GEMMs then give partial sums: each is all-reduced (torch.distributed) and the
residual added once, after the reduction. Everything after the last layer is replicated.

The loop is Engine.run on every rank: the scheduler is deterministic and sees the same trace and the
same sampled ids, so every rank forms the same batches and no per-iteration metadata crosses ranks.
The ids are the same on every rank by construction (same logits after the all-reduces, which hand
every rank the same bits), but a scheduler that saw different ids would desynchronise the ranks'
collectives, so each forward also broadcasts rank 0's sampled ids: a few hundred bytes on the
device, in stream order (no host sync; capturable), against an iteration of milliseconds.
`is_debug` checks before that broadcast that every rank sampled the same ids (the tests use it).

Arrival times would be read from each rank's own clock, which would split the schedulers: the TP
engine refuses a trace with arrivals after t=0 (every named and const trace starts at 0).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from nfsearch.errors import NfsearchError
from nfsearch.graph import TpShard, tp_shard
from nfsearch.runtime.engine import VARIANT_OPS, Engine, EngineRun
from nfsearch.runtime.model import LayerWeights
from nfsearch.runtime.paged_model import PagedModel
from nfsearch.runtime.weights import ModelWeights, load_weights
from nfsearch.serving.model_config import ModelConfig
from nfsearch.serving.traces import Request


def check_tp(cfg: ModelConfig, tp_degree: int) -> TpShard:
    """One rank's shapes; NfsearchError (one line) unless the TP degree divides the heads, KV heads
    and FFN width (the per-layer search's rule, graph.tp_shard)."""
    return tp_shard(cfg.spec, tp_degree)


def shard_config(cfg: ModelConfig, tp_degree: int) -> ModelConfig:
    """The config of one rank's shard: heads, KV heads and FFN width divided by the TP degree."""
    shard = check_tp(cfg, tp_degree)
    spec = dataclasses.replace(cfg.spec, num_heads=shard.num_heads, num_kv_heads=shard.num_kv_heads,
                               intermediate_size=shard.intermediate_size)
    return dataclasses.replace(cfg, spec=spec)


def _cols(t: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """The columns (last dim) in `spans` ([start, stop) each), concatenated, as a new tensor."""
    return torch.cat([t[..., a:b] for a, b in spans], dim=-1).contiguous()


def shard_layer(cfg: ModelConfig, w: LayerWeights, rank: int, tp_degree: int) -> LayerWeights:
    """This rank's shard of a layer, in tensors of its own (no view keeps the full layer alive)."""
    m = cfg.spec
    D, Q, KV, I = m.head_dim, m.q_size, m.kv_size, m.intermediate_size
    q = (rank * Q // tp_degree, (rank + 1) * Q // tp_degree)            # this rank's query heads
    kv = (rank * KV // tp_degree, (rank + 1) * KV // tp_degree)         # and the KV heads they read
    assert (q[1] - q[0]) % D == 0 and (kv[1] - kv[0]) % D == 0
    qkv_spans = [q, (Q + kv[0], Q + kv[1]), (Q + KV + kv[0], Q + KV + kv[1])]
    f = (rank * I // tp_degree, (rank + 1) * I // tp_degree)            # its slice of gate and of up
    return LayerWeights(norm1=w.norm1, wqkv=_cols(w.wqkv, qkv_spans),
                        bqkv=None if w.bqkv is None else _cols(w.bqkv, qkv_spans),
                        wo=w.wo[q[0]:q[1]].clone(), norm2=w.norm2,
                        wug=_cols(w.wug, [f, (I + f[0], I + f[1])]), wd=w.wd[f[0]:f[1]].clone())


class TpPagedModel(PagedModel):
    """A rank's PagedModel over its shard (built with shard_config's config): O and D all-reduced
    before their residual, rank 0's sampled ids broadcast."""

    def __init__(self, *args, group=None, is_debug: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.group, self.is_debug = group, is_debug
        self.num_id_mismatches = 0           # is_debug: forwards whose pre-broadcast ids differed
        self.ops = self.ops | {op: self._reduced(self.ops[op]) for op in ("o", "d")}

    def _reduced(self, gemm):
        group = self.group

        def op(a, w, out, num_sms, residual=None):
            gemm(a, w, out, num_sms)                     # out = partial sum over this rank's heads / FFN slice
            dist.all_reduce(out, group=group)
            if residual is not None:
                out.add_(residual)                       # once, after the reduction
        return op

    def forward(self, step):
        ids = super().forward(step)
        if self.is_debug and not (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            ranks = [torch.empty_like(ids) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(ranks, ids, group=self.group)
            self.num_id_mismatches += any(not torch.equal(r, ranks[0]) for r in ranks)
        dist.broadcast(ids, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return ids


class TpEngine(Engine):
    """Engine on one TP rank (runtime.tp.TpRank): the same arguments as Engine, device = the rank's."""

    def __init__(self, model, tp, *, is_debug: bool = False, **kwargs):
        if kwargs.get("max_tpot_ms") is not None:
            # the cap's token budget follows each rank's own iteration times: the schedulers would split
            raise NfsearchError("a TPOT cap (max_tpot_ms) is not supported with tensor parallelism")
        self.tp, self.is_debug = tp, is_debug
        kwargs["device"] = str(tp.device)
        super().__init__(model, **kwargs)

    # Engine sizes memory (weights, KV bytes per token), the model and its cache from self.cfg: for a
    # rank that is its shard's config (vocabulary, context, EOS and layer count are the model's).
    @property
    def cfg(self) -> ModelConfig:
        return self._shard_cfg

    @cfg.setter
    def cfg(self, full: ModelConfig) -> None:
        self._shard_cfg = shard_config(full, self.tp.world_size)    # refused before anything is read
        self.full_cfg = full

    # Each rank sizes the batch and the cache against its own device's free memory; ranks whose
    # schedulers got different limits would desynchronise their collectives, so all take the smallest.
    def _choose_batch(self, dense_batch, max_decode, num_pages, memory_bytes, is_fp8_gemms=False) -> None:
        choose = super()._choose_batch
        self._on_every_rank(lambda: choose(dense_batch, max_decode, num_pages, memory_bytes, is_fp8_gemms))
        mine = [self.dense_batch, self.max_decode, self.num_pages]
        agreed = self._agree_min(mine)
        if agreed != mine:
            choose(agreed[0], agreed[1], agreed[2], memory_bytes, is_fp8_gemms)

    def _dry_run(self, num_pages: int | None) -> float:
        seconds = self._on_every_rank(lambda: super(TpEngine, self)._dry_run(num_pages))
        self.num_pages = self._agree_min([self.num_pages])[0]
        return seconds

    def _agree_min(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return [int(v) for v in t.tolist()]

    def _on_every_rank(self, fn):
        """fn(), refused on every rank when it is refused on one (the others would wait on it)."""
        try:
            result, error = fn(), None
        except NfsearchError as exc:
            result, error = None, exc
        is_refused_elsewhere = self._agree_min([0 if error else 1])[0] == 0
        if error is not None:
            raise error
        if is_refused_elsewhere:
            raise NfsearchError("another TP rank refused its start-up (its message is in its output)")
        return result

    def _load_weights(self, seed: int) -> ModelWeights:
        # every rank reads (or draws from the seed) the same full layers, keeping its shard of each
        # as it is made: the peak is the shards plus one full layer
        cfg, rank, world = self.full_cfg, self.tp.rank, self.tp.world_size
        return load_weights(cfg, self.folder, self.device, self.dtype, seed,
                            layer_fn=lambda i, w: shard_layer(cfg, w, rank, world))

    def _new_model(self, num_pages: int) -> PagedModel:
        return TpPagedModel(self.cfg, self.weights, num_pages, self.page_size,
                            self.device, self.dtype, self.attn_impl,
                            max_tokens=max(b.max_tokens for b in self.buckets), max_logit_rows=self.max_logit_rows,
                            op_impls=self._op_impls(), is_debug=self.is_debug, kv_dtype=self.kv_dtype)

    def describe(self) -> str:
        full, mine = self.full_cfg.spec, self.cfg.spec
        return (f"tensor parallel: {self.tp.world_size} ranks, each {mine.num_heads} of {full.num_heads} heads, "
                f"{mine.num_kv_heads} of {full.num_kv_heads} KV heads, FFN {mine.intermediate_size} of "
                f"{full.intermediate_size}; KV cache and memory below are one rank's\n" + super().describe())

    def _op_impls(self):
        return VARIANT_OPS["plan"] if self.is_cuda else None

    def _variant(self, name: str) -> PagedModel:
        """Engine's variant (other dense kernels, same weights and cache) with its O and D reduced too."""
        twin = super()._variant(name)
        if twin is not self.model:
            twin.ops = twin.ops | {op: twin._reduced(twin.ops[op]) for op in ("o", "d")}
        return twin

    def run(self, requests: list[Request], **kwargs) -> EngineRun:
        late = [r.request_id for r in requests if r.arrival_s > 0]
        if late:
            raise NfsearchError(f"the TP engine serves traces whose requests all arrive at t=0 "
                                f"({len(late)} arrive later, e.g. request {late[0]})")
        return super().run(requests, **kwargs)


def teacher_forced_logits(engine: Engine, num_forwards: int = 2) -> list[torch.Tensor]:
    """Logits [logit rows, vocab] of `num_forwards` forwards of the smallest bucket's full dry batch
    (decode rows at its longest context and prefill chunks, input ids fixed, not sampled): the
    second forward reads the K/V the first wrote. The same on every rank and on a one-process engine."""
    from nfsearch.runtime.engine_runner import dry_fields
    from nfsearch.runtime.step_inputs import make_step_inputs
    bucket = min(engine.buckets)
    step = make_step_inputs(bucket, engine.page_size, engine.device, **dry_fields(bucket, engine.page_size))
    return [engine.model.logits(step).cpu() for _ in range(num_forwards)]


def rank_main(tp, model, engine_kwargs: dict, requests: list[Request], sampling: dict | None,
              out_pattern: str, with_probe: bool = False, rank_overrides: dict | None = None) -> None:
    """One rank (runtime.tp.spawn_ranks target): a TpEngine serving `requests`; writes what it saw
    to out_pattern.format(rank=...) (torch.save): tokens per request, the limits it ran with,
    counters, and with_probe the teacher-forced logits (before the run) and its KV cache shard.
    rank_overrides: {rank: engine kwargs} that differ on that rank (as free memory may)."""
    torch.set_num_threads(1)            # tiny CPU models: threads of two ranks fight over the cores
    engine = TpEngine(model, tp, **engine_kwargs | (rank_overrides or {}).get(tp.rank, {}))
    out = {"rank": tp.rank, "limits": (engine.dense_batch, engine.max_decode, engine.num_pages)}
    if with_probe:
        out["logits"] = teacher_forced_logits(engine)
        out["kv"] = engine.model.kv.cpu().clone()
    run = engine.run(requests, sampling=sampling)
    out.update(tokens={s.seq_id: list(s.output_ids) for s in run.sequences},
               num_iterations=len(run.iterations), num_preemptions=run.num_preemptions,
               num_id_mismatches=engine.model.num_id_mismatches)
    torch.save(out, out_pattern.format(rank=tp.rank))


# ------------------------------------------------------------------------------------ nfsearch bench --tp
def _bench_rank(tp, opts, out_path: str) -> None:
    from nfsearch.runtime.bench_engine import run_bench
    if tp.device.type == "cpu":                       # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp.world_size))
    report = run_bench(opts, echo=print if tp.is_first else (lambda line: None), progress=tp.is_first,
                       make_engine=lambda model, **kw: TpEngine(model, tp, **kw))
    if tp.is_first:
        torch.save(report, out_path)


def run_bench_tp(opts, tp_degree: int) -> dict:
    """`nfsearch bench --tp N`: N ranks on this host (NCCL, one GPU each; gloo on the CPU), each serving
    the trace through its TpEngine; rank 0's report (tokens/s per GPU over the N GPUs)."""
    import dataclasses as dc
    import tempfile
    from pathlib import Path

    from nfsearch.runtime.tp import spawn_ranks
    from nfsearch.serving.model_config import load_model_config
    check_tp(load_model_config(opts.model), tp_degree)           # refused before any process starts
    backend = "gloo" if opts.device == "cpu" else "nccl"
    if backend == "nccl" and torch.cuda.device_count() < tp_degree:
        raise NfsearchError(f"--tp {tp_degree} needs {tp_degree} GPUs on this host; "
                            f"{torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory() as folder:
        out_path = str(Path(folder) / "report.pt")
        spawn_ranks(_bench_rank, tp_degree, backend, (dc.replace(opts, tp_degree=tp_degree), out_path))
        return torch.load(out_path)
