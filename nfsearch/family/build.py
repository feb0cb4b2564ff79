"""`nfsearch solve --family`: one plan per engine bucket for a trace, solved side by side.

trace -> the engine's dense batch and buckets (family.engine_shape) -> the scheduler's batches per
bucket (family.collect) -> per bucket its mean batch -> Workload.from_batch_shape -> search.solve
(the bundled profile unless one is named) -> each dense op run whole named with the impl fastest at
the bucket's rows, which the engine's graph runs it at (whole_ops_at_rows) -> simulate.verify and
the bucket's prediction
(family.predict; attention priced by the engine's paged kernels where the profile has them measured,
family.attention) -> one Family. A bucket no iteration landed in still gets a plan (the engine captures
a graph for every bucket): for the batch of the nearest bucket with hits, fitted to its limits, marked
nominal; it carries no weight in the trace's prediction.

Buckets are solved in worker processes (forked; each solve single-threaded and deterministic, so the
plans do not depend on the number of workers), largest batch first.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from nfsearch.cost import bundled_profile_path, make_problem
from nfsearch.errors import NfsearchError
from nfsearch.family.artifact import BucketPlan, Family
from nfsearch.family.attention import engine_view, pricing
from nfsearch.family.collect import Composition, composition, run_scheduler
from nfsearch.family.engine_shape import DEFAULT_UTILIZATION, OTHER_BYTES, engine_shape
from nfsearch.family.predict import BucketPrediction, predict_bucket, predict_trace
from nfsearch.plan import Schedule
from nfsearch.profile import ProfileTable, gpu_from_profile, load
from nfsearch.roofline import analytic_profile
from nfsearch.runtime.engine_memory import TraceShape
from nfsearch.runtime.engine_plans import DENSE_OPS  # the ops whose kernels a bucket's plan names
from nfsearch.serving.batch import Bucket
from nfsearch.serving.model_config import load_model_config
from nfsearch.serving.traces import load_trace
from nfsearch.simulate import verify
from nfsearch.specs import ModelSpec, Workload, load_gpu

DEFAULT_NUM_REQUESTS = 2000      # docs/workloads.md: E1-E4 are at least 2,000 requests


@dataclass(frozen=True)
class BucketTask:
    index: int
    bucket: Bucket
    composition: Composition
    model: ModelSpec
    profile_path: str | None         # None: the analytic profile of the bundled H100
    time_limit_s: float
    seed: int
    chunk: int
    min_gain: float
    kv_cache_dtype: str = "auto"     # the engine's: which paged attention rows price it (family.attention)

    def workload(self) -> Workload:
        c, b = self.composition, self.bucket
        name = f"bucket {b.max_tokens}/{b.max_decode}/{b.max_segments}/{b.max_context}"
        return Workload.from_batch_shape(c.decode_contexts, c.chunk_lens, c.prefix_lens, name=name,
                                         model=self.model.name)


@dataclass(frozen=True)
class BucketResult:
    index: int
    plan: Schedule
    prediction: BucketPrediction
    source: str                      # the search's note on which candidate it wrote
    solve_s: float


_PROFILES: dict = {}


def _profile(path: str | None, model: ModelSpec, workload: Workload, kv_cache_dtype: str = "auto") -> ProfileTable:
    """The profile the buckets are priced with: the file's engine view for this KV cache (its paged
    attention rows where it has them, family.attention), else the analytic profile of the bundled H100."""
    if path is None:
        return analytic_profile(model, workload, load_gpu("h100-sxm"))
    if (path, kv_cache_dtype) not in _PROFILES:
        _PROFILES[(path, kv_cache_dtype)] = engine_view(load(path), kv_cache_dtype)
    return _PROFILES[(path, kv_cache_dtype)]


def solve_bucket(task: BucketTask, num_layers: int = 2) -> BucketResult:
    """Search the bucket's plan, verify it and predict its iteration."""
    from nfsearch import search
    began = time.perf_counter()
    workload = task.workload()
    problem = make_problem(task.model, workload, _profile(task.profile_path, task.model, workload, task.kv_cache_dtype),
                           num_layers)
    plan, notes = search.solve(problem, time_limit_s=task.time_limit_s, threads=1, seed=task.seed,
                               chunk=task.chunk, min_gain=task.min_gain)
    plan = whole_ops_at_rows(plan, problem, task.bucket.max_tokens)
    verify(plan)
    source = next((n[len("plan: "):].split(", replay")[0] for n in reversed(notes) if n.startswith("plan: ")), "")
    prediction = predict_bucket(problem, plan, task.bucket)
    return BucketResult(task.index, plan, prediction, source, time.perf_counter() - began)


def whole_ops_at_rows(plan: Schedule, problem, num_rows: int) -> Schedule:
    """The plan with each dense op it runs whole (never split) naming the impl fastest at the bucket's
    `num_rows` on its SM count: the engine's graph runs it over all of the bucket's rows, not only the
    batch's tokens the search chose the impl at (family.predict prices those rows by the same lookup)."""
    from dataclasses import replace
    tokens = problem.workload.num_tokens
    if num_rows <= tokens:
        return plan
    by_op: dict[str, list] = {}
    for o in plan.nano_ops:
        by_op.setdefault(o.op, []).append(o)
    chosen = {op: problem.cost.impl(op, num_rows, ops[0].sm_count) for op, ops in by_op.items()
              if op in DENSE_OPS and len({o.sm_count for o in ops}) == 1
              and all(o.num_tokens == tokens for o in ops)}
    if not any(o.impl != chosen[o.op] for o in plan.nano_ops if o.op in chosen):
        return plan
    return replace(plan, nano_ops=tuple(replace(o, impl=chosen.get(o.op, o.impl)) for o in plan.nano_ops))


def nominal_composition(bucket: Bucket, found: dict[Bucket, Composition]) -> Composition:
    """The batch of the bucket with hits nearest in tokens (then context), fitted to `bucket`'s limits."""
    near = min(found, key=lambda b: (abs(b.max_tokens - bucket.max_tokens), abs(b.max_context - bucket.max_context)))
    c, cap = found[near], bucket.max_context
    contexts = [min(x, cap) for x in c.decode_contexts[:bucket.max_decode]]
    room = bucket.max_tokens - len(contexts)
    chunks, prefixes = [], []
    for n, p in list(zip(c.chunk_lens, c.prefix_lens))[:bucket.max_segments]:
        n = min(n, room, cap)
        if n < 1:
            break
        chunks.append(n)
        prefixes.append(min(p, cap - n))
        room -= n
    if not contexts and not chunks:
        contexts = [cap]
    rows = min(c.num_logit_rows, len(contexts) + len(chunks)) or 1
    return Composition(tuple(contexts), tuple(chunks), tuple(prefixes), rows)


def solve_family(trace_spec: str, model_ref: str, *, dense_batch: int | None = None,
                 num_requests: int | None = DEFAULT_NUM_REQUESTS, seed: int = 0, profile_path: str | None = None,
                 time_limit_s: float = 8.0, num_workers: int | None = None, chunk: int = 128,
                 min_gain: float = 0.04, num_pages: int | None = None, kv_cache_dtype: str = "auto",
                 progress=None) -> Family:
    """num_pages: the KV cache in pages instead of what the profile's GPU memory leaves (as Engine's);
    kv_cache_dtype: the engine's ("auto": bf16 like the model; "fp8": more pages, so other buckets)."""
    say = progress or (lambda line: None)
    began = time.perf_counter()
    cfg = load_model_config(model_ref)
    trace = load_trace(trace_spec, num_requests, seed, max_context=cfg.max_model_len)
    requests = [r for r in trace.requests if r.prompt_len + r.output_len <= cfg.max_model_len]
    if not requests:
        raise NfsearchError(f"trace {trace.name}: no request fits the model's context {cfg.max_model_len}")
    path = _profile_path(profile_path, cfg.spec)
    gpu = gpu_from_profile(load(path)) if path else load_gpu("h100-sxm")
    if not gpu.memory_bytes:
        raise NfsearchError(f"the profile's GPU {gpu.name} states no memory size: the engine's batch cannot be sized")
    shape = engine_shape(cfg, TraceShape.of(requests), gpu.memory_bytes, kv_cache_dtype=kv_cache_dtype,
                         dense_batch=dense_batch, num_pages=num_pages)
    run = run_scheduler(requests, shape, cfg.max_model_len)
    say(f"trace {trace.name}: {len(requests)} requests; engine: dense batch {shape.dense_batch}, {shape.max_decode} "
        f"decode rows, {len(shape.buckets)} buckets, KV {shape.num_pages * shape.page_size:,} tokens; scheduler: "
        f"{run.num_iterations} iterations ({time.perf_counter() - began:.1f} s)")
    found = {b: c for b in shape.buckets if (c := composition(run.hits[b], b)) is not None}
    if not found:
        raise NfsearchError(f"trace {trace.name}: the scheduler formed no batch ({run.num_refused} refused: "
                            f"{'; '.join(run.refusals)})")
    tasks = [BucketTask(k, b, found.get(b) or nominal_composition(b, found), cfg.spec, path, time_limit_s, seed,
                        chunk, min_gain, kv_cache_dtype) for k, b in enumerate(shape.buckets)]
    workers = max(1, min(len(tasks), num_workers or _num_cpus()))
    results = _solve_all(tasks, workers, say)
    buckets = tuple(BucketPlan(t.bucket, run.hits[t.bucket].num_iterations, t.composition, t.bucket not in found,
                               r.prediction, r.source, round(r.solve_s, 3), r.plan) for t, r in zip(tasks, results))
    prediction = predict_trace([(b.num_iterations, b.prediction) for b in buckets], run.num_real_tokens)
    wall_s = time.perf_counter() - began
    profile = _profile(path, cfg.spec, tasks[0].workload(), kv_cache_dtype)
    return Family(
        cfg.spec.name,
        {"spec": trace_spec, "name": trace.name, "num_requests": len(trace.requests), "seed": seed,
         "description": trace.description},
        shape,
        {"total_bytes": gpu.memory_bytes, "utilization": DEFAULT_UTILIZATION, "other_bytes": OTHER_BYTES,
         "dtype": "bf16", "kv_cache_dtype": kv_cache_dtype},
        {"num_iterations": run.num_iterations, "num_real_tokens": run.num_real_tokens,
         "num_finished": run.num_finished, "num_refused": run.num_refused, "num_preemptions": run.num_preemptions},
        {"fingerprint": profile.fingerprint(), "label": profile.label,
         "attention": pricing(profile, kv_cache_dtype)},
        buckets, prediction,
        {"wall_s": round(wall_s, 3), "num_workers": workers, "time_limit_s": time_limit_s, "seed": seed})


def _profile_path(profile_path: str | None, spec: ModelSpec) -> str | None:
    if profile_path:
        if not Path(profile_path).is_file():
            raise NfsearchError(f"profile {profile_path}: no such file")
        return str(profile_path)
    bundled = bundled_profile_path(spec, Workload.from_batch_shape((1024,), model=spec.name))
    return str(bundled) if bundled else None


def _num_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _solve_all(tasks: list[BucketTask], workers: int, say) -> list[BucketResult]:
    """Each task's result, in task order; the largest batches start first (they take longest)."""
    order = sorted(tasks, key=lambda t: -(t.composition.num_tokens + len(t.composition.decode_contexts)))
    results = {}

    def done(r: BucketResult) -> None:
        task, pred = tasks[r.index], r.prediction
        b = task.bucket
        results[r.index] = r
        say(f"bucket {b.max_tokens}/{b.max_decode}/{b.max_segments}/{b.max_context}: {task.composition.describe()}: "
            f"{pred.layer_ms:.3f} ms per layer ({r.source}; sequential {pred.sequential_layer_ms:.3f}), {r.solve_s:.1f} s")

    if workers == 1:
        for task in order:
            done(solve_bucket(task))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            for future in [pool.submit(solve_bucket, t) for t in order]:
                done(future.result())
    return [results[t.index] for t in tasks]
