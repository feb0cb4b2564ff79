"""Tensor-parallel execution: one process per GPU, a plan's nano-ops on every rank, collectives between.

Process start: `spawn_ranks` starts `world_size` processes with torch.multiprocessing (one host), or,
under torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the environment, one or
more hosts), `rank_from_env` joins the group the launcher made. Either way NVLink multicast is off
before the first communicator (collectives.set_safe_env) and the process group is NCCL on GPUs, gloo
on CPU (the CI test).

Model: every rank builds the plain single-GPU ModelInstance of the whole layer from one seed (so all
ranks hold the same weights: the TP=1 reference "gathered" without moving a byte), runs the TP=1
sequential torch reference on it, and `apply_tp` turns it into this rank's shard, Megatron-style:

    KQV  column-parallel   this rank's query heads and KV heads (wqkv columns, bias, KV cache heads)
    O    row-parallel      wo rows of those heads; partial sums, all-reduced by allreduce_o
    UG   column-parallel   this rank's slice of gate and of up
    D    row-parallel      wd rows of that slice; partial sums, all-reduced by allreduce_d

The residual adds that runtime.model fuses into O and D are kept on rank 0 only, so the all-reduce
sums the residual once. Norms, RoPE and attention run unchanged on the shard (fewer heads).

Run (`execute_rank`): the plan's launch list on every rank through the single-GPU executor's `issue`
(network nano-ops dispatch to runtime.collectives through the model's op_allreduce_*), checked
against the reference buffer by buffer (full buffers after each all-reduce, this rank's columns of
the sharded ones), then timed in one CUDA graph per launch list beside seq-torch and seq-same (each
with its collectives on its one stream), repeats medians with their spread; ceilings, NCCL bus
bandwidth (B_net) and the roofline bound with its network term, measured in the same run.

Power (on GPUs): every rank records its own GPU as the single-GPU executor does (runtime/power.py):
NVML windows around each timing round of the plan and of the baselines (coarse mean power, clock,
clock-event reasons), then a sustained loop of the plan's graph replays for its energy per layer. That
loop holds collectives, so it runs in LOCKSTEP: the ranks agree on the chunk size and count from the
slowest rank's replay time (power.lockstep_chunks) and every rank issues all of them; it runs only
when every rank has NVML. Rank 0 gathers every rank's runreport.RankPower into the report's "power"
(runreport.TpPower) with the profile's power bound of one layer PER GPU (the shard's ops, GPU 0's
limit and static power; the collectives count no dynamic energy), applied as on one GPU: predicted
layer time = max(the plan's replayed layer time, the bound).

Timeline (`execute_rank(timeline=True)`, `run --timeline`): after the plan is timed, EVERY rank runs
trace.measure_graph_timeline on its own launch list (the same list on every rank) at the same point,
with `_agree` as its agreement hook: the signature pass issues each network launch once eagerly in
launch order, then the graph is captured and replayed 1 + STEADY_REPLAYS + DEFAULT_REPLAYS times, the
same on every rank; a rank that fails a step (profiler start, signature pass, capture) says so at the
step's end and every rank stops there together. Mapping the trace back is local; the ranks then
agree once more, and rank 0's timeline goes into the report (key "timeline", timeline_to_dict form)
only when every rank traced; each rank's traced makespan goes beside it (the skew between ranks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nfsearch import plan
from nfsearch.errors import NfsearchError
from nfsearch.graph import TpShard, tp_shard
from nfsearch.roofline import roofline
from nfsearch.runreport import RankPower, Timing, TpPower
from nfsearch.runtime import bench, executor, power, trace
from nfsearch.runtime import collectives as coll_mod
from nfsearch.runtime import launch as launch_mod
from nfsearch.runtime.bench import event_times, host_times, rotated
from nfsearch.runtime.context import resolve_impl
from nfsearch.runtime.executor import PLAN_ENERGY_WINDOW_S, _power_bound
from nfsearch.runtime.kernels import IMPLS
from nfsearch.runtime.model import ModelInstance, rel_error
from nfsearch.specs import GpuSpec
from nfsearch.timeline import timeline_to_dict

TOLERANCE = 2e-2
# buffers whose rows are whole on every rank (after the all-reduces) vs this rank's column shard
FULL_BUFFERS = ("h1", "mid", "h2", "out")
SHARDED_BUFFERS = ("qkv", "q", "k", "v", "attn", "ug", "act")
MAX_CTA_LIMIT = 32          # NCCL's channels: a network op asked for more SMs runs on the default one
TIMEOUT = datetime.timedelta(minutes=5)


# ---------------------------------------------------------------------------------------------- ranks
@dataclass
class TpRank:
    """This process's place in the tensor-parallel group and the GPU state tied to it."""
    rank: int
    world_size: int
    device: torch.device
    coll: coll_mod.Collectives

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a group of {self.world_size}")

    @property
    def is_first(self) -> bool:
        return self.rank == 0


def init_rank(rank: int, world_size: int, backend: str, master_addr: str = "127.0.0.1",
              master_port: int = 29500, local_rank: int | None = None) -> TpRank:
    """Join (or make) the process group: NCCL with one GPU per process, or gloo on the CPU."""
    coll_mod.set_safe_env()
    if backend == "nccl":
        device = torch.device("cuda", rank if local_rank is None else local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    kw = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size, timeout=TIMEOUT, **kw)
    return TpRank(rank, world_size, device, coll_mod.Collectives())


def rank_from_env(backend: str = "nccl") -> TpRank:
    """Under torchrun (or any launcher that sets the env:// variables)."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError) as exc:
        raise NfsearchError(f"not started by torchrun: {exc} missing or not a number") from None
    return init_rank(rank, world, backend, addr, port, local)


def is_under_launcher() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(index, fn, world_size, backend, port, args):
    tp = init_rank(index, world_size, backend, master_port=port)
    try:
        fn(tp, *args)
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn, world_size: int, backend: str, args: tuple = ()) -> None:
    """Run fn(TpRank, *args) in `world_size` new processes on this host; raises if any rank fails."""
    coll_mod.set_safe_env()           # inherited by the children before they import NCCL
    mp.spawn(_spawned, args=(fn, world_size, backend, free_port(), args), nprocs=world_size, join=True)


# ---------------------------------------------------------------------------------------------- the model
class TpModelInstance(ModelInstance):
    """One rank's shard of a ModelInstance (made by apply_tp, not constructed directly)."""
    tp: TpRank
    shard: TpShard
    whole_gpu_sms: int

    def op_o(self, buf, w, layer, a, b, impl, n):
        IMPLS["o"][impl](buf["attn"][a:b].view(b - a, self.q_size), w.wo, buf["mid"][a:b], n,
                         residual=buf["x"][a:b] if self.tp.is_first else None)

    def op_d(self, buf, w, layer, a, b, impl, n):
        IMPLS["d"][impl](buf["act"][a:b], w.wd, buf["out"][a:b], n,
                         residual=buf["mid"][a:b] if self.tp.is_first else None)

    def op_allreduce_o(self, buf, w, layer, a, b, impl, n):
        self._all_reduce("allreduce_o", buf, a, b, impl, n)

    def op_allreduce_d(self, buf, w, layer, a, b, impl, n):
        self._all_reduce("allreduce_d", buf, a, b, impl, n)

    def _all_reduce(self, op, buf, a, b, impl, n):
        coll = self.tp.coll
        if impl == "ce":
            coll.all_reduce_rows_ce(op, buf[coll_mod.COLLECTIVE_OPS[op]], a, b, num_sms=n)
        else:
            coll.all_reduce_rows(buf[coll_mod.COLLECTIVE_OPS[op]], a, b, coll.group_for(n, self.whole_gpu_sms))

    def shard_columns(self, name: str) -> torch.Tensor:
        """Indices of the whole layer's columns of buffer `name` that this rank holds."""
        s, r = self.shard, self.tp.rank
        q, kv, i = s.q_size, s.kv_size, s.intermediate_size
        full_q, full_kv = q * s.tp_degree, kv * s.tp_degree
        ar = lambda lo, n: torch.arange(lo, lo + n)
        if name == "qkv":
            return torch.cat([ar(r * q, q), ar(full_q + r * kv, kv), ar(full_q + full_kv + r * kv, kv)])
        if name in ("q", "attn"):
            return ar(r * s.num_heads, s.num_heads)
        if name in ("k", "v"):
            return ar(r * s.num_kv_heads, s.num_kv_heads)
        if name == "ug":
            return torch.cat([ar(r * i, i), ar(i * s.tp_degree + r * i, i)])
        if name == "act":
            return ar(r * i, i)
        raise KeyError(name)


def apply_tp(instance: ModelInstance, tp: TpRank, workload, whole_gpu_sms: int = 1) -> TpModelInstance:
    """This rank's shard of a whole-layer ModelInstance, for a TP workload (tp_degree = world size).

    A new object: its weights and KV caches are contiguous copies of this rank's slices; the
    instance given is left whole (the reference runs on it)."""
    if workload.tp_degree != tp.world_size:
        raise NfsearchError(f"workload {workload.name} is TP={workload.tp_degree} but the group has "
                            f"{tp.world_size} processes")
    shard = tp_shard(instance.model, tp.world_size)
    out = TpModelInstance.__new__(TpModelInstance)
    out.__dict__.update(instance.__dict__)
    out.tp, out.shard, out.whole_gpu_sms, out.workload = tp, shard, whole_gpu_sms, workload
    cols_qkv = out.shard_columns("qkv").to(instance.device)
    cols_ug = out.shard_columns("ug").to(instance.device)
    r, qs, inter = tp.rank, shard.q_size, shard.intermediate_size
    out.layers = [dataclasses.replace(
        w,
        wqkv=w.wqkv[:, cols_qkv].contiguous(),
        bqkv=None if w.bqkv is None else w.bqkv[cols_qkv].contiguous(),
        wo=w.wo[r * qs:(r + 1) * qs].contiguous(),
        wug=w.wug[:, cols_ug].contiguous(),
        wd=w.wd[r * inter:(r + 1) * inter].contiguous()) for w in instance.layers]
    lo, hi = r * shard.num_kv_heads, (r + 1) * shard.num_kv_heads
    out.kv_cache = [(k, v) if k is None else (k[:, :, lo:hi].contiguous(), v[:, :, lo:hi].contiguous())
                    for k, v in instance.kv_cache]
    out.hq, out.hkv = shard.num_heads, shard.num_kv_heads
    out.q_size, out.kv_size, out.inter = shard.q_size, shard.kv_size, shard.intermediate_size
    out._prefill_args = {}            # scratch buffers were sized for the whole layer's heads
    return out


# ---------------------------------------------------------------------------------------------- reference
def reference_buffers(full: ModelInstance) -> list[dict]:
    """The TP=1 sequential torch reference on the whole layer (this rank's device, current stream)."""
    ll = launch_mod.sequential_launches(full.model, full.workload, full.num_layers, 1, "torch", stream="reference")
    full.prepare(ll.launches)
    bufs = full.new_buffers(fill=float("nan"))
    for l in ll.launches:
        full.run(bufs, l.layer, l.op, *l.tokens, "torch", l.sms)
    if full.device.type == "cuda":
        torch.cuda.synchronize(full.device)
    return bufs


def compare(model: TpModelInstance, bufs, ref_bufs, tol: float = TOLERANCE) -> dict:
    """This rank's buffers against the reference: whole buffers, and this rank's columns of the rest."""
    errors, first, worst = [], None, 0.0
    for layer in range(model.num_layers):
        for name in FULL_BUFFERS + SHARDED_BUFFERS:
            want = ref_bufs[layer][name]
            if name in SHARDED_BUFFERS:
                want = want.index_select(1, model.shard_columns(name).to(want.device))
            err = rel_error(bufs[layer][name], want)
            errors.append({"layer": layer, "buffer": name, "rel_error": err})
            worst = max(worst, err)
            if first is None and not err <= tol:
                first = {"layer": layer, "buffer": name, "rel_error": err}
    return {"passed": first is None, "tolerance": tol, "max_rel_error": worst, "first_divergence": first,
            "rank": model.tp.rank, "errors": errors}


# ---------------------------------------------------------------------------------------------- timing
def _agree(tp: TpRank, ok: bool) -> bool:
    """True only when every rank says ok (a capture that failed on one rank must fail on all)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=tp.device)
    dist.all_reduce(flag)
    return float(flag.item()) == 0.0


def _agree_max(tp: TpRank, value: float) -> float:
    """The largest `value` over the ranks (every rank gets it)."""
    x = torch.tensor([float(value)], device=tp.device, dtype=torch.float64)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x.item())


def _replayable(tp: TpRank, ctx, model, bufs, ll, use_graph: bool):
    """(fn, how, note, graph) of one launch list on this rank: issued once outside any capture
    (compiles, makes communicators), then captured as a CUDA graph whose replay is `fn`, or issued
    eagerly if any rank fails to capture it (every rank then does, so the collectives pair up; `note`
    says why). On CPU always eager."""
    executor.issue(ctx, model, bufs, ll)
    _sync(tp)
    fn, how, note = (lambda: executor.issue(ctx, model, bufs, ll)), "eager", None
    graph, ok = None, False
    if use_graph and tp.device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                executor.issue(ctx, model, bufs, ll)
            ok = True
        except Exception as exc:  # noqa: BLE001 - capture failure: every rank falls back to eager, noted
            note = f"CUDA-graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); timed eagerly"
        _sync(tp)
        if _agree(tp, ok):
            fn, how = graph.replay, "cuda-graph"
        elif note is None:
            note = "CUDA-graph capture failed on another rank; timed eagerly"
    return fn, how, note, graph


def time_launch_list(tp: TpRank, ctx, model, bufs, ll, iters: int, repeats: int, use_graph: bool = True,
                     watch=None, after=None) -> dict:
    """Median over `repeats` of the median of `iters` replays of one CUDA graph of the launch list
    (eager issue if any rank fails to capture). Every rank runs the same calls (collectives inside).
    On CPU (the gloo test) the launches are issued eagerly and timed by the host clock.
    watch(): a context manager around each round (this rank's NVML window), or None.
    after(fn, ms): called on every rank once the rounds are done, with the replay and its median
    time, while the graph still exists (the plan's sustained power loop)."""
    is_cuda = tp.device.type == "cuda"
    fn, how, note, graph = _replayable(tp, ctx, model, bufs, ll, use_graph)
    medians, all_times = [], []
    for _ in range(repeats):
        with watch() if watch is not None else contextlib.nullcontext():
            times = _times(fn, iters, is_cuda)
        medians.append(statistics.median(times))
        all_times += times
    out = {"ms": statistics.median(medians), "repeat_ms": medians, "spread_ms": max(medians) - min(medians),
           "min_ms": min(all_times), "max_ms": max(all_times), "iters": iters, "repeats": repeats, "how": how}
    if note:
        out["note"] = note
    if after is not None:
        after(fn, out["ms"])
    del graph
    return out


class RankPowerWatch:
    """This rank's power readings in a TP run (module doc): the single-GPU executor's NVML windows,
    sustained loop and PowerReading (runtime/power.py), the loop in lockstep with the other ranks."""

    def __init__(self, tp: TpRank, is_cuda: bool):
        self.tp, self.windows, self.reading, self.device = tp, {}, None, None
        if is_cuda:
            self.device, why = power.open_device(tp.device.index or 0)
            self.note = "" if self.device is not None else why
        else:
            self.note = "no GPU (CPU ranks): no NVML readings"

    def watch(self, label: str):
        """watch() for time_launch_list: one NVML window per round of `label` (None without NVML)."""
        if self.device is None:
            return None
        return lambda: self.windows.setdefault(label, power.EnergyWindows(self.device)).window()

    def sustained(self, fn, ms: float, num_layers: int) -> None:
        """The plan's sustained loop (collective: every rank calls it at the same point) and its reading."""
        if not _agree(self.tp, self.device is not None):
            if self.device is not None:
                self.note = "another rank has no NVML: no sustained loop (its calls would wait on that rank)"
            return
        per_chunk, num_chunks = power.lockstep_chunks(_agree_max(self.tp, ms), window_s=PLAN_ENERGY_WINDOW_S)
        try:
            m = power.measure_energy(fn, self.device, window_s=PLAN_ENERGY_WINDOW_S, calls_per_chunk=per_chunk,
                                     num_chunks=num_chunks)
        except Exception as exc:  # noqa: BLE001 - the run stands without its energy (every call was issued)
            _sync(self.tp)
            self.note = f"the plan's energy loop failed ({type(exc).__name__}: {str(exc)[:160]})"
            return
        windows = self.windows.get("plan") or power.EnergyWindows(self.device)
        self.reading = power.reading_of(m, windows, num_layers)

    def record(self, gpu: str):
        """This rank's runreport.RankPower (the baselines' timing rounds by label)."""
        baselines = tuple((label, power.timing_power_of(w)) for label, w in self.windows.items() if label != "plan")
        return RankPower(self.tp.rank, gpu, self.reading, baselines, "" if self.reading is not None else self.note)

    def close(self) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None


def _times(fn, iters: int, is_cuda: bool, warmup: int = 3) -> list[float]:
    return (event_times if is_cuda else host_times)(fn, iters, warmup=warmup)


def _sync(tp: TpRank) -> None:
    if tp.device.type == "cuda":
        torch.cuda.synchronize(tp.device)


# ---------------------------------------------------------------------------------------------- impls, baselines
# per-op impls of `--impls fast` (docs/kernels.md: the fastest inside a partition)
FAST_IMPLS = {"kqv": "tma", "o": "tma", "ug": "tma", "d": "tma", "decode_attn": "tma", "prefill_attn": "flash",
              "norm1": "cuda", "norm2": "cuda", "act": "cuda", "rope_append": "cuda"}
IMPL_CHOICES = ("plan", "fast", "torch")


def with_impls(schedule, choice: str):
    """The plan with its compute/memory nano-ops' impls replaced: "plan" keeps them (an analytic plan's
    "analytic" runs as the executor resolves it), "fast" takes FAST_IMPLS, "torch" the library ops."""
    if choice not in IMPL_CHOICES:
        raise NfsearchError(f"impls must be one of {', '.join(IMPL_CHOICES)}, not {choice!r}")
    if choice == "plan":
        return schedule
    table = FAST_IMPLS if choice == "fast" else {op: "torch" for op in FAST_IMPLS}
    ops = tuple(dataclasses.replace(o, impl=table.get(o.op, o.impl)) for o in schedule.nano_ops)
    return dataclasses.replace(schedule, nano_ops=ops)


def tp_baselines(schedule, ll, num_sms: int, device_type: str) -> dict:
    """seq-torch and seq-same under TP (docs/workloads.md): whole ops on one stream and the whole GPU, the
    layer's collectives on that same stream after the row-parallel GEMMs; seq-torch with the torch ops
    (cuBLAS, SDPA, F.rms_norm), seq-same with the plan's own impl of each op."""
    counts: dict[str, dict[str, int]] = {}
    for l in ll.launches:
        impl = resolve_impl(l.op, l.impl, device_type)
        counts.setdefault(l.op, {}).setdefault(impl, 0)
        counts[l.op][impl] += 1
    same = {op: max(c, key=c.get) for op, c in counts.items()}
    seq = launch_mod.sequential_launches
    return {"seq_torch": seq(schedule.model, schedule.workload, schedule.num_layers, num_sms, "torch",
                             stream="seq-torch"),
            "seq_same": seq(schedule.model, schedule.workload, schedule.num_layers, num_sms, same,
                            stream="seq-same")}


def ce_rows(launch_lists, device_type: str) -> dict[str, list[tuple[int, int]]]:
    """Row ranges [a, b) of every network launch whose impl is "ce", by op, over the launch lists a run
    times (plan and baselines): Collectives.prepare_ce sets up one receive slot per range, before any
    capture and on every rank alike."""
    rows: dict[str, list[tuple[int, int]]] = {}
    for ll in launch_lists:
        for l in ll.launches:
            if l.op in coll_mod.COLLECTIVE_OPS and resolve_impl(l.op, l.impl, device_type) == "ce":
                rows.setdefault(l.op, []).append(tuple(l.tokens))
    return rows


def impls_of(ll, device_type: str) -> dict[str, str]:
    return {l.op: resolve_impl(l.op, l.impl, device_type) for l in ll.launches}


def broadcast_model(full: ModelInstance) -> None:
    """Rank 0's weights, KV caches and input on every rank (one seed makes them equal already; this
    makes the TP=1 reference exactly the gathered weights whatever the generator does per device)."""
    tensors = [full.x0] + [t for k, v in full.kv_cache if k is not None for t in (k, v)]
    for w in full.layers:
        # the fields themselves (dataclasses.astuple would deep-copy them and broadcast into the copies)
        tensors += [t for t in (getattr(w, f.name) for f in dataclasses.fields(w)) if isinstance(t, torch.Tensor)]
    for t in tensors:
        dist.broadcast(t, src=0)


# ---------------------------------------------------------------------------------------------- one rank
def execute_rank(tp: TpRank, schedule, *, mode: str = "green", iters: int = 30, repeats: int = 3,
                 use_graph: bool = True, tol: float = TOLERANCE, with_baselines: bool = True,
                 with_ceilings: bool = True, seed: int = 0, dtype=None, impls: str = "plan",
                 time_on_cpu: bool = False, rank_seed_step: int = 0, timeline: bool = False,
                 progress=None, power_bound=None, power_note: str = "") -> dict:
    """Check and time a TP plan on this rank. Rank 0's return value is the run report (every rank's
    correctness and timings gathered into it); other ranks return their own part. On CPU only the
    check runs, unless time_on_cpu (host-clock timings, no ceilings: the CI test of the report).
    rank_seed_step: rank r draws its weights with seed + r * step before rank 0's are broadcast (a
    test that the check runs on one set of weights whatever each rank drew).
    timeline: every rank traces the plan's graph replays after timing it (module doc; `trace_rank`).
    power_bound / power_note: the profile's energy.PowerBound of one layer (cost.power_bound_of), or
    None and why; rank 0's report applies it (module doc)."""
    schedule = with_impls(schedule, impls)
    say = (progress or (lambda m: None)) if tp.is_first else (lambda m: None)
    workload = schedule.workload
    ctx, dtype = _rank_context(tp, workload, mode, dtype, "plan is")
    is_cuda = ctx.is_cuda
    try:
        ll = executor.build_launch_list(ctx, schedule)
        t0 = time.time()
        baselines = tp_baselines(schedule, ll, ctx.num_sms, tp.device.type) if with_baselines else {}
        model, ref_bufs = _shard_and_reference(tp, ctx, schedule, [ll, *baselines.values()], dtype,
                                               seed + tp.rank * rank_seed_step)
        say(f"whole-layer model ready on every rank ({time.time() - t0:.1f} s); TP=1 reference")
        model.prepare(ll.launches)
        say("running the plan on every rank; checking against the reference")
        bufs = model.new_buffers(fill=float("nan"))
        executor.issue(ctx, model, bufs, ll)
        if is_cuda:
            torch.cuda.synchronize(tp.device)
        correctness = compare(model, bufs, ref_bufs, tol)
        del bufs, ref_bufs
        mine = {"rank": tp.rank, "correctness": {k: v for k, v in correctness.items() if k != "errors"},
                "correctness_per_buffer": correctness["errors"], "device": str(tp.device)}
        if is_cuda:
            mine["gpu"] = torch.cuda.get_device_name(tp.device)
        passed = _all_passed(tp, correctness["passed"])
        bound = (power_bound, power_note)
        if not passed or not (is_cuda or time_on_cpu):
            return _gather(tp, mine, schedule, ll, ctx, passed, bound)
        bufs = model.new_buffers()
        watcher = RankPowerWatch(tp, is_cuda)
        try:
            if with_baselines:
                say("timing seq-torch and seq-same (collectives on their stream)")
                for name, bl in baselines.items():
                    model.prepare(bl.launches)
                    t = time_launch_list(tp, ctx, model, bufs, bl, iters, repeats, use_graph, watch=watcher.watch(name))
                    mine.setdefault("baselines", {})[name] = {**t, "layer_ms": t["ms"] / schedule.num_layers,
                                                              "impls": impls_of(bl, tp.device.type)}
            say("timing the plan" + (", then its energy (back-to-back graph replays in lockstep, NVML energy "
                                     "counter on every rank)" if is_cuda else ""))
            mine["plan_run"] = time_launch_list(
                tp, ctx, model, bufs, ll, iters, repeats, use_graph, watch=watcher.watch("plan"),
                after=(lambda fn, ms: watcher.sustained(fn, ms, schedule.num_layers)) if is_cuda else None)
            mine["power"] = watcher.record(mine.get("gpu", "cpu")).to_dict()
        finally:
            watcher.close()
        mine["plan_run"]["impls"] = impls_of(ll, tp.device.type)
        if timeline:
            say("measuring the per-op timeline on every rank (kernel trace of CUDA-graph replays)")
            mine["trace"] = trace_rank(tp, ctx, model, bufs, ll)
        del bufs
        say("measuring NCCL bus bandwidth" + (" and the ceilings" if with_ceilings else ""))
        mine["net"] = coll_mod.bus_bandwidth_gbps(tp.coll, workload.num_tokens, schedule.model.hidden_size,
                                                  dtype, tp.device)
        if with_ceilings and is_cuda:
            mine["ceilings"] = bench.ceilings(device=str(tp.device))
        return _gather(tp, mine, schedule, ll, ctx, passed, bound)
    finally:
        ctx.close()


# ---------------------------------------------------------------------------------------------- plans against each other
def time_plans_rank(tp: TpRank, schedules: dict, *, mode: str = "green", iters: int = 30, repeats: int = 5,
                    use_graph: bool = True, tol: float = TOLERANCE, seed: int = 0, dtype=None,
                    time_on_cpu: bool = False, progress=None) -> dict:
    """executor.time_plans under TP, on this rank (name -> plan, all of one problem): one whole-layer
    model (rank 0's weights), each plan checked against the TP=1 reference on every rank, then the
    plans that passed everywhere timed in interleaved rounds (time_launch_lists), every rank issuing
    the same graphs in the same order. Returns {"timings": name -> this rank's timing, "notes": why a
    plan was left out}; on CPU only the checks run, unless time_on_cpu."""
    say = (progress or (lambda m: None)) if tp.is_first else (lambda m: None)
    names = list(schedules)
    first = executor.one_problem(schedules)
    ctx, dtype = _rank_context(tp, first.workload, mode, dtype, "plans are")
    is_cuda = ctx.is_cuda
    try:
        lists = {name: executor.build_launch_list(ctx, schedules[name]) for name in names}
        model, ref_bufs = _shard_and_reference(tp, ctx, first, list(lists.values()), dtype, seed)
        passed, notes = {}, []
        for name, ll in lists.items():
            model.prepare(ll.launches)
            bufs = model.new_buffers(fill=float("nan"))
            executor.issue(ctx, model, bufs, ll)
            _sync(tp)
            if _all_passed(tp, compare(model, bufs, ref_bufs, tol)["passed"]):
                passed[name] = ll
            else:
                notes.append(f"{name}: left out, output differs from the TP=1 reference on some rank")
            del bufs
        del ref_bufs
        if not passed or not (is_cuda or time_on_cpu):
            return {"timings": {}, "notes": notes}
        say(f"timing {', '.join(passed)} against each other: {repeats} interleaved rounds of {iters} runs")
        timings = time_launch_lists(tp, ctx, model, model.new_buffers(), passed, iters, repeats, use_graph)
        for t in timings.values():
            t["layer_ms"] = t["ms"] / first.num_layers
        return {"timings": timings, "notes": notes}
    finally:
        ctx.close()


def _rank_context(tp: TpRank, workload, mode: str, dtype, what: str):
    """(this rank's executor.ExecContext, the dtype its plans run in: bf16 on the GPU unless given);
    plans of another TP degree than the processes started are refused ("{what} for TP=...")."""
    if workload.tp_degree != tp.world_size:
        raise NfsearchError(f"{what} for TP={workload.tp_degree}; {tp.world_size} processes were started")
    ctx = executor.ExecContext(tp.device, mode)
    return ctx, dtype or (torch.bfloat16 if ctx.is_cuda else torch.float32)


def _shard_and_reference(tp: TpRank, ctx, schedule, lists: list, dtype, seed: int):
    """(this rank's shard of the whole-layer model, the TP=1 reference's buffers): the whole model drawn
    from `seed` (rank 0's broadcast to every rank), its reference run, then its shard; the collectives
    the launch lists use are made ready (NCCL CTA limits, copy-engine buffers)."""
    workload = schedule.workload
    full = ModelInstance(schedule.model, dataclasses.replace(workload, tp_degree=1), schedule.num_layers,
                         device=tp.device, dtype=dtype, seed=seed)
    broadcast_model(full)
    ref_bufs = reference_buffers(full)
    model = apply_tp(full, tp, workload, ctx.num_sms)
    del full
    tp.coll.prepare(l.sms for ll in lists for l in ll.launches
                    if l.op in coll_mod.COLLECTIVE_OPS and l.sms < ctx.num_sms and l.sms <= MAX_CTA_LIMIT)
    tp.coll.prepare_ce(ce_rows(lists, tp.device.type), workload.num_tokens, schedule.model.hidden_size,
                       dtype, tp.device)
    return model, ref_bufs


def time_launch_lists(tp: TpRank, ctx, model, bufs, lists: dict, iters: int, repeats: int,
                      use_graph: bool = True) -> dict:
    """name -> {ms, repeat_ms, how, iters[, note]} of each launch list: one CUDA graph each (eager where a rank
    fails to capture it), then `repeats` rounds, each timing every list as the median of `iters`
    replays, in the same order on every rank (the collectives inside pair up); round r starts at list
    r mod n (bench.rotated), so no list always runs first or last."""
    is_cuda = tp.device.type == "cuda"
    runs = {name: _replayable(tp, ctx, model, bufs, ll, use_graph) for name, ll in lists.items()}
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name in rotated(list(runs), r):
            rounds[name].append(statistics.median(_times(runs[name][0], iters, is_cuda)))
    out = {}
    for name, r in rounds.items():
        _fn, how, note, _graph = runs[name]
        out[name] = {"ms": statistics.median(r), "repeat_ms": r, "how": how, "iters": iters}
        if note:
            out[name]["note"] = note
    del runs                                     # the graphs go with it
    return out


def _time_plans_worker(tp: TpRank, plan_paths: dict, out_path: str, kwargs: dict) -> None:
    _write_from_rank_0(tp, out_path, lambda: time_plans_rank(
        tp, {name: plan.read(p) for name, p in plan_paths.items()},
        progress=lambda m: print(f"  {m}", flush=True), **kwargs))


def time_plans(schedules: dict, backend: str = "nccl", **kwargs) -> tuple[dict, list[str]]:
    """executor.time_plans for TP plans: one process per GPU (or this rank under torchrun) runs
    time_plans_rank; returns rank 0's name -> runreport.Timing and its notes. kwargs: time_plans_rank's.
    Raises NfsearchError with one line when a rank fails."""

    num_layers = next(iter(schedules.values())).num_layers
    n = next(iter(schedules.values())).workload.tp_degree
    if is_under_launcher():
        tp = rank_from_env(backend)
        try:
            got = time_plans_rank(tp, schedules, **kwargs)
        finally:
            dist.destroy_process_group()      # as run_plan does: the next candidate run starts its own
    else:
        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for i, (name, schedule) in enumerate(schedules.items()):
                paths[name] = os.path.join(tmp, f"{i}.json")
                plan.write(schedule, paths[name])
            out = os.path.join(tmp, "timings.json")
            try:
                spawn_ranks(_time_plans_worker, n, backend, (paths, out, kwargs))
            except Exception as exc:  # noqa: BLE001 - a rank's failure becomes one line
                detail = _read_json(out).get("error") or str(exc).strip().splitlines()[-1]
                raise NfsearchError(f"TP plans timed against each other failed: {detail}") from None
            got = _read_json(out)
    timings = {name: Timing(name, tuple(ms / num_layers for ms in t["repeat_ms"]), t["iters"], t["how"],
                            note=t.get("note", ""))
               for name, t in got["timings"].items()}
    return timings, list(got["notes"])


def trace_rank(tp: TpRank, ctx, model, bufs, ll) -> dict:
    """This rank's kernel trace of the plan's graph replays, in lockstep with the other ranks (module
    doc). Returns {"makespan_ms", "facts", "is_agreed"} and, on rank 0, "timeline" (timeline_to_dict
    form); or {"error", "is_agreed"} when this rank's trace failed. is_agreed: every rank traced."""
    gpu = torch.cuda.get_device_name(tp.device) if tp.device.type == "cuda" else "cpu"
    label = f"measured ({ctx.mode}, CUDA-graph replay kernel trace, {gpu}, TP={tp.world_size} rank {tp.rank})"
    try:
        tl, facts = trace.measure_graph_timeline(ctx, model, bufs, ll, label, agree=lambda ok: _agree_synced(tp, ok))
        out = {"makespan_ms": tl.makespan_ms, "facts": facts}
        if tp.is_first:
            out["timeline"] = timeline_to_dict(tl)
    except Exception as exc:  # noqa: BLE001 - the profiler fails in many ways; the run goes on, noted
        out = {"error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"}
    _sync(tp)
    out["is_agreed"] = _agree(tp, "error" not in out)
    return out


def _agree_synced(tp: TpRank, ok: bool) -> bool:
    """_agree once this rank's GPU work is done (as time_launch_list does after a capture)."""
    try:
        _sync(tp)
    except Exception:  # noqa: BLE001 - a failed capture may leave an error to report; the vote says it
        ok = False
    return _agree(tp, ok)


def trace_summary(parts: list[dict]) -> tuple[dict | None, dict, str]:
    """From every rank's part: (rank 0's timeline dict, or None unless every rank traced; the trace
    facts for the report, with each rank's traced makespan; a note)."""
    traces = [p.get("trace") or {"error": "no trace"} for p in parts]
    failed = {i: t["error"] for i, t in enumerate(traces) if "error" in t}
    if failed:
        first = min(failed)
        return None, {"errors": failed}, (f"timeline: kernel trace failed on rank(s) {sorted(failed)} (rank {first}: "
                                          f"{failed[first]}); no timeline")
    spans = [t["makespan_ms"] for t in traces]
    facts = traces[0]["facts"]
    info = {"per_rank_makespan_ms": spans, "rank_skew_ms": max(spans) - min(spans), "facts": facts}
    return traces[0]["timeline"], info, (
        f"timeline: rank 0's kernel trace of {facts['num_replays']} graph replays, median kept; matched by "
        f"{facts['method']}, {facts['num_skipped']} kernels unexpected; traced makespan per rank "
        + ", ".join(f"{x:.3f}" for x in spans) + " ms")


def _nccl_version() -> str | None:
    if not torch.cuda.is_available():
        return None
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _all_passed(tp: TpRank, passed: bool) -> bool:
    flag = torch.tensor([0.0 if passed else 1.0], device=tp.device)
    dist.all_reduce(flag)
    return float(flag.item()) == 0.0


def _gather(tp: TpRank, mine: dict, schedule, ll, ctx, passed: bool, bound: tuple = (None, "")) -> dict:
    mine["coll_notes"] = list(tp.coll.notes)
    parts = [None] * tp.world_size
    dist.all_gather_object(parts, mine)
    if not tp.is_first:
        return mine
    return build_report(schedule, ll, ctx, parts, passed, *bound)


def build_report(schedule, ll, ctx, parts: list[dict], passed: bool, power_bound=None, power_note: str = "") -> dict:
    """Rank 0's report: the single-GPU run report's fields, per-rank parts, and the network term;
    "power": every rank's readings and the bound (runreport.TpPower), the predicted layer time
    max(replayed, bound) as on one GPU."""
    first = parts[0]
    report = {
        "gpu": first.get("gpu", "cpu"), "gpus": [p.get("gpu", "cpu") for p in parts],
        "tp_degree": len(parts), "num_sms": ctx.num_sms,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "nccl": _nccl_version()},
        "mode": ctx.mode, "model": schedule.model.name, "workload": schedule.workload.name,
        "num_tokens": schedule.workload.num_tokens, "num_layers": schedule.num_layers,
        "solver": schedule.solver.name, "plan_profile": schedule.profile.label, "plan_gpu": schedule.gpu.name,
        "launches": ll.summary(),
        "correctness": {"passed": passed, "reference": "TP=1 sequential torch on the same weights (every rank "
                        "builds the whole layer from one seed)",
                        "max_rel_error": max(p["correctness"]["max_rel_error"] for p in parts),
                        "per_rank": [p["correctness"] for p in parts]},
        "correctness_per_buffer": first["correctness_per_buffer"],
        "env": {k: os.environ.get(k) for k in coll_mod.SAFE_ENV},
        "notes": list(ll.notes) + ctx.notes + first.get("coll_notes", []),
    }
    if "plan_run" not in first:
        return report
    report["baselines"] = first.get("baselines", {})
    report["plan_run"] = first["plan_run"]
    report["per_rank_plan_ms"] = [p["plan_run"]["ms"] for p in parts]
    measured = first["plan_run"]["ms"] / schedule.num_layers
    report["measured_layer_ms"] = measured
    replayed = schedule.predicted.layer_time_ms if schedule.predicted is not None else None
    report.update(power_fields(parts, replayed, power_bound, power_note))
    pred = report["predicted_layer_ms"]
    if report["power"]["power_bound"] is None:
        report["notes"].append(f"power: {power_note or 'no power bound'}")
    report["prediction_error"] = None if pred is None else (pred - measured) / measured
    for name, b in report["baselines"].items():
        report[f"speedup_vs_{name}"] = b["layer_ms"] / measured
    report["net"] = first["net"]
    if "ceilings" in first:
        c = first["ceilings"]                       # bench.ceilings: a dict, or a specs.Ceilings
        c = c if isinstance(c, dict) else c.to_dict()
        report["ceilings"] = c
        gpu = GpuSpec(key="measured", name=report["gpu"], num_sms=ctx.num_sms, sm_granularity=max(ctx.granularity, 1),
                      peak_tflops=c["gemm_tflops"], mem_bandwidth_tbps=c["copy_tbps"],
                      net_bandwidth_gbps=first["net"]["bus_gbps"], figures_source="measured in this run")
        r = roofline(schedule.model, schedule.workload, gpu)
        report.update({"bound_ms": r.bound_ms, "bound_compute_ms": r.compute_ms, "bound_mem_ms": r.mem_ms,
                       "bound_net_ms": r.net_ms, "net_share_of_bound": r.net_ms / r.bound_ms,
                       "pct_of_bound": r.bound_ms / measured, "optimal_tokens_per_s": r.tokens_per_s})
    report["tokens_per_s"] = schedule.workload.num_tokens / (measured * 1e-3 * schedule.model.num_layers)
    report["notes"] += [f"{name}: {t['note']}" for name, t in
                        [("plan", first["plan_run"])] + list(report["baselines"].items()) if "note" in t]
    if "trace" in first:
        tl, report["trace"], note = trace_summary(parts)
        report["notes"].append(note)
        if tl is not None:
            report["timeline"] = tl
    return report


def power_fields(parts: list[dict], replayed_layer_ms: float | None, power_bound, power_note: str) -> dict:
    """The report's power keys: "power" (runreport.TpPower: every rank's readings, the bound) and the
    predicted layer time max(replayed, bound) with the replayed one beside it, as the single-GPU run
    report has them."""
    ranks = tuple(RankPower.from_dict(p["power"]) for p in parts if p.get("power") is not None)
    bound = power_bound if replayed_layer_ms else None
    tp_power = TpPower(ranks, bound, replayed_layer_ms or None, "" if bound is not None else power_note)
    return {"power": tp_power.to_dict(), "replay_layer_ms": tp_power.replay_layer_ms,
            "predicted_layer_ms": tp_power.predicted_layer_ms, "is_power_bound": tp_power.is_power_bound,
            "power_bound_ms": None if bound is None else bound.bound_ms}


def power_lines(report: dict) -> list[str]:
    """What a TP run says about power, per rank and the bound (TpPower.lines); none in a report without."""
    return TpPower.from_dict(report["power"], "TP run report").lines() if report.get("power") else []


# ---------------------------------------------------------------------------------------------- the whole run
def _run_worker(tp: TpRank, plan_path: str, out_path: str, kwargs: dict) -> None:
    schedule = plan.read(plan_path)
    _write_from_rank_0(tp, out_path, lambda: execute_rank(
        tp, schedule, progress=lambda m: print(f"  {m}", flush=True), **kwargs))


def _write_from_rank_0(tp: TpRank, out_path: str, work) -> None:
    """Run `work()` on this rank; rank 0 writes its result as JSON to `out_path`, or the error for the
    parent process before failing."""
    try:
        result = work()
    except Exception as exc:
        if tp.is_first:
            with open(out_path, "w") as f:
                json.dump({"error": f"{type(exc).__name__}: {exc}"}, f)
        raise
    if tp.is_first:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1, default=str)


def run_plan(plan_path: str, **kwargs) -> dict | None:
    """`nfsearch run` on a TP plan: one process per GPU (or this one rank under torchrun); rank 0's report
    (None on the other ranks of a torchrun job: rank 0 writes the report). kwargs: execute_rank's, and
    profile (a ProfileTable: its power bound goes into the report; none without).

    Raises NfsearchError with one line when the GPUs are too few or a rank fails."""
    progress = kwargs.pop("progress", None)        # spawned ranks print their own (a callable does not pickle)
    schedule = plan.read(plan_path)
    # the bound from the profile, here (the table stays in this process; the ranks get the PowerBound)
    kwargs["power_bound"], kwargs["power_note"] = _power_bound(schedule, kwargs.pop("profile", None))
    n = schedule.workload.tp_degree
    if is_under_launcher():
        tp = rank_from_env("nccl")
        try:
            report = execute_rank(tp, schedule, progress=progress, **kwargs)
            return report if tp.is_first else None
        finally:
            dist.destroy_process_group()
    visible = torch.cuda.device_count()
    if visible < n:
        raise NfsearchError(f"{plan_path}: the plan is TP={n}; this host shows {visible} GPU(s) "
                            "(run it with torchrun across hosts, see the README)")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        try:
            spawn_ranks(_run_worker, n, "nccl", (str(plan_path), out, kwargs))
        except Exception as exc:  # noqa: BLE001 - a rank's failure becomes one line
            detail = _read_json(out).get("error") or str(exc).strip().splitlines()[-1]
            raise NfsearchError(f"TP run of {plan_path} failed: {detail}") from None
        report = _read_json(out)
    if not report.get("correctness", {}).get("passed", False):
        worst = report.get("correctness", {}).get("max_rel_error")
        raise NfsearchError(f"TP plan output differs from the TP=1 sequential reference (max rel error "
                            f"{worst:.3g} > {TOLERANCE:g})")
    return report


def format_line(r: dict) -> str:
    """One line of a TP run report: measured, predicted, baselines, bound with its network term."""
    label = f"{r.get('plan', r.get('workload', '?'))}" + (f" [{r['impls_choice']}]" if "impls_choice" in r else "")
    if "error" in r:
        return f"{label}: FAILED {r['error'][:300]}"
    if "measured_layer_ms" not in r:
        return f"{label}: correctness {r['correctness']['passed']} (no timing on {r['gpu']})"
    b = r.get("baselines", {})

    def baseline(name: str, key: str) -> str:
        ms = b.get(key, {}).get("layer_ms")
        return f"{name} {ms:.3f} (x{r.get(f'speedup_vs_{key}') or 0:.3f})" if ms else f"{name} not timed here"
    pred = r.get("predicted_layer_ms") or 0.0
    return (f"{r['workload']} {label} on {r['tp_degree']}x {r['gpu']}: layer {r['measured_layer_ms']:.3f} ms "
            f"(spread {r['plan_run']['spread_ms'] / r['num_layers']:.3f} ms, {r['plan_run']['how']}), predicted "
            f"{pred:.3f}; {baseline('seq-torch', 'seq_torch')}, {baseline('seq-same', 'seq_same')}; bound "
            f"{r.get('bound_ms', 0):.3f} (net {r.get('bound_net_ms', 0):.3f}, bus {r['net']['bus_gbps']:.0f} GB/s) = "
            f"{r.get('pct_of_bound', 0) * 100:.0f}%; max rel err {r['correctness']['max_rel_error']:.2g}")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def net_table_worker(tp: TpRank, out_path: str, hidden_size: int, token_grid, cta_limits) -> None:
    """Rank body of `benchmarks/run_tp.py net`: rank 0 writes the all-reduce table as JSON."""
    rows = coll_mod.all_reduce_table(tp.coll, hidden_size, torch.bfloat16, tp.device, token_grid, cta_limits)
    if tp.is_first:
        with open(out_path, "w") as f:
            json.dump({"world_size": tp.world_size, "hidden_size": hidden_size, "dtype": "bf16",
                       "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                       "nccl": _nccl_version(), "notes": tp.coll.notes, "rows": rows}, f, indent=1)
