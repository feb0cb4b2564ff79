"""A measured profile of one tensor-parallel shard: `nfsearch profile --tp N` on the first N GPUs.

    measure_tp_profile(model, workload, num_gpus, ...) -> ProfileTable

Two parts, one table:

1. The shard's own ops (norms, GEMMs of the shard shapes, attention over this GPU's heads, ...) on
   GPU 0 with the single-GPU profiler (profiler.measure_single_gpu: the same grid, co-run rows and
   pair table as `nfsearch profile`, on the per-GPU shapes of measurements.Plan.tp_degree); then,
   with_energy, their energy on GPU 0 (profiler.add_energy, as `nfsearch profile` measures a single
   GPU's: the shard's ops at the W1-W3 and workload token counts, the power limit and static power of
   GPU 0). The collectives' energy is measured in part 2, which needs every GPU.
2. The collectives, which need every rank at once: N processes (runtime.tp.spawn_ranks, one per GPU,
   NCCL through torch.distributed, NVLink multicast off), each walking the same plan
   (measurements.network_plan) in lockstep:
   * solo rows of each network op (allreduce_o, allreduce_d: an all-reduce of [tokens, hidden] in
     bf16) with each collective impl at the grid's token counts and SM counts. Impl "nccl": the all-reduce issued on the
     green-context stream of S SMs (torch >= 2.7 launches a synchronous collective on the current
     stream), through the communicator `Collectives.group_for(S)` picks, i.e. with NCCL's CTA limit
     = S where S <= tp.MAX_CTA_LIMIT (prepared as `nfsearch run` prepares them) and NCCL's default
     above: exactly how a plan's network nano-op of S SMs runs. Impl "ce" (runtime.ce_collectives):
     the rows move on the copy engines (no SM) and the sum kernel runs on a plain stream of the whole
     GPU, as a plan runs it (measured there only: it holds no SM share), one receive slot per op (calls on one stream are ordered by its flags). "ce" is measured
     only when every rank can set it up (peer memory, stream memory operations); otherwise the
     profile says why and has nccl rows only;
   * pair points of each GEMM of the layer (kqv, o, ug, d at the pair table's GEMM sizes) and of
     decode attention (at the pair table's decode sizes) x each collective (the GEMM's token count;
     beside decode attention, each GEMM size) on the pair table's two-way splits, that op on one
     green group and the all-reduce on the other (each side the impl fastest alone on its partition, the collective's
     chosen from times agreed over the ranks so every rank runs the same one, as the cost model
     chooses), launched together on every rank, each timed with CUDA events on its
     own stream (median of `pair_repeats` launches), with each side alone on its partition and on
     the whole GPU (so pairs.py reports whether the split beats the two back to back).
   * with energy (the shard's was measured, so GPU 0 answers NVML): each all-reduce's energy
     (measure_collective_energy), every rank issuing the same back-to-back calls in lockstep and
     reading its own NVML counter; per GPU the largest rank's. Without this the power bound counts
     the collectives as no dynamic energy, which at TP=4 left 20% of a layer's energy out (W6 on
     4x H100). Then, with pairs, the energy of overlap of each collective family at its best split
     against the two back to back (measure_collective_pair_energy), the same way in lockstep: what a
     plan's power bound charges an overlap of a collective with a GEMM or decode attention.
   The timing code is the single-GPU profiler's (profiler._Measurer), with two hooks that span the
   ranks: every lead and every "enqueued in time?" verdict is the largest over the ranks (so every
   rank retries together and issues the same collectives), and the ranks meet at a barrier right
   before each timed section. A point fails on every rank if it fails on one. Per point, the slowest
   rank's measurement is kept (a TP layer waits for its slowest GPU).

The merged table: the shard's rows + the collectives' solo rows; one pair table (the shard's pairs
and the collective x GEMM pairs, the same columns); the shard's energy with the collectives' points
added; metadata of the shard's profile plus
"network" (every GPU's name, NCCL version, tp_degree, CTA limits, method, failures) and
"net_bandwidth_gbps": the highest bus bandwidth among the full-GPU all-reduce rows, which
profile.gpu_from_profile reads as B_net for the roofline's network term. Rank 0 hands the results
to the parent process; the parent writes the table (and <stem>.summary.json) only once both parts
are done, so a failure leaves no output (the shard part's checkpoint stays for a rerun).

On CPU (gloo; the CI test of the rank loop) the same plan runs with real gloo all-reduces and torch
matmuls timed by the host clock: the plumbing runs, the timings mean nothing (source "fake").
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import pickle
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from nfsearch import pairs as pair_table
from nfsearch.energy import EnergyPoint, PairEnergyPoint
from nfsearch.errors import NfsearchError
from nfsearch.graph import layer_ops, op_work
from nfsearch.profile import ProfileTable
from nfsearch.runtime import measurements as profiling
from nfsearch.runtime import power
from nfsearch.runtime.partitions import SmPartitions
from nfsearch.runtime.power import WINDOW_S
from nfsearch.runtime.profiler import _Measurer, add_energy, energy_summary, measure_single_gpu, pair_energy_graphs
from nfsearch.runtime.measurements import (CE_IMPL, NETWORK_IMPL, NETWORK_IMPLS, Measurement, Plan,
                                           Point, Settings)

NET_SOLO_METHOD = (
    "collectives: one process per GPU (torch.multiprocessing, NCCL through torch.distributed, "
    "NCCL_NVLS_ENABLE=0); every rank all-reduces a [tokens, hidden] bf16 slice at once, issued on the "
    "green-context stream of S SMs (the whole GPU: a plain stream) through the communicator the executor "
    "uses for S SMs (NCCL CTA limit = S where S <= {max_ctas}, NCCL's default above); timed like a solo row "
    "(CUDA events between back-to-back calls after a lead; lead and retries agreed over the ranks, a "
    "barrier before each timed section); per point the slowest rank's median")
NET_PAIR_METHOD = (
    "collective x GEMM pairs: the same split and launch method on every rank at once, the GEMM on one "
    "green group and the all-reduce (impl nccl, as above) on the other; per point the slowest rank's "
    "makespan with its detail")


@dataclass(frozen=True)
class NetworkRequest:
    """What every rank measures (picklable: it travels to the spawned processes)."""
    model: object                    # ModelSpec
    workload: object                 # Workload (tp_degree = the number of ranks)
    is_quick: bool = False
    with_pairs: bool = True
    settings: Settings | None = None
    sm_counts: tuple[int, ...] | None = None
    pair_minority_sms: tuple[int, ...] | None = None
    progress: object = None          # a picklable progress(done, total, eta_s, what), rank 0 only
    cpu_num_sms: int = 132           # CPU ranks (gloo test): the SM grid the plan pretends to
    cpu_granularity: int = 8
    net_impls: tuple[str, ...] = NETWORK_IMPLS   # those every rank can set up are measured
    with_energy: bool = False        # also the collectives' energy (measure_collective_energy), CUDA only
    energy_window_s: float = WINDOW_S   # each energy loop's NVML window (runtime/power.py)

    def __post_init__(self):
        if self.workload.tp_degree < 2:
            raise ValueError(f"a network profile needs TP >= 2, not {self.workload.tp_degree}")
        if not self.net_impls or set(self.net_impls) - set(NETWORK_IMPLS) or NETWORK_IMPL not in self.net_impls:
            raise ValueError(f"collective impls must include {NETWORK_IMPL} and be among {NETWORK_IMPLS}, "
                             f"not {self.net_impls}")


@dataclass
class NetworkRun:
    """Rank 0's result of the collectives' measurements, handed to the parent process."""
    plan: Plan
    results: dict[tuple, Measurement]
    failures: dict[tuple, str]
    stopped: str
    gpus: list[str]
    backend: str
    nccl: str | None
    cta_limits: list[int]
    notes: list[str] = field(default_factory=list)
    measure_s: float = 0.0
    rank_spread: float = 0.0         # largest (slowest rank / fastest rank - 1) of a point's time
    net_impls: tuple[str, ...] = (NETWORK_IMPL,)   # the collective impls measured (every rank could run)
    energy_points: tuple = ()        # energy.EnergyPoint of each collective (measure_collective_energy)
    pair_energy_points: tuple = ()   # energy.PairEnergyPoint of each collective family (measure_collective_pair_energy)


# ---------------------------------------------------------------------------------------------- the profile
def count_gpus() -> int:
    """CUDA GPUs torch sees here (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(num_gpus: int, num_visible: int) -> None:
    """One line when the host has fewer CUDA GPUs than the TP degree asks for."""
    if num_visible < num_gpus:
        raise NfsearchError(f"nfsearch profile --tp {num_gpus} needs {num_gpus} GPUs; this host has {num_visible}")


def measure_tp_profile(model, workload, num_gpus: int, is_quick: bool = False, output=None, progress=None,
                       with_pairs: bool = True, log=None, settings: Settings | None = None,
                       pair_minority_sms: tuple[int, ...] | None = None,
                       net_impls: tuple[str, ...] = NETWORK_IMPLS, with_energy: bool = False,
                       opt_in_impls: tuple[str, ...] = (), energy_window_s: float = WINDOW_S) -> ProfileTable:
    """The measured profile of `model`'s TP shard (workload.tp_degree = num_gpus) on GPUs 0..num_gpus-1.

    output: the table's path (its summary goes to <stem>.summary.json beside it; both written only
    when everything was measured); progress(done, total, eta_s, what) as points finish.
    with_energy: the shard's energy on GPU 0, then the collectives' and their pairs' on every GPU
    (module doc; a note and none without NVML); energy_window_s: each energy loop's NVML window
    (the GPU test's shorter than power.WINDOW_S)."""
    import torch

    log = log or _stderr
    if workload.tp_degree != num_gpus or num_gpus < 2:
        raise NfsearchError(f"profile: a TP profile on {num_gpus} GPUs needs a TP={num_gpus} workload "
                            f"(this one is TP={workload.tp_degree})")
    check_gpus(num_gpus, torch.cuda.device_count())
    t0 = time.time()
    log(f"TP={num_gpus} profile, part 1 of 2: the shard's ops on GPU 0")
    shard = measure_single_gpu(model, workload, 0, is_quick, output, progress, settings=settings, log=log,
                               with_pairs=with_pairs, pair_minority_sms=pair_minority_sms, opt_in_impls=opt_in_impls)
    gc.collect()                     # the shard's inputs (closures hold them in cycles)
    torch.cuda.empty_cache()         # the energy loops and the ranks below need GPU 0 too
    if with_energy and not shard.is_stopped:
        log(f"TP={num_gpus} profile: the shard's energy on GPU 0")
        shard.table = add_energy(model, workload, shard.table, 0, log, window_s=energy_window_s)
        if shard.table.energy is not None:
            shard.summary["energy"] = energy_summary(shard.table.energy)
        gc.collect()
        torch.cuda.empty_cache()
    log(f"TP={num_gpus} profile, part 2 of 2: the collectives on {num_gpus} GPUs at once")
    request = NetworkRequest(model, workload, is_quick, with_pairs, settings, None, pair_minority_sms,
                             progress if _is_picklable(progress) else None, net_impls=tuple(net_impls),
                             with_energy=with_energy and shard.table.energy is not None,
                             energy_window_s=energy_window_s)
    net = measure_network(request, "nccl")
    table = merge_tables(shard.table, network_table(net, "measured"), net, model, workload)
    summary = dict(shard.summary)
    summary["network"] = network_summary(table, net)
    summary["wall_s"] = round(time.time() - t0, 1)
    _print_network(summary["network"], table, log)
    if output:
        out = Path(output)
        (out.parent / (out.stem + ".summary.json")).write_text(json.dumps(summary, indent=1, default=str))
        table.write(out)
        if shard.checkpoint and not shard.is_stopped:
            shard.checkpoint.remove()
    return table


def measure_network(request: NetworkRequest, backend: str) -> NetworkRun:
    """Spawn one process per rank (backend nccl: one per GPU; gloo: CPU) and measure the collectives."""
    from nfsearch.runtime import tp
    n = request.workload.tp_degree
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "network.pkl"
        try:
            tp.spawn_ranks(network_rank_worker, n, backend, (str(out), request))
        except Exception as exc:  # noqa: BLE001 - a rank's failure becomes one line
            got = _read_pickle(out)
            detail = got.get("error") if isinstance(got, dict) else None
            detail = detail or (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise NfsearchError(f"profile --tp {n}: measuring the collectives failed: {detail}") from None
        got = _read_pickle(out)
    if not isinstance(got, NetworkRun):
        raise NfsearchError(f"profile --tp {n}: rank 0 returned no collective measurements")
    return got


def network_rank_worker(tp, out_path: str, request: NetworkRequest) -> None:
    """Rank body (tp: runtime.tp.TpRank): every rank measures; rank 0 writes the NetworkRun (or the error)."""
    try:
        run = measure_network_rank(tp, request)
    except Exception as exc:  # rank 0 hands the error to the parent, then fails
        if tp.is_first:
            Path(out_path).write_bytes(pickle.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]}))
        raise
    if tp.is_first:
        Path(out_path).write_bytes(pickle.dumps(run))


def measure_network_rank(tp, request: NetworkRequest) -> NetworkRun | None:
    """This rank's walk of the network plan, in lockstep with the others; rank 0 gets the combined run."""
    import torch
    import torch.distributed as dist

    from nfsearch.runtime import tp as tp_mod
    t0 = time.time()
    host = dist.new_group(backend="gloo")          # host-side agreement, beside the NCCL communicators
    is_cuda = tp.device.type == "cuda"
    say = _stderr if tp.is_first else (lambda msg: None)
    parts = None
    if is_cuda:
        from nfsearch.runtime.kernels import IMPLS, profiled_impls
        torch.manual_seed(0)
        parts = SmPartitions(tp.device.index, mode="green")
        num_sms, granularity = parts.num_sms, parts.granularity
        impls = profiled_impls()          # the pair sides: the impls the shard's profile measures by default
    else:
        num_sms, granularity = request.cpu_num_sms, request.cpu_granularity
        impls = {op: ("torch",) for op in ("kqv", "o", "ug", "d")}
    try:
        net_impls, notes = usable_net_impls(tp, request.net_impls, host)
        plan = profiling.network_plan(request.model, request.workload, num_sms, granularity, request.is_quick,
                                      impls, request.settings, request.with_pairs, request.sm_counts,
                                      request.pair_minority_sms, net_impls)
        ids = [None] * tp.world_size
        dist.all_gather_object(ids, (plan.identity({}), num_sms, granularity), group=host)
        if len(set(ids)) != 1:
            raise RuntimeError(f"the ranks planned different measurements (SM counts {[i[1] for i in ids]})")
        limits = cta_limits(plan, tp_mod.MAX_CTA_LIMIT)
        tp.coll.prepare(limits)                    # as execute_rank does: collective, before any timing
        if is_cuda:
            plan.rotate_bytes = 3.0 * float(getattr(torch.cuda.get_device_properties(tp.device), "L2_cache_size",
                                                    50 << 20))
            measurer = _tp_measurer_class(_Measurer)(torch, parts, plan, IMPLS, say, tp, host)
        else:
            measurer = _HostMeasurer(plan, tp, host)
        say(f"collectives on {tp.world_size} ranks ({tp.coll.backend}): {len(plan.points)} points "
            f"({len(plan.pair_points())} pair points), ~{plan.estimate_s():.0f} s expected; CTA limits "
            f"{limits or 'none'}")
        progress = request.progress if tp.is_first else None
        run = profiling.run_plan(plan, None, agreed(measurer, host, tp.world_size), progress, say,
                                 is_healthy=lambda: agree_all(_answers(measurer), host))
        energy_points, energy_notes, pair_energy_points = (), [], ()
        if is_cuda and request.with_energy and not run.stopped:
            energy_points, energy_notes = measure_collective_energy(tp, plan, run.results, request.workload, host,
                                                                    num_sms, measurer._inputs, say,
                                                                    request.energy_window_s)
            if request.with_pairs:
                pair_energy_points, pair_notes = measure_collective_pair_energy(tp, plan, run.results, host,
                                                                                measurer, say,
                                                                                request.energy_window_s)
                energy_notes += pair_notes
    finally:
        if parts is not None:
            parts.close()
    gpu = torch.cuda.get_device_name(tp.device) if is_cuda else "cpu"
    mine = {"results": run.results, "failures": run.failures, "stopped": run.stopped, "gpu": gpu}
    every = [None] * tp.world_size
    dist.all_gather_object(every, mine, group=host)
    if not tp.is_first:
        return None
    per_rank = [e["results"] for e in every]
    results = profiling.combine_ranks(per_rank)
    failures: dict[tuple, str] = {}
    for e in every:
        failures.update(e["failures"])
    for k in {k for r in per_rank for k in r} - set(results):
        failures.setdefault(k, "not measured on every rank")
    spread = max((max(r[k].time_ms for r in per_rank) / min(r[k].time_ms for r in per_rank) - 1.0
                  for k in results), default=0.0)
    return NetworkRun(plan, results, failures, next((e["stopped"] for e in every if e["stopped"]), ""),
                      [e["gpu"] for e in every], tp.coll.backend, tp_mod._nccl_version() if is_cuda else None,
                      limits, notes + list(tp.coll.notes) + energy_notes, round(time.time() - t0, 1), round(spread, 4),
                      tuple(net_impls), tuple(energy_points), tuple(pair_energy_points))


# ---------------------------------------------------------------------------------------------- energy
COLLECTIVE_ENERGY_TOKENS = 512     # beside the workload's token count: two points to interpolate between
COLLECTIVE_ENERGY_METHOD = (
    "Collectives ({ops}): measured afterwards with every GPU at once (one process per GPU): each all-reduce "
    "at {tokens} tokens with its impl fastest alone on the whole GPU, back to back on every rank in lockstep "
    "(power.measure_energy with a fixed number of chunks agreed over the ranks), NVML on every rank; per "
    "GPU, the largest rank's energy (a TP layer waits for its slowest GPU). This replaces 'not measured' above.")


def collective_energy_requests(plan: Plan, results: dict, workload, num_sms: int) -> list[tuple[int, str, float]]:
    """(tokens, impl, time ms) of each all-reduce energy point: the workload's token count and
    COLLECTIVE_ENERGY_TOKENS where the network plan's inputs cover them, each with the impl fastest alone
    on the whole GPU by `results` (the slowest rank's solo rows there), as add_energy picks a shard op's.
    The all-reduces of one layer move the same [tokens, hidden] rows: measured on the first, used for all."""
    op = plan.grid["network_ops"][0]
    max_tokens = max(t for t, _ in plan.sizes(op))
    out = []
    for tokens in sorted({workload.num_tokens, COLLECTIVE_ENERGY_TOKENS}):
        times = {p.impl: results[p.key()].time_ms for p in plan.points
                 if p.kind == "solo" and p.op == op and p.num_tokens == tokens and p.sm_count == num_sms
                 and p.key() in results}
        if tokens <= max_tokens and times:
            impl = min(times, key=times.get)
            out.append((tokens, impl, times[impl]))
    return out


def measure_collective_energy(tp, plan: Plan, results: dict, workload, host, num_sms: int, inputs_of,
                              say=None, window_s: float = WINDOW_S) -> tuple[tuple, list[str]]:
    """Every rank at once (all must call it at the same point): the energy of each all-reduce of
    `collective_energy_requests`, issued back to back in lockstep (power.lockstep_chunks: every rank
    issues the same calls, so no collective waits on a rank that stopped), NVML on every rank. Returns
    (energy.EnergyPoint of each network op at each request, notes); a point that fails on any rank is a
    note on all, and without NVML on every rank there are no points (a note)."""
    import torch
    import torch.distributed as dist

    say = say or (lambda msg: None)
    device, how = power.open_device(tp.device.index or 0)
    if not agree_all(device is not None, host):
        if device is not None:
            device.close()
        return (), [f"collectives' energy not measured: NVML does not answer on every rank ({how})"]
    shared = [collective_energy_requests(plan, results, workload, num_sms) if tp.is_first else None]
    dist.broadcast_object_list(shared, src=0, group=host)        # rank 0's choice, so every rank issues the same
    requests = shared[0]
    nets = list(plan.grid["network_ops"])
    say(f"collectives' energy on {tp.world_size} GPUs at once: " + ", ".join(f"{t} tok/{i}" for t, i, _ in requests))
    points, notes = [], []
    try:
        for tokens, impl, time_ms in requests:
            call, num_sets = inputs_of(nets[0]).fn(impl, tokens, 0, num_sms)
            calls = itertools.count()
            per_chunk, num_chunks = power.lockstep_chunks(agree_max(time_ms, host), window_s=window_s)
            try:
                m = power.measure_energy(lambda call=call, calls=calls, n=num_sets: call(next(calls) % n), device,
                                         window_s=window_s, calls_per_chunk=per_chunk, num_chunks=num_chunks)
                mine = (m.energy_j, m.time_ms, m.power_w, m.samples.sm_clock_mhz, m.samples.capped_share)
            except Exception as exc:  # noqa: BLE001 - every call was issued; told to every rank below
                torch.cuda.synchronize(tp.device)
                mine = f"{type(exc).__name__}: {str(exc)[:160]}"
            every = [None] * tp.world_size
            dist.all_gather_object(every, mine, group=host)
            failed = next((e for e in every if isinstance(e, str)), None)
            if failed is not None:
                notes.append(f"collective energy {tokens} tok/{impl}: {failed}")
                continue
            energy_j, call_ms, power_w, clock, capped = max(every, key=lambda e: e[0])
            points += [EnergyPoint(op, impl, tokens, 0, energy_j, call_ms, power_w, clock, capped) for op in nets]
    finally:
        device.close()
    return tuple(points), notes


COLLECTIVE_PAIR_ENERGY_METHOD = (
    "Collective pairs: each collective family of the pair table (an all-reduce beside a GEMM or decode "
    "attention) at its best split, a CUDA graph of rounds of both sides launched together (each round "
    "joins both), then one of the two back to back on the whole GPU (each with its fastest impl there), "
    "replayed on every rank in lockstep (fixed chunks agreed over the ranks), NVML on every rank; per "
    "family the rank that spent the most in the pair, with its own back to back.")


def collective_pair_families(plan: Plan, per_rank_results: list[dict]) -> list:
    """The collective families (pairs.FamilyResult) of the network plan's pair points, each at its
    best split by the slowest rank's times (measurements.combine_ranks): the same list on every rank."""
    points = profiling.pair_points_of(plan, profiling.combine_ranks(per_rank_results))
    return list(pair_table.make_report(points, is_network=True).families)


def measure_collective_pair_energy(tp, plan: Plan, results: dict, host, measurer, say=None,
                                   window_s: float = WINDOW_S) -> tuple[tuple, list[str]]:
    """Every rank at once (all must call it at the same point, after the network plan ran): the
    energy of overlap of each collective family (COLLECTIVE_PAIR_ENERGY_METHOD), as
    profiler._pair_energy_point measures a shard family (profiler.pair_energy_graphs), the graphs
    replayed in lockstep. Graphs, not eager calls: issued eagerly, the host cost of a collective (a
    copy-engine one most) left the GPU idle between rounds (2x H100: 0.51 ms per round of a 0.05 ms
    pair, at 276 W). `results`: this rank's measurements of the plan; `measurer`: the TP measurer
    that ran it (its green partitions, inputs and fastest-impl cache). Returns
    (energy.PairEnergyPoint per family, notes); a family that fails on any rank is a note on all."""
    import torch
    import torch.distributed as dist

    say = say or (lambda msg: None)
    every = [None] * tp.world_size
    dist.all_gather_object(every, results, group=host)
    families = collective_pair_families(plan, every)
    if not families:
        return (), []
    device, how = power.open_device(tp.device.index or 0)
    if not agree_all(device is not None, host):
        if device is not None:
            device.close()
        return (), [f"collective pairs' energy not measured: NVML does not answer on every rank ({how})"]
    say(f"energy of overlap with the collectives on {tp.world_size} GPUs at once: {len(families)} families")
    full = measurer.parts.num_sms
    s_full = measurer.parts.stream(full)
    points, notes = [], []
    try:
        for f in families:
            a, b, best = f.a, f.b, f.best
            graphs, mine = None, None
            try:
                # back to back: each side's fastest impl on the whole GPU (the measurer's cache, where
                # the ranks agreed on the collective's)
                impl_a_full = measurer._fastest(a.op, a.num_tokens, a.context, full, s_full)[0]
                impl_b_full = measurer._fastest(b.op, b.num_tokens, b.context, full, s_full)[0]
                graphs = pair_energy_graphs(torch, measurer, f, impl_a_full, impl_b_full)
            except Exception as exc:  # noqa: BLE001 - no replay issued yet: every rank skips this family below
                torch.cuda.synchronize(tp.device)
                mine = f"{type(exc).__name__}: {str(exc)[:160]}"
            if agree_all(mine is None, host):
                together, in_turn, k = graphs
                try:
                    measured = []
                    for graph, ms in ((together, best.makespan_ms), (in_turn, f.back_to_back_ms)):
                        per_chunk, num_chunks = power.lockstep_chunks(agree_max(k * ms, host), window_s=window_s)
                        m = power.measure_energy(graph.replay, device, calls_per_fn=k, window_s=window_s,
                                                 calls_per_chunk=per_chunk, num_chunks=num_chunks)
                        measured.append((m.energy_j, m.time_ms, m.power_w, m.samples.sm_clock_mhz,
                                         round(m.samples.capped_share, 3)))
                    mine = tuple(measured)
                except Exception as exc:  # noqa: BLE001 - lockstep issued every call; told to every rank below
                    torch.cuda.synchronize(tp.device)
                    mine = f"{type(exc).__name__}: {str(exc)[:160]}"
            else:
                mine = mine or "another rank could not capture this family"
            del graphs
            got = [None] * tp.world_size
            dist.all_gather_object(got, mine, group=host)
            failed = next((g for g in got if isinstance(g, str)), None)
            if failed is not None:
                notes.append(f"collective pair energy {f.name}: {failed}")
                say(f"  pair energy {f.name}: FAILED {failed}")
                continue
            (e, t, w, clock, capped), (e2, t2, w2, clock2, capped2) = max(got, key=lambda g: g[0][0])
            points.append(PairEnergyPoint(a.op, a.num_tokens, a.context, best.sms_a, best.impl_a,
                                          b.op, b.num_tokens, b.context, best.sms_b, best.impl_b,
                                          e, t, w, e2, t2, w2, clock, capped, clock2, capped2))
            say(f"  pair energy {f.name} at {best.sms_a}+{best.sms_b}: {e * 1e3:.3f} mJ in {t:.4f} ms "
                f"({w:.0f} W) against back to back {e2 * 1e3:.3f} mJ in {t2:.4f} ms ({w2:.0f} W)")
    finally:
        device.close()
    return tuple(points), notes


def usable_net_impls(tp, wanted: tuple[str, ...], host) -> tuple[tuple[str, ...], list[str]]:
    """The collective impls of `wanted` that every rank can run: "ce" needs peer memory and stream
    memory operations on every GPU (a trial CeAllReduce of one row, made and dropped here, collective);
    (impls, notes saying what was dropped and why)."""
    if CE_IMPL not in wanted:
        return tuple(wanted), []
    import torch
    from nfsearch.runtime.ce_collectives import CeAllReduce
    dtype = torch.bfloat16 if tp.device.type == "cuda" else torch.float32
    err = None
    try:
        CeAllReduce(tp.coll.group, 1, 8, dtype, tp.device, num_slots=1)
    except Exception as exc:  # noqa: BLE001 - told to every rank below; the profile keeps nccl
        err = f"{type(exc).__name__}: {exc}"[:200]
    if agree_all(err is None, host):
        return tuple(wanted), []
    return tuple(i for i in wanted if i != CE_IMPL), [f"impl ce not measured: not every rank could set it up"
                                                       + (f" (here: {err})" if err else "")]


def cta_limits(plan: Plan, max_ctas: int) -> list[int]:
    """The CTA-limited communicators the plan's collectives need: every SM count a collective runs on
    below the whole GPU, up to max_ctas (what `nfsearch run` prepares for a plan's network nano-ops)."""
    nets = set(plan.grid["network_ops"])
    sms = {p.sm_count for p in plan.points if p.op in nets}
    sms |= {p.partner_sms for p in plan.points if p.kind == "pair" and p.partner_op in nets}
    return sorted(s for s in sms if 0 < s < plan.num_sms and s <= max_ctas)


# ---------------------------------------------------------------------------------------------- agreement
def agreed(measure, host, world_size: int):
    """measure(point) that fails on every rank when it fails on any (their collectives stay matched)."""
    import torch.distributed as dist

    def run(point: Point) -> Measurement:
        m, err = None, None
        try:
            m = measure(point)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - told to every rank below
            err = f"{type(exc).__name__}: {exc}"[:300]
        errors = [None] * world_size
        dist.all_gather_object(errors, err, group=host)
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if bad:
            raise RuntimeError(f"rank {bad[0][0]}: {bad[0][1]}")
        return m

    return run


def agree_max(value: float, host) -> float:
    import torch
    import torch.distributed as dist
    x = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=host)
    return float(x.item())


def agree_max_list(values: list[float], host) -> list[float]:
    """Element-wise largest of equally long lists over the ranks."""
    import torch
    import torch.distributed as dist
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=host)
    return [float(v) for v in x.tolist()]


def agree_all(ok: bool, host) -> bool:
    return agree_max(0.0 if ok else 1.0, host) == 0.0


def _answers(measurer) -> bool:
    try:
        return bool(measurer.is_healthy())
    except Exception:  # noqa: BLE001 - a device that raises does not answer
        return False


def _tp_measurer_class(base):
    """The single-GPU profiler's _Measurer with collective inputs and the cross-rank hooks."""

    class TpMeasurer(base):
        def __init__(self, torch, parts, plan, impls, log, tp, host):
            super().__init__(torch, parts, plan, impls, log, device=str(tp.device))
            self.tp, self.host = tp, host
            self.net_ops = set(plan.grid["network_ops"])

        def _inputs(self, op: str):
            if op in self.net_ops:
                if op not in self.inputs:
                    self.inputs[op] = _CollectiveInputs(self.t, self.plan, op, self.tp, self.parts.num_sms, self.dev)
                return self.inputs[op]
            return super()._inputs(op)

        def _is_shared(self, key) -> bool:
            # pairs (key None) always hold a collective here; solo calls only when of a collective
            return key is None or key[0] in self.net_ops

        def _agree_max(self, value: float, key) -> float:
            return agree_max(value, self.host) if self._is_shared(key) else value

        def _align(self, key) -> None:
            if self._is_shared(key):
                import torch.distributed as dist
                self.t.cuda.synchronize()
                dist.barrier(group=self.host)

        def solo(self, fn, stream, nsets, host_key, warm=None, reps=None) -> list[float]:
            # a collective's times are the slowest rank's, call by call: a pair side's fastest impl
            # (profiler._fastest) is then the same on every rank, so every rank issues the same collective
            times = super().solo(fn, stream, nsets, host_key, warm, reps)
            return agree_max_list(times, self.host) if self._is_shared(host_key) else times

    return TpMeasurer


class _CollectiveInputs:
    """The all-reduce of a network op: rotating [tokens, hidden] slices of one zero pool (zeros: sums
    stay finite however often they are reduced); fn(impl, tokens, context, sms) -> (call(i), sets).
    Impl "ce": one CeAllReduce over the pool's rows (made here, collectively: every rank builds the
    inputs of an op at the same point of the plan), set i reduced through receive rows of its own."""

    def __init__(self, torch, plan: Plan, op: str, tp, whole_gpu_sms: int, device):
        self.plan, self.op, self.coll, self.whole_gpu_sms = plan, op, tp.coll, whole_gpu_sms
        rows = max(profiling.rotation_sets(plan, op, t, c) * t for t, c in plan.sizes(op))
        dtype = torch.bfloat16 if device != "cpu" else torch.float32
        self.pool = torch.zeros(rows, plan.model.hidden_size, device=device, dtype=dtype)
        self.ce = None
        if CE_IMPL in plan.impls.get(op, ()):
            from nfsearch.runtime.ce_collectives import CeAllReduce
            self.ce = CeAllReduce(tp.coll.group, rows, plan.model.hidden_size, dtype, tp.device, num_slots=1)

    def fn(self, impl: str, tok: int, ctx: int, sms: int):
        ns = profiling.rotation_sets(self.plan, self.op, tok, ctx)
        bufs = [self.pool[i * tok:(i + 1) * tok] for i in range(ns)]
        if impl == CE_IMPL and self.ce is not None:
            ce = self.ce
            return (lambda i: ce.all_reduce_norm(bufs[i % ns], (i % ns) * tok, (i % ns + 1) * tok,
                                                 num_sms=sms)), ns
        if impl != NETWORK_IMPL:
            raise ValueError(f"no collective impl {impl!r} here (this plan's: {self.plan.impls.get(self.op)})")
        group = self.coll.group_for(sms, self.whole_gpu_sms)
        return (lambda i: self.coll.all_reduce_rows(bufs[i % ns], 0, tok, group)), ns


class _HostMeasurer:
    """CPU ranks (gloo): each point's calls run for real (gloo all-reduces, torch matmuls), timed by the
    host clock after a barrier. The numbers mean nothing; the rank loop, agreement and hand-over run."""

    def __init__(self, plan: Plan, tp, host):
        import torch
        self.t, self.plan, self.tp, self.host = torch, plan, tp, host
        self.repeats = plan.settings.repeats
        self.coll_inputs = {op: _CollectiveInputs(torch, plan, op, tp, plan.num_sms, "cpu")
                            for op in plan.grid["network_ops"]}
        self.gemms = {}

    def is_healthy(self) -> bool:
        return True

    def _gemm(self, op: str, tok: int):
        if op not in self.gemms:
            o = self.plan.ops[op]
            self.gemms[op] = (self.t.randn(max(t for t, _ in self.plan.sizes(op)), o.gemm_k), self.t.randn(o.gemm_k, o.gemm_n))
        a, w = self.gemms[op]
        return lambda: a[:tok] @ w

    def _time(self, fn, is_shared: bool) -> float:
        import torch.distributed as dist
        fn()
        if is_shared:
            dist.barrier(group=self.host)
        times = []
        for _ in range(self.repeats):
            h = time.perf_counter()
            fn()
            times.append((time.perf_counter() - h) * 1e3)
        return statistics.median(times)

    def __call__(self, p: Point) -> Measurement:
        if p.kind == "solo":
            call, _ = self.coll_inputs[p.op].fn(p.impl, p.num_tokens, p.context, p.sm_count)
            return Measurement(self._time(lambda: call(0), True))
        if p.kind != "pair":
            raise ValueError(f"no {p.kind} points in a network plan")
        gemm = self._gemm(p.op, p.num_tokens)
        impl = CE_IMPL if p.partner_sms == 0 else NETWORK_IMPL
        call, _ = self.coll_inputs[p.partner_op].fn(impl, p.partner_tokens, p.partner_context, p.partner_sms)
        part_a, part_b = self._time(gemm, False), self._time(lambda: call(0), True)

        def both():
            gemm()
            call(0)
        together = self._time(both, True)
        return Measurement.of_pair(self.plan.pair_point(
            p, "torch", impl, corun_a_ms=part_a, corun_b_ms=max(together, part_b),
            makespan_ms=max(together, part_a, part_b), part_a_ms=part_a, part_b_ms=part_b, full_a_ms=part_a,
            full_b_ms=part_b))


# ---------------------------------------------------------------------------------------------- the table
def network_table(net: NetworkRun, source: str) -> ProfileTable:
    """The collectives' rows and pair table (measurements.assemble_table on the network plan)."""
    device = {"gpu_name": net.gpus[0], "source": source}
    return profiling.assemble_table(net.plan, net.results, device, net.failures, net.stopped)


def bus_bandwidth_gbps(table: ProfileTable, model, workload) -> float | None:
    """The highest NCCL bus bandwidth (GB/s: 2 (n - 1) / n x bytes / time) among the table's full-GPU
    rows of collectives; None without any."""
    nets = {op.name: op for op in layer_ops(model, workload) if op.op_class == "network"}
    rows = table.rows[(table.rows["op"].isin(list(nets))) & (table.rows["co_class"] == "")
                      & (table.rows["sm_count"] == int(table.meta["num_sms"]))
                      & (table.rows["impl"] == NETWORK_IMPL)]
    rates = [op_work(nets[r.op], model, workload, int(r.num_tokens), 0).net_bytes / (float(r.time_ms) * 1e6)
             for r in rows.itertuples()]
    return max(rates) if rates else None


def merge_tables(shard: ProfileTable, network: ProfileTable, net: NetworkRun, model, workload) -> ProfileTable:
    """One table: the shard's rows and pairs with the collectives' rows and pairs (see the module doc)."""
    for key in ("num_sms", "sm_granularity"):
        if int(shard.meta[key]) != int(network.meta[key]):
            raise NfsearchError(f"profile --tp: GPU 0 has {key} {shard.meta[key]}, the ranks "
                                f"{network.meta[key]}: not one kind of GPU")
    net_ops = list(net.plan.grid["network_ops"])
    net_rows = network.rows[network.rows["op"].isin(net_ops)]
    if net_rows.empty:
        raise NfsearchError(f"profile --tp: no collective was measured ({len(net.failures)} failures"
                            + (f"; first: {next(iter(net.failures.values()))}" if net.failures else "") + ")")
    clash = set(shard.rows["op"]) & set(net_ops)
    if clash:
        raise NfsearchError(f"profile --tp: the shard's table already has rows for {', '.join(sorted(clash))}")
    rows = pd.concat([shard.rows, net_rows], ignore_index=True)
    meta = dict(shard.meta)
    shard_points = pair_table.points_from_meta(shard.meta, "shard profile")
    net_points = pair_table.points_from_meta(network.meta, "collective measurements")
    if shard_points or net_points:
        s_entry, n_entry = shard.meta.get("pairs") or {}, network.meta.get("pairs") or {}
        method = " ".join(m for m in (s_entry.get("method"), NET_PAIR_METHOD if net_points else None) if m)
        meta["pairs"] = pair_table.pairs_meta(
            shard_points + net_points, method, int(s_entry.get("failures", 0)) + int(n_entry.get("failures", 0)),
            list(s_entry.get("failure_examples", [])) + list(n_entry.get("failure_examples", [])))
    from nfsearch.runtime import tp as tp_mod
    bus = bus_bandwidth_gbps(ProfileTable(rows, meta), model, workload)
    meta["network"] = {
        "tp_degree": workload.tp_degree, "gpus": net.gpus, "backend": net.backend, "nccl": net.nccl,
        "impls": list(net.net_impls), "ops": net_ops, "cta_limits": net.cta_limits,
        "method": NET_SOLO_METHOD.format(max_ctas=tp_mod.MAX_CTA_LIMIT) + ". " + NET_PAIR_METHOD,
        "grid": {k: net.plan.grid[k] for k in ("sm_counts", "tokens", "pair_families", "pair_splits")},
        "bus_bandwidth_gbps": None if bus is None else round(bus, 2),
        "bus_bandwidth_source": "highest bus bandwidth among the full-GPU all-reduce rows of this profile",
        "failures": len(net.failures), "stopped": net.stopped or None, "notes": net.notes,
        "measure_s": net.measure_s, "rank_spread": net.rank_spread,
        "rows_from": "collectives: the slowest rank per point; other ops: GPU 0"}
    meta["gpus"] = net.gpus
    if bus is not None:
        meta["net_bandwidth_gbps"] = round(bus, 2)     # B_net of the roofline (profile.gpu_from_profile)
    if net.failures:
        meta["failures"] = int(meta.get("failures", 0)) + len(net.failures)
    table = ProfileTable(rows, meta)
    if net.energy_points and table.energy is not None:
        # the collectives' points beside the shard's (GPU 0's limit and static power: the bound is per GPU)
        energy = table.energy
        tokens = sorted({p.num_tokens for p in net.energy_points})
        method = COLLECTIVE_ENERGY_METHOD.format(ops=", ".join(net_ops), tokens=", ".join(map(str, tokens)))
        if net.pair_energy_points:
            method += " " + COLLECTIVE_PAIR_ENERGY_METHOD
        table = table.with_energy(dataclasses.replace(
            energy, points=tuple(sorted(energy.points + tuple(net.energy_points), key=lambda p: p.key)),
            pair_points=energy.pair_points + tuple(net.pair_energy_points),
            method=f"{energy.method}. {method}"))
    return table


def network_summary(table: ProfileTable, net: NetworkRun) -> dict:
    """The collectives' key numbers: solo times by tokens and SM count, bus bandwidth, the pair report."""
    nets = net.plan.grid["network_ops"]
    solo = table.rows[table.rows["op"].isin(nets) & (table.rows["co_class"] == "")]
    by_op = {op: {f"{int(r.num_tokens)}@{int(r.sm_count)}": round(float(r.time_ms), 5)
                  for r in solo[solo["op"] == op].itertuples()} for op in nets}
    points = pair_table.points_from_meta(table.meta)
    report = pair_table.make_report(points, True, str(table.meta["gpu_name"]))
    return {**table.meta["network"], "solo_ms": by_op, "pairs": report.to_dict()}


def _print_network(s: dict, table: ProfileTable, log) -> None:
    log(f"\n== collectives on {s['tp_degree']}x {s['gpus'][0]} (NCCL {s['nccl']}): bus bandwidth "
        f"{s['bus_bandwidth_gbps']} GB/s, {s['failures']} failures, {s['measure_s']} s ==")
    for op, at in s["solo_ms"].items():
        log(f"  {op} ms (tokens@SMs): " + ", ".join(f"{k} {v:.4f}" for k, v in at.items()))
    points = pair_table.points_from_meta(table.meta)
    if any(pair_table.is_network_family(p.a, p.b) for p in points):
        log(pair_table.format_report(pair_table.make_report(points, True, str(table.meta["gpu_name"]))))


# ---------------------------------------------------------------------------------------------- helpers
def _is_picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:  # noqa: BLE001 - lambdas, closures: the ranks then report no progress
        return False


def _read_pickle(path: Path):
    try:
        return pickle.loads(path.read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        return None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)



# ---------------------------------------------------------------------------------------------- GPU-run report
def report_steps(out_dir: str | Path, stem: str = "x") -> tuple[dict, str]:
    """The results of one profile -> analyze --pairs -> solve -> run sequence in `out_dir` (each step's
    output where it was written; `steps.txt`: "name rc seconds" per step) as one dict and a short
    table. Steps that failed or never ran are reported as such."""
    out = Path(out_dir)

    def read(name: str):
        try:
            return json.loads((out / name).read_text())
        except (OSError, ValueError):
            return None

    steps = []
    try:
        for line in (out / "steps.txt").read_text().splitlines():
            name, rc, secs = line.split()[:3]
            steps.append({"step": name, "rc": int(rc), "s": int(secs)})
    except (OSError, ValueError):
        pass
    summary, pairs, plan, run = (read(f"{stem}.summary.json"), read("pairs.json"), read("plan.json"),
                                 read("run/run.json"))
    net = (summary or {}).get("network") or {}
    result = {"steps": steps, "network": net, "pairs_network": pairs, "shard_profile_s": (summary or {}).get("measure_s"),
              "profile_wall_s": (summary or {}).get("wall_s"), "plan_predicted": (plan or {}).get("predicted"),
              "run": run}
    lines = [f"{'step':<9}{'rc':>4}{'s':>6}"] + [f"{s['step']:<9}{s['rc']:>4}{s['s']:>6}" for s in steps]
    if net:
        solo = net.get("solo_ms", {}).get("allreduce_o", {})
        lines.append(f"network: {net.get('tp_degree')}x {(net.get('gpus') or ['?'])[0]}, NCCL {net.get('nccl')}, "
                     f"bus {net.get('bus_bandwidth_gbps')} GB/s; allreduce_o ms " +
                     ", ".join(f"{k} {v:.4f}" for k, v in solo.items()))
    if pairs:
        best = min(pairs.get("families", []), key=lambda f: f["ratio"], default=None)
        lines.append(f"collective x GEMM families where the split pays: {pairs.get('num_paying')} of "
                     f"{pairs.get('num_families')}" + (f"; best {best['family']} {best['best_sms_a']}+"
                                                       f"{best['best_sms_b']} ratio {best['ratio']}" if best else ""))
    if plan and plan.get("predicted"):
        p = plan["predicted"]
        nets = {o.get("impl") for o in plan.get("nano_ops", []) if str(o.get("op", "")).startswith("allreduce")}
        lines.append(f"plan: predicted {p['layer_time_ms']:.3f} ms/layer vs sequential "
                     f"{p['sequential_layer_time_ms']:.3f}; collectives impl {sorted(map(str, nets))}")
    if run:
        lines.append(format_run_line(run))
    text = "\n".join(lines)
    return result, text


def format_run_line(run: dict) -> str:
    if "measured_layer_ms" not in run:
        return f"run: correctness {run.get('correctness', {}).get('passed')} (no timing)"
    b = run.get("baselines", {})
    return (f"run: measured {run['measured_layer_ms']:.3f} ms/layer, predicted {run.get('predicted_layer_ms') or 0:.3f} "
            f"(error {100 * (run.get('prediction_error') or 0):+.1f}%); seq-torch "
            f"{b.get('seq_torch', {}).get('layer_ms', 0):.3f} (x{run.get('speedup_vs_seq_torch', 0):.3f}), seq-same "
            f"{b.get('seq_same', {}).get('layer_ms', 0):.3f} (x{run.get('speedup_vs_seq_same', 0):.3f}); correctness "
            f"{run.get('correctness', {}).get('passed')} (max rel err {run.get('correctness', {}).get('max_rel_error', 0):.2g})")


if __name__ == "__main__":        # python -m nfsearch.runtime.tp_profile report OUT_DIR: one JSON + a table
    if len(sys.argv) != 3 or sys.argv[1] != "report":
        sys.exit("usage: python -m nfsearch.runtime.tp_profile report OUT_DIR")
    data, table_text = report_steps(sys.argv[2])
    (Path(sys.argv[2]) / "result.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(table_text)
