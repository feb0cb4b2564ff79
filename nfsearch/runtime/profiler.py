"""Measure a profile table on the GPU: `measure_profile(model, workload, ...) -> ProfileTable`.

The plan (which points), the checkpoint and the table assembly live in
nfsearch/runtime/measurements.py; this module times the points:

* every measurement of an impl at sm_count s runs on the green-context stream of s SMs
  (SmPartitions.stream(s); the full GPU is a plain stream); "triton" impls also get num_sms=s;
* inputs per op are built once at the largest size and sliced; calls rotate among several input
  sets (disjoint row windows of one pool, separate weight copies) so that a call's data has left
  the L2 cache when it comes back;
* timing: CUDA events between back-to-back calls on the measuring stream, after warm-up; a sleep
  kernel first lets the host enqueue the calls ahead of the GPU, and the host timestamps are
  checked afterwards, so launch overhead is not measured as kernel time (retried with a longer
  lead if it might have been); the statistic is the median;
* co-run: one split per pair (decode attention on m SMs, the compute op on the remainder); the
  timed op runs while the other side repeats back to back for the whole window (checked: the
  background ends after the timed op); the op's time alone on the same split stream is kept too;
* pairs (the pair table): one two-way split per point; each side's impls are timed alone on its side
  of the split and on the whole GPU (cached per op, size and SM count), the fastest runs; then both
  sides are launched together (a start event on A's stream that B's stream waits on, one call each,
  an end event per stream; the next launch waits for both), `pair_repeats` times after a lead that
  lets the host enqueue all of them; the SM clock is read right after (a spin kernel's cycles over
  its event time, and NVML's reading when pynvml is there). A side of 0 SMs (a copy-engine
  collective, which holds no share) runs on a plain stream beside the other side on the whole GPU;
* ceilings: cuBLAS bf16 GEMM 8192^3 and a 1 GiB device-to-device copy (bytes read + written);
* energy (`add_energy`, after the timings, or alone with `profile --energy-only`): each op at the W1-W3
  and workload token counts on the whole GPU with its fastest impl, a CUDA graph of ~2 ms of calls
  replayed back to back for an NVML energy-counter window (runtime/power.py), then the static power.
  A TP profile (runtime/tp_profile.py) gets the same on GPU 0 for the shard's ops (their TP shapes);
  its collectives are not measured here (one GPU alone cannot run them): tp_profile measures them
  afterwards with every GPU at once, and where it could not the power bound counts them as no
  dynamic energy.

Every point is measured on its own: an exception fails that point (recorded in the table's metadata
and the summary), not the profile; a run of failures stops the profile only when the device no
longer answers, and what was measured is still written.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import inspect
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nfsearch import pairs as pair_table
from nfsearch.energy import EnergyPoint, PairEnergyPoint, ProfileEnergy
from nfsearch.errors import NfsearchError
from nfsearch.graph import layer_ops
from nfsearch.plan import ENGINE_IMPLS
from nfsearch.runtime import measurements as profiling
from nfsearch.runtime import power
from nfsearch.runtime.measurements import COMPUTE_BACKGROUND, MEMORY_BACKGROUND, Measurement, Point
from nfsearch.runtime.partitions import SmPartitions, capture_rounds
from nfsearch.specs import Ceilings

MAX_LEAD_MS = 80.0          # solo: the host's head start for `repeats` calls
MAX_CORUN_LEAD_MS = 1000.0  # co-run: up to hundreds of background calls go in first
CLOCK_CYCLES = 1_000_000    # the spin kernel that reads the SM clock (~0.5 ms at 2 GHz)


def measure_profile(model, workload, gpu_id: int = 0, is_quick: bool = False, output=None, progress=None,
                    ops=None, sm_counts=None, settings=None, log=None, with_pairs: bool = True,
                    pair_minority_sms=None, with_energy: bool = False, opt_in_impls: tuple[str, ...] = ()):
    """Measure the profile of `model` (grid covering W1-W3 and `workload`) on CUDA device `gpu_id`;
    with_energy: then its energy (add_energy: a few seconds; a note and none without NVML).

    output: the table's path; the checkpoint `<output>.partial.csv` and the summary
    `<output-stem>.summary.json` go beside it, and the table is written there too (then the
    checkpoint is removed, unless the run stopped early on a device that no longer answered: a
    second run resumes it). ops / sm_counts / pair_minority_sms restrict the grid (tests);
    with_pairs: measure the pair table. progress(done, total, eta_s, what) is called as points finish.
    opt_in_impls: impls of plan.OPT_IN_IMPLS to measure too (not measured unless named).
    """
    log = log or _stderr
    run = measure_single_gpu(model, workload, gpu_id, is_quick, output, progress, ops, sm_counts, settings, log,
                             with_pairs, pair_minority_sms, opt_in_impls)
    if with_energy and not run.is_stopped:
        run.table = add_energy(model, workload, run.table, gpu_id, log)
        if run.table.energy is not None:
            run.summary["energy"] = energy_summary(run.table.energy)
    if output:
        out = Path(output)
        (out.parent / (out.stem + ".summary.json")).write_text(json.dumps(run.summary, indent=1, default=str))
        run.table.write(out)
        if run.checkpoint and not run.is_stopped:
            run.checkpoint.remove()          # a finished profile leaves no checkpoint (failed points included)
    return run.table


@dataclass
class SingleGpuRun:
    """What one GPU's profile run gave: the table, its summary, and the checkpoint (still on disk)."""
    table: object                    # ProfileTable
    summary: dict
    checkpoint: object | None        # measurements.Checkpoint, or None without an output path
    is_stopped: bool                 # stopped early on a device that no longer answered


def measure_single_gpu(model, workload, gpu_id: int = 0, is_quick: bool = False, output=None, progress=None,
                       ops=None, sm_counts=None, settings=None, log=None, with_pairs: bool = True,
                       pair_minority_sms=None, opt_in_impls: tuple[str, ...] = ()) -> SingleGpuRun:
    """measure_profile's measuring part: the table and summary, nothing written but the checkpoint
    `<output>.partial.csv` (left for the caller to remove once its own output is written).
    opt_in_impls: impls of plan.OPT_IN_IMPLS to measure too (kernels.profiled_impls)."""
    import torch

    from nfsearch.runtime.kernels import IMPL_NOTES, IMPLS, profiled_impls

    log = log or _stderr
    t_start = time.time()
    torch.cuda.set_device(gpu_id)
    torch.manual_seed(0)
    parts = SmPartitions(gpu_id, mode="green")
    try:
        device = device_meta(torch, parts, gpu_id)
        notes = {i: IMPL_NOTES[i] for i in opt_in_impls if i in IMPL_NOTES}
        if notes:
            device["impl_notes"] = notes
        plan = profiling.make_plan(model, workload, parts.num_sms, parts.granularity, is_quick=is_quick, ops=ops,
                                   impls=profiled_impls(opt_in_impls), settings=settings,
                                   sm_counts=sm_counts, with_pairs=with_pairs, pair_minority_sms=pair_minority_sms)
        plan.rotate_bytes = 3.0 * device["l2_bytes"]
        log(f"profile {model.name} on {device['gpu_name']} ({parts.num_sms} SMs, granularity {parts.granularity}): "
            f"{len(plan.points)} points ({len(plan.pair_points())} pair points), ~{plan.estimate_s():.0f} s "
            f"of GPU work expected; impls: " + ", ".join(f"{op} {'/'.join(v)}" for op, v in plan.impls.items()))
        checkpoint = None
        if output:
            checkpoint = profiling.Checkpoint(profiling.checkpoint_path(output), plan.identity(device), log)
        measurer = _Measurer(torch, parts, plan, IMPLS, log)
        device["smi_before"] = _smi_clocks(gpu_id)
        run = profiling.run_plan(plan, checkpoint, measurer, progress, log, is_healthy=measurer.is_healthy)
        device["smi_after"] = _smi_clocks(gpu_id)
    finally:
        parts.close()
    results, failures = run.results, run.failures
    device["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    device["nvml_clock"] = measurer.nvml_note
    table = profiling.assemble_table(plan, results, device, failures, run.stopped)
    wall = time.time() - t_start
    summary = profiling.summarize(plan, results, table, wall, " ".join(sys.argv), failures)
    summary["measure_s"] = round(wall, 1)
    summary["lead_retries"] = measurer.gap_retries
    if failures:
        summary["failure_examples"] = [f"{k}: {v}" for k, v in list(failures.items())[:10]]
    _print_summary(summary, log)
    return SingleGpuRun(table, summary, checkpoint, bool(run.stopped))


# ------------------------------------------------------------------------------------ energy
ENERGY_GRAPH_MS = 2.0       # one CUDA graph of an energy point holds calls worth about this much GPU time
MAX_ENERGY_GRAPH_CALLS = 64
PAIR_ENERGY_OVERHEAD_S = 0.5    # an energy window's cost beyond its length (warm-up, captures, counter updates)


def energy_summary(energy) -> dict:
    """The summary.json entry of a profile's energy (energy.ProfileEnergy)."""
    return {"power_limit_w": energy.power_limit_w, "static_power_w": energy.static_power_w,
            "points": len(energy.points), "pair_points": len(energy.pair_points), "failures": list(energy.failures)}


def add_energy(model, workload, table, gpu_id: int = 0, log=None, window_s: float | None = None,
               with_pairs: bool = True):
    """`table` with its energy measured on CUDA device `gpu_id` (meta["energy"], energy.ProfileEnergy):
    each op at the token counts of W1-W3 and `workload` (measurements.energy_requests) run back to back
    on the whole GPU with its fastest impl, the power limit and the static power (runtime/power.py says
    how). Points the table already has are replaced, others kept. Without NVML the table comes back as
    it was and `log` says why (a note, not an error).

    A TP workload (the shard profile of runtime/tp_profile.py, or a TP profile with --energy-only): the
    same on this one GPU for the shard's ops at their TP shapes (graph.tp_shard, as the table's kernel
    rows); the network ops are left out (their energy is not one GPU's to measure), which the energy's
    method says and the power bound reads as no dynamic energy (energy_model.EnergyModel).

    with_pairs, where the table has a pair table: then the energy of overlap (_pair_energy_points),
    about 1.5 s per pair family."""
    import torch

    from nfsearch.runtime.kernels import IMPLS

    log = log or _stderr
    window_s = power.WINDOW_S if window_s is None else window_s
    if table.is_analytic:
        raise NfsearchError("energy is added to a measured profile, not to an analytic one")
    table_tp = int(table.meta.get("tp_degree") or 1)
    if table_tp != workload.tp_degree:
        raise NfsearchError(f"the profile is of a TP={table_tp} shard, the workload {workload.name} is "
                            f"TP={workload.tp_degree}: energy is measured at the profile's shapes (give a "
                            f"TP={table_tp} workload)")
    torch.cuda.set_device(gpu_id)
    props = torch.cuda.get_device_properties(gpu_id)
    name, num_sms = torch.cuda.get_device_name(gpu_id), int(props.multi_processor_count)
    if name != table.meta["gpu_name"] or num_sms != table.info.num_sms:
        raise NfsearchError(f"the profile is of {table.meta['gpu_name']} ({table.info.num_sms} SMs), this GPU is "
                            f"{name} ({num_sms} SMs): energy goes with the timings of the same GPU")
    device, how = power.open_device(gpu_id)
    if device is None:
        log(f"note: {how}")
        return table
    t_start = time.time()
    requests, notes = profiling.energy_requests(model, workload, table)
    plan = profiling.energy_plan(model, workload, requests, num_sms, table.info.sm_granularity,
                                 {op: tuple(IMPLS[op]) for op in IMPLS})
    plan.rotate_bytes = 3.0 * int(getattr(props, "L2_cache_size", 50 << 20))
    networks = [op.name for op in layer_ops(model, workload) if op.op_class == "network"]
    shard = (f" (the TP={workload.tp_degree} shard's ops; collectives {', '.join(networks)} not here: not one "
             f"GPU's to measure; `profile --tp` measures them next on every GPU at once, otherwise the power "
             f"bound counts them as no dynamic energy)" if networks else "")
    log(f"energy of {model.name}{shard} on {name} ({how}): {len(requests)} points, "
        f"~{len(requests) * (window_s + 0.4):.0f} s; power limit {device.power_limit_w():.0f} W, SM clock max "
        f"{device.max_sm_clock_mhz():.0f} MHz")
    points, failures = [], list(notes)
    try:
        for op in dict.fromkeys(r.op for r in requests):
            inputs = None
            try:
                inputs = _Inputs(torch, plan, plan.ops[op], IMPLS)
                for r in (r for r in requests if r.op == op):
                    try:
                        m, way = _energy_point(torch, inputs, r, num_sms, device, window_s)
                    except Exception as exc:  # noqa: BLE001 - one point lost, not the profile
                        torch.cuda.synchronize()
                        failures.append(f"{r.describe()}: {type(exc).__name__}: {str(exc)[:160]}")
                        log(f"  energy {r.describe()}: FAILED {failures[-1]}")
                        continue
                    points.append(EnergyPoint(r.op, r.impl, r.num_tokens, r.context, m.energy_j, m.time_ms,
                                              m.power_w, m.samples.sm_clock_mhz, round(m.samples.capped_share, 3)))
                    log(f"  energy {r.describe()} ({way}): {m.describe()}; table {r.time_ms:.4f} ms")
            except Exception as exc:  # noqa: BLE001 - an op whose inputs cannot be built
                failures.append(f"{op}: inputs: {type(exc).__name__}: {str(exc)[:160]}")
                log(f"  energy {op}: FAILED {failures[-1]}")
            finally:
                del inputs
                torch.cuda.empty_cache()
        pair_points = []
        if points and with_pairs:
            pair_points, pair_failures = _pair_energy_points(torch, model, workload, table, gpu_id, device,
                                                             window_s, log, plan.rotate_bytes)
            failures += pair_failures
        if points:
            try:
                static = power.measure_static_power(device, window_s)
            except Exception as exc:  # noqa: BLE001 - no static power, no bound: said, not fatal
                log(f"note: the static power could not be measured ({type(exc).__name__}: {str(exc)[:160]}); "
                    "the profile has no energy")
                return table
        limit, max_mhz = device.power_limit_w(), device.max_sm_clock_mhz()
    finally:
        device.close()
    if not points:
        log("note: no energy point could be measured; the profile has no energy")
        return table
    log(f"  static power {static.static_power_w:.0f} W at SM {static.sm_clock_mhz or 0:.0f} MHz "
        f"(idle, nothing queued: {static.idle_power_w or float('nan'):.0f} W); {time.time() - t_start:.0f} s")
    energy = ProfileEnergy(
        limit, static.static_power_w, tuple(sorted(points, key=lambda p: p.key)),
        method=(f"each op back to back on the whole GPU with its fastest impl, {ENERGY_GRAPH_MS:g} ms CUDA graphs "
                f"of rotating input sets, {power.WARMUP_S:g} s warm-up, then an NVML energy-counter window of "
                f">= {window_s:g} s between counter updates: energy per call = mean board power x GPU time per "
                f"call (power.measure_energy)" + (
                    f"; TP={workload.tp_degree}: the shard's ops at their per-GPU shapes on GPU {gpu_id}; "
                    f"{', '.join(networks)} not measured (a collective needs every GPU; one GPU's energy of it "
                    f"is not measured here): the power bound counts them as no dynamic energy" if networks else "")),
        static_method=static.method, idle_power_w=static.idle_power_w, static_sm_clock_mhz=static.sm_clock_mhz,
        max_sm_clock_mhz=max_mhz,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), failures=tuple(failures),
        pair_points=tuple(pair_points))
    for p in pair_points:
        log(f"  pair energy {p.op_a} {p.num_tokens_a} x {p.op_b} {p.num_tokens_b} at {p.sms_a}+{p.sms_b}: "
            f"{p.energy_j * 1e3:.3f} mJ in {p.time_ms:.4f} ms ({p.power_w:.0f} W) against back to back "
            f"{p.b2b_energy_j * 1e3:.3f} mJ in {p.b2b_time_ms:.4f} ms ({p.b2b_power_w:.0f} W)")
    if table.energy is not None:
        energy = table.energy.merged(energy)
    return table.with_energy(energy)


def _pair_energy_points(torch, model, workload, table, gpu_id: int, device, window_s: float, log,
                        rotate_bytes: float):
    """The energy of overlap, measured on CUDA device `gpu_id`: each non-network family of the table's
    pair table at its best split (both sides launched together, each with the impl the pair table ran
    there), k launches per CUDA graph replayed back to back for an NVML energy window; then the two
    ops back to back on the whole GPU, each with its fastest impl there, the same way. Returns the
    points (energy.PairEnergyPoint) and one line per family that failed. rotate_bytes: as the op
    energy points rotate their inputs (add_energy's plan)."""
    from nfsearch.runtime.kernels import IMPLS

    report = pair_table.make_report(pair_table.points_from_meta(table.meta))
    families = [f for f in report.families
                if not pair_table.is_network_family(f.a, f.b) and f.best.sms_a > 0 and f.best.sms_b > 0]
    if not families:
        return [], []
    log(f"energy of overlap: {len(families)} pair families at their best split, and back to back on the "
        f"whole GPU, ~{len(families) * 2 * (window_s + PAIR_ENERGY_OVERHEAD_S):.0f} s")
    parts = SmPartitions(gpu_id, mode="green")
    points, failures = [], []
    try:
        plan = profiling.pair_energy_plan(model, workload, families, parts.num_sms, parts.granularity,
                                          {op: tuple(IMPLS[op]) for op in IMPLS})
        plan.rotate_bytes = rotate_bytes
        measurer = _Measurer(torch, parts, plan, IMPLS, log)
        for f in families:
            try:
                points.append(_pair_energy_point(torch, measurer, table, f, device, window_s))
            except Exception as exc:  # noqa: BLE001 - one family lost, not the profile
                torch.cuda.synchronize()
                failures.append(f"pair {f.name}: {type(exc).__name__}: {str(exc)[:160]}")
                log(f"  pair energy {f.name}: FAILED {failures[-1]}")
    finally:
        measurer = None                 # its inputs go before the cache is emptied
        parts.close()
        torch.cuda.empty_cache()
    return points, failures


def _pair_energy_point(torch, measurer, table, family, device, window_s: float):
    """One family's PairEnergyPoint (_pair_energy_points)."""
    a, b, best = family.a, family.b, family.best
    full = measurer.parts.num_sms
    # back to back as seq-same runs them: each op with the impl the table finds fastest on the whole GPU
    impl_a_full = table.time_ms(a.op, a.num_tokens, full, a.context, allow_extrapolation=True)[1]
    impl_b_full = table.time_ms(b.op, b.num_tokens, full, b.context, allow_extrapolation=True)[1]
    together, in_turn, k = pair_energy_graphs(torch, measurer, family, impl_a_full, impl_b_full)
    try:
        m = power.measure_energy(together.replay, device, calls_per_fn=k, window_s=window_s)
        m2 = power.measure_energy(in_turn.replay, device, calls_per_fn=k, window_s=window_s)
    finally:
        del together, in_turn
    return PairEnergyPoint(a.op, a.num_tokens, a.context, best.sms_a, best.impl_a,
                           b.op, b.num_tokens, b.context, best.sms_b, best.impl_b,
                           m.energy_j, m.time_ms, m.power_w, m2.energy_j, m2.time_ms, m2.power_w,
                           m.samples.sm_clock_mhz, round(m.samples.capped_share, 3),
                           m2.samples.sm_clock_mhz, round(m2.samples.capped_share, 3))


def pair_energy_graphs(torch, measurer, family, impl_a_full: str, impl_b_full: str):
    """(together, in_turn, k) of a pair family's energy loops (_pair_energy_point; under TP
    tp_profile.measure_collective_pair_energy): two CUDA graphs of k rounds each. Together: side A
    and side B at the family's best split (measurer._pair_streams), each round forked from the end
    of the last; in turn: the two one after another on the whole GPU with impl_a_full and impl_b_full
    (their fastest impls there, as seq-same runs them). Each call is issued once outside the capture
    (compiles; under TP, makes communicators), every process in the same order."""
    a, b, best = family.a, family.b, family.best
    full = measurer.parts.num_sms
    s_a, s_b = measurer._pair_streams(best.sms_a, best.sms_b)
    s_full = measurer.parts.stream(full)
    fa, na = measurer._fn(a.op, best.impl_a, a.num_tokens, a.context, best.sms_a)
    fb, nb = measurer._fn(b.op, best.impl_b, b.num_tokens, b.context, best.sms_b)
    ga, nga = measurer._fn(a.op, impl_a_full, a.num_tokens, a.context, full)
    gb, ngb = measurer._fn(b.op, impl_b_full, b.num_tokens, b.context, full)
    for fn in (fa, fb, ga, gb):                 # compiles, outside the captures
        fn(0)
    torch.cuda.synchronize()
    k = max(1, min(MAX_ENERGY_GRAPH_CALLS, math.ceil(ENERGY_GRAPH_MS / max(family.back_to_back_ms, 1e-3))))
    together = capture_rounds([[(s_a, lambda i=i: fa(i % na)), (s_b, lambda i=i: fb(i % nb))] for i in range(k)])

    def one_after_another():
        for i in range(k):
            ga(i % nga)
            gb(i % ngb)
    in_turn = capture_rounds([[(s_full, one_after_another)]])
    return together, in_turn, k


def _energy_point(torch, inputs, r, num_sms: int, device, window_s: float):
    """The energy measurement of one request: a CUDA graph of k calls (eager where capture fails)."""
    fn, nsets = inputs.fn(r.impl, r.num_tokens, r.context, num_sms)
    fn(0)                                   # compiles, outside the capture
    torch.cuda.synchronize()
    k = max(1, min(MAX_ENERGY_GRAPH_CALLS, math.ceil(ENERGY_GRAPH_MS / max(r.time_ms, 1e-3))))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(k):
                fn(i % nsets)
        run, way = graph.replay, f"graph of {k}"
    except Exception:  # noqa: BLE001 - an impl that cannot be captured runs eagerly (host launch gaps count)
        torch.cuda.synchronize()
        graph = None

        def run():
            for i in range(k):
                fn(i % nsets)
        way = f"eager, {k} per chunk"
    try:
        return power.measure_energy(run, device, calls_per_fn=k, window_s=window_s), way
    finally:
        del graph


def device_meta(torch, parts, gpu_id: int) -> dict:
    props = torch.cuda.get_device_properties(gpu_id)
    name = torch.cuda.get_device_name(gpu_id)
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        versions["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    versions["driver"] = _driver_version()
    return {"gpu_name": name, "gpu_key": profiling.gpu_key_for(name) or None, "num_sms": parts.num_sms,
            "sm_granularity": parts.granularity, "source": "measured",
            "l2_bytes": int(getattr(props, "L2_cache_size", 50 << 20)),
            "memory_bytes": int(props.total_memory), "versions": versions, "code_version": code_version()}


def code_version() -> str:
    """Hash of the kernels and this profiler: a checkpoint from other code is not resumed."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    kernels = sorted((root / "kernels").glob("*.py")) + sorted((root / "kernels").glob("*.cu"))
    for p in kernels + [Path(__file__), Path(profiling.__file__), Path(profiling.pair_table.__file__)]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        pass
    try:
        from cuda.bindings import driver as cu
        _, v = cu.cuDriverGetVersion()
        return f"CUDA driver API {int(v) // 1000}.{int(v) % 1000 // 10}"
    except Exception:  # noqa: BLE001
        return "unknown"


def _smi_clocks(gpu_id: int) -> dict | None:
    """nvidia-smi's SM clock, its maximum and the power draw now (once before and once after the run:
    too slow to ask per point); None where nvidia-smi does not answer."""
    fields = ("clocks.sm", "clocks.max.sm", "power.draw", "temperature.gpu")
    try:
        out = subprocess.run(["nvidia-smi", "-i", str(gpu_id), f"--query-gpu={','.join(fields)}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20,
                             check=False)
        values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
        return {k: float(v) for k, v in zip(fields, values) if v and v.replace(".", "", 1).isdigit()} or None
    except Exception:  # noqa: BLE001 - no nvidia-smi, no permission, an odd output: nothing recorded
        return None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _print_summary(s: dict, log) -> None:
    c = Ceilings.from_dict(s["ceilings"]) if s["ceilings"] else None
    figures = f"cuBLAS {c.gemm_shape} {c.gemm_tflops:.0f} TFLOP/s, copy {c.copy_tbps:.2f} TB/s" if c else "no ceilings"
    log(f"\n== {s['gpu']}: {figures}; "
        f"{s['rows']['total']} rows ({s['rows']['corun']} co-run), {s['measure_s']} s, {s['failures']} failures ==")
    for op, by_t in s["gemm_at_full_gpu"].items():
        log(f"  {op:>3} triton/cuBLAS TFLOP/s: " + ", ".join(
            f"{t}: {v['triton_tflops']:.0f}/{v['cublas_tflops']:.0f}" for t, v in by_t.items() if t in (512, 2048, 4096)))
    for key, by_impl in s["decode_attn_tbps"].items():
        if key.startswith("512x"):
            tri = by_impl.get("triton", {})
            log(f"  decode {key} TB/s triton: " + ", ".join(f"{n}:{v:.2f}" for n, v in tri.items())
                + f" | SDPA@full {by_impl.get('torch', {}).get(max(tri) if tri else 0, 'n/a')}")
    pairs = s.get("pairs") or {}
    for f in pairs.get("families", []):
        log(f"  pair {f['family']}: best {f['best_sms_a']}+{f['best_sms_b']} {f['makespan_ms']:.4f} ms vs "
            f"back to back {f['back_to_back_ms']:.4f} ({f['ratio']:.2f}x){' PAYS' if f['pays'] else ''}")
    if pairs.get("num_families"):
        log(f"  overlap pays in {pairs['num_paying']} of {pairs['num_families']} pair families "
            f"({pairs['fraction_paying']:.0%}); {pairs['failures']} pair points failed")
    if s.get("stopped"):
        log(f"  STOPPED EARLY: {s['stopped']}")
    for split, ops in s["corun_stretch"].items():
        log(f"  stretch {split}: " + ", ".join(f"{op} {v['median']:.2f} (max {v['max']:.2f})" for op, v in ops.items()))


# ------------------------------------------------------------------------------------ inputs
class _Inputs:
    """Inputs of one op, built once at the largest size; fn(impl, tokens, context, sms) -> (call(i), sets)."""

    def __init__(self, torch, plan, op, impls, device="cuda"):
        self.t = torch
        self.dev = device
        self.plan = plan
        self.op = op
        self.name = op.name
        self.impls = impls
        self.sizes = plan.sizes(op.name) or [(128, 0)]
        self.dt = torch.bfloat16
        m, tp = plan.model, plan.tp_degree
        self.H = m.hidden_size
        self.HQ = max(1, m.num_heads // tp)
        self.HKV = max(1, m.num_kv_heads // tp)
        self.D = m.head_dim
        self.I = max(1, m.intermediate_size // tp)
        self._cache = {}
        self._build()

    # sets to rotate among for (tokens, context), and the pool rows that needs
    def sets(self, t: int, ctx: int) -> int:
        return profiling.rotation_sets(self.plan, self.name, t, ctx)

    def rows(self, ctx_filter=None) -> int:
        return max(self.sets(t, c) * t for t, c in self.sizes if ctx_filter is None or c == ctx_filter)

    def randn(self, *shape, scale=1.0):
        x = self.t.randn(*shape, device=self.dev, dtype=self.dt)
        return x.mul_(scale) if scale != 1.0 else x

    def _build(self):
        t, n = self.t, self.name
        if self.op.is_gemm:
            K, N = self.op.gemm_k, self.op.gemm_n
            nw = max(self.sets(tk, c) for tk, c in self.sizes)
            self.w = [self.randn(K, N, scale=K ** -0.5) for _ in range(nw)]
            rows = self.rows()
            self.a = self.randn(rows, K)
            self.out = t.empty(rows, N, device=self.dev, dtype=self.dt)
        elif n in ("norm1", "norm2"):
            rows = self.rows()
            self.x, self.res = self.randn(rows, self.H), self.randn(rows, self.H)
            self.out = t.empty(rows, self.H, device=self.dev, dtype=self.dt)
            self.res_out = t.empty(rows, self.H, device=self.dev, dtype=self.dt)
            self.w = t.rand(self.H, device=self.dev, dtype=self.dt) + 0.5
        elif n == "act":
            rows = self.rows()
            self.x = self.randn(rows, 2 * self.I)
            self.out = t.empty(rows, self.I, device=self.dev, dtype=self.dt)
        elif n == "rope_append":
            from nfsearch.runtime.kernels import rope_cos_sin
            rows, C = self.rows(), 16
            self.qkv = self.randn(rows, (self.HQ + 2 * self.HKV) * self.D)
            self.q_out = t.empty(rows, self.HQ, self.D, device=self.dev, dtype=self.dt)
            self.pos = t.randint(0, C, (rows,), device=self.dev, dtype=t.int32)
            self.slot = t.arange(rows, device=self.dev, dtype=t.int32)       # one cache slot per token
            self.kc = self.randn(rows, C, self.HKV, self.D)
            self.vc = self.randn(rows, C, self.HKV, self.D)
            self.cos, self.sin = rope_cos_sin(C, self.D, device=self.dev)
        elif n == "decode_attn":
            rows = self.rows()
            self.q = self.randn(rows, self.HQ, self.D)
            self.out = t.empty(rows, self.HQ, self.D, device=self.dev, dtype=self.dt)
            self.kv = {}
            for ctx in sorted({c for _, c in self.sizes}):
                r = self.rows(ctx)
                self.kv[ctx] = (self.randn(r, ctx, self.HKV, self.D), self.randn(r, ctx, self.HKV, self.D),
                                t.full((r,), ctx, device=self.dev, dtype=t.int32))
        elif n == "prefill_attn":
            rows = self.rows()
            self.q = self.randn(rows, self.HQ, self.D)
            self.k, self.v = self.randn(rows, self.HKV, self.D), self.randn(rows, self.HKV, self.D)
            self.out = t.empty(rows, self.HQ, self.D, device=self.dev, dtype=self.dt)
        else:
            raise ValueError(f"no inputs for op {n}")

    def fn(self, impl: str, tok: int, ctx: int, sms: int):
        f = self.impls[self.name][impl]
        ns = self.sets(tok, ctx)
        sl = lambda x, i: x[i * tok:(i + 1) * tok]
        n = self.name
        if self.op.is_gemm:
            from nfsearch.runtime.kernels import weight_for  # fp8 takes its weights quantized, once
            sets = [(sl(self.a, i), weight_for(impl, self.w[i]), sl(self.out, i)) for i in range(ns)]
            return (lambda i: f(*sets[i % ns], sms)), ns
        if n in ("norm1", "norm2"):
            sets = [(sl(self.x, i), sl(self.out, i), sl(self.res, i), sl(self.res_out, i)) for i in range(ns)]
            return (lambda i: f(sets[i % ns][0], self.w, sets[i % ns][1], sms, residual=sets[i % ns][2],
                                residual_out=sets[i % ns][3])), ns
        if n == "act":
            sets = [(sl(self.x, i), sl(self.out, i)) for i in range(ns)]
            return (lambda i: f(*sets[i % ns], sms)), ns
        if n == "rope_append":
            sets = [(sl(self.qkv, i), sl(self.pos, i), sl(self.q_out, i), sl(self.slot, i)) for i in range(ns)]
            return (lambda i: f(sets[i % ns][0], sets[i % ns][1], self.cos, self.sin, sets[i % ns][2], self.kc,
                                self.vc, sets[i % ns][3], sms)), ns
        if n == "decode_attn":
            kc, vc, lens = self.kv[ctx]
            sets = [(sl(self.q, i), sl(kc, i), sl(vc, i), lens[:tok], sl(self.out, i)) for i in range(ns)]
            # the paged impls' page tables as wide as the engine bucket's (its split count follows)
            kw = {"max_context": self.plan.decode_max_context[ctx]} if impl in ENGINE_IMPLS and \
                ctx in self.plan.decode_max_context else {}
            _prepare(f, sets, sms, **kw)
            return (lambda i: f(*sets[i % ns], sms, **kw)), ns
        if n == "prefill_attn":
            kw = {}
            if impl in ENGINE_IMPLS:         # a chunk over its cached prefix (paged_adapters.prefill_chunks)
                from nfsearch.runtime.kernels.paged_adapters import prefill_chunks
                lens, kw["prefix_lens"] = prefill_chunks(tok, ctx)
            else:
                lens = [ctx] * (tok // ctx) + ([tok % ctx] if tok % ctx else [])
            offsets = [0]
            for x in lens:
                offsets.append(offsets[-1] + x)
            cu_cpu = self.t.tensor(offsets, dtype=self.t.int32)
            if impl == "torch" or impl in ENGINE_IMPLS:
                cu = cu_cpu                  # read on the host (library impl; paged copy's key): no sync
            else:
                cu = cu_cpu.to(self.q.device)
                if "block_table_cache" in inspect.signature(f).parameters:
                    mod = importlib.import_module(f.__module__)
                    kw["block_table_cache"] = mod.block_table(cu, tok, mod.BLOCK_M)
            sets = [(sl(self.q, i), sl(self.k, i), sl(self.v, i), cu, sl(self.out, i)) for i in range(ns)]
            _prepare(f, sets, sms, **kw)
            return (lambda i: f(*sets[i % ns], sms, **kw)), ns
        raise ValueError(n)


def _prepare(f, sets, sms: int, **kw) -> None:
    """An impl with a `prepare` (the paged adapters: their copy into a paged cache) gets it for every
    input set now, before any timed call or graph capture."""
    prepare = getattr(f, "prepare", None)
    if prepare is not None:
        for args in sets:
            prepare(*args, sms, **kw)


# ------------------------------------------------------------------------------------ timing
class _Measurer:
    def __init__(self, torch, parts, plan, impls, log, device="cuda"):
        self.t = torch
        self.dev = device
        self.parts = parts
        self.plan = plan
        self.impls = impls
        self.log = log
        self.inputs: dict[str, _Inputs] = {}
        self.host_s: dict[tuple, float] = {}      # host seconds to enqueue one call, by (op, impl)
        self.bg_ms: dict[tuple, float] = {}
        self.cycles_per_ms = self._calibrate_sleep()
        self.gap_retries = 0
        self.fastest: dict[tuple, tuple[str, float] | str] = {}   # pair sides: (impl, ms) or why none ran
        self._nvml_ok: bool | None = None
        self._plain = None                        # a plain stream beside the whole GPU's (_side_stream)
        self.nvml_note = "not read"

    # Hooks for measurements that span processes (runtime/tp_profile.py: collectives on every rank at
    # once). Here, one GPU: identity and nothing. `key` is the solo call's (op, impl), None for a pair.
    def _agree_max(self, value: float, key: tuple | None) -> float:
        """The largest `value` over every process that measures with this one (so that all take the
        same retry decisions and leads, and issue the same number of calls)."""
        return value

    def _align(self, key: tuple | None) -> None:
        """Right before a timed section: wait until every process is there."""

    def is_healthy(self) -> bool:
        """Whether the device still runs work and returns results (after a run of failures)."""
        t = self.t
        t.cuda.synchronize()
        x = t.ones(4, device=self.dev)
        return float((x + 1).sum().item()) == 8.0

    def __call__(self, p: Point) -> Measurement:
        if p.kind == "ceiling":
            return self._ceiling(p)
        if p.kind == "solo":
            fn, ns = self._fn(p.op, p.impl, p.num_tokens, p.context, p.sm_count)
            stream = self.parts.stream(p.sm_count)
            if self.parts.round(p.sm_count) != p.sm_count:
                raise RuntimeError(f"partition of {p.sm_count} SMs rounds to {self.parts.round(p.sm_count)}")
            return Measurement(statistics.median(self.solo(fn, stream, ns, (p.op, p.impl))))
        if p.kind == "corun":
            return self._corun(p)
        if p.kind == "pair":
            return self._pair(p)
        raise ValueError(p.kind)

    # -------------------------------------------------------------- helpers
    def _inputs(self, op: str) -> _Inputs:
        if op not in self.inputs:
            self.inputs[op] = _Inputs(self.t, self.plan, self.plan.ops[op], self.impls, self.dev)
        return self.inputs[op]

    def _fn(self, op, impl, tok, ctx, sms):
        return self._inputs(op).fn(impl, tok, ctx, sms)

    def _calibrate_sleep(self) -> float:
        t = self.t
        t.cuda._sleep(1000)
        vals = []
        for _ in range(3):
            a, b = t.cuda.Event(enable_timing=True), t.cuda.Event(enable_timing=True)
            a.record()
            t.cuda._sleep(2_000_000)
            b.record()
            b.synchronize()
            vals.append(2_000_000 / max(a.elapsed_time(b), 1e-3))
        return statistics.median(vals)

    def _sleep(self, ms: float) -> None:
        self.t.cuda._sleep(max(1000, int(ms * self.cycles_per_ms)))

    def _events(self, n):
        return [self.t.cuda.Event(enable_timing=True) for _ in range(n)]

    def _split(self, m: int):
        (gm, sm_), (gn, sn) = self.parts.split((m, self.parts.num_sms - m))
        if gm != m or gn != self.parts.num_sms - m:
            raise RuntimeError(f"split ({m}, rest) gave {gm} + {gn} SMs")
        return sm_, sn

    def _ceiling(self, p: Point) -> Measurement:
        t = self.t
        if p.op == "gemm_bf16":
            n = profiling.GEMM_CEILING_N
            a = [t.randn(n, n, device=self.dev, dtype=t.bfloat16) for _ in range(2)]
            b = [t.randn(n, n, device=self.dev, dtype=t.bfloat16) for _ in range(2)]
            c = t.empty(n, n, device=self.dev, dtype=t.bfloat16)
            fn = lambda i: t.matmul(a[i % 2], b[i % 2], out=c)
        else:
            x = t.randn(profiling.COPY_CEILING_BYTES // 2, device=self.dev, dtype=t.bfloat16)
            y = t.empty_like(x)
            fn = lambda i: y.copy_(x)
        times = self.solo(fn, t.cuda.current_stream(), 2, ("ceiling", p.op), warm=3, reps=10)
        ms = statistics.median(times)
        del fn
        t.cuda.empty_cache()
        self.log(f"ceiling {p.op}: {ms:.4f} ms")
        return Measurement(ms)

    # -------------------------------------------------------------- solo
    def solo(self, fn, stream, nsets, host_key, warm=None, reps=None) -> list[float]:
        """Times (ms) of `reps` back-to-back calls on `stream` after `warm` warm-up calls."""
        t = self.t
        warm = self.plan.settings.warmup if warm is None else warm
        reps = self.plan.settings.repeats if reps is None else reps
        host = []
        with t.cuda.stream(stream):
            for i in range(warm):
                h = time.perf_counter()
                fn(i % nsets)
                host.append(time.perf_counter() - h)
        per_call = min(host[1:] or host or [1e-4])
        per_call = min(per_call, self.host_s.get(host_key, per_call))
        lead = self._agree_max(min(MAX_LEAD_MS, 1.3 * reps * per_call * 1e3 + 0.05), host_key)
        for _attempt in range(3):
            ev = self._events(reps + 2)
            hk = []
            self._align(host_key)
            with t.cuda.stream(stream):
                h0 = time.perf_counter()
                ev[0].record()
                self._sleep(lead)
                ev[1].record()
                for r in range(reps):
                    fn((warm + r) % nsets)
                    hk.append(time.perf_counter())
                    ev[r + 2].record()
            ev[-1].synchronize()
            lead_ms = ev[0].elapsed_time(ev[1])
            times = [ev[r + 1].elapsed_time(ev[r + 2]) for r in range(reps)]
            self.host_s[host_key] = (hk[-1] - h0) / reps
            # no gap: call r was enqueued before the GPU could have reached it
            short, cum = 0.0, lead_ms
            for r in range(reps):
                host_ms = (hk[r] - h0) * 1e3
                short = max(short, host_ms - cum)
                cum += times[r]
            short = self._agree_max(short, host_key)
            if short <= 0:
                return times
            self.gap_retries += 1
            lead = min(MAX_LEAD_MS, lead + 1.5 * short + 0.2)
        return times

    # -------------------------------------------------------------- co-run
    def _background(self, kind: str, sms: int):
        """The other side of a co-run on `sms` SMs: call(i) and its solo time (ms) there."""
        if kind == "memory":
            op, tok, ctx = MEMORY_BACKGROUND
            fn, ns = self._fn(op, "triton", tok, ctx, sms)
            call = lambda i: fn(i % ns)
        else:
            names, tok = COMPUTE_BACKGROUND
            fns = [self._fn(op, "triton", tok, 0, sms) for op in names]

            def call(i):
                for f, ns in fns:
                    f(i % ns)
        return call

    def _bg_ms(self, kind, sms, stream):
        key = (kind, sms)
        if key not in self.bg_ms:
            call = self._background(kind, sms)
            self.bg_ms[key] = statistics.median(self.solo(call, stream, 1 << 20, ("bg", kind), warm=2, reps=5))
        return self.bg_ms[key]

    def _corun(self, p: Point) -> Measurement:
        t = self.t
        m = p.partner_sms if p.co_class == "memory" else p.sm_count
        s_mem, s_cmp = self._split(m)
        s_x, s_bg = (s_cmp, s_mem) if p.co_class == "memory" else (s_mem, s_cmp)
        fn, ns = self._fn(p.op, p.impl, p.num_tokens, p.context, p.sm_count)
        solo = statistics.median(self.solo(fn, s_x, ns, (p.op, p.impl)))
        bg_call = self._background(p.co_class, p.partner_sms)
        bg_ms = self._bg_ms(p.co_class, p.partner_sms, s_bg)
        reps = self.plan.settings.corun_repeats
        host_x = self.host_s.get((p.op, p.impl), 1e-4)
        host_bg = self.host_s.get(("bg", p.co_class), 1e-4)
        k = 2 + math.ceil((1 + reps) * solo * 3.0 / bg_ms)   # background calls: ~3x the timed window
        extra = 0.0
        for _attempt in range(4):
            # The background goes in chunk by chunk, each ahead of the timed call it must cover, so
            # hundreds of background calls never wait on a full launch queue before the first timed one.
            target = [1 + math.ceil((k - 1) * (c + 1) / (reps + 1)) for c in range(reps + 1)]
            lead = min(MAX_CORUN_LEAD_MS, 1.5 * (target[0] * host_bg + 2 * host_x) * 1e3 + 0.2 + extra)
            ev_pre, ev_go, ev_end = self._events(3)
            ev = self._events(reps + 1)
            marks = []                          # (event before a chunk, host time its first call was in)
            with t.cuda.stream(s_bg):
                h0 = time.perf_counter()
                ev_pre.record()
                self._sleep(lead)
                bg_call(0)
                ev_go.record()
            s_x.wait_event(ev_go)
            done_bg, hk = 1, []
            for c in range(reps + 1):
                if target[c] > done_bg:
                    with t.cuda.stream(s_bg):
                        mark = self._events(1)[0]
                        mark.record()
                        bg_call(done_bg)
                        marks.append((mark, time.perf_counter()))
                        for i in range(done_bg + 1, target[c]):
                            bg_call(i)
                        done_bg = target[c]
                with t.cuda.stream(s_x):
                    if c == 0:
                        fn(0)                   # one warm-up under interference
                        ev[0].record()
                    else:
                        fn(c % ns)
                        hk.append(time.perf_counter())
                        ev[c].record()
            with t.cuda.stream(s_bg):
                ev_end.record()
            ev[-1].synchronize()
            ev_end.synchronize()
            times = [ev[r].elapsed_time(ev[r + 1]) for r in range(reps)]
            covered = ev[-1].elapsed_time(ev_end) > 0          # background still running at the end
            # nothing waited on the host: each timed call and each background chunk was enqueued
            # before the GPU could have reached it (host clock from h0, GPU clock from ev_pre)
            go = ev_pre.elapsed_time(ev_go)
            short, cum = 0.0, go
            for r in range(reps):
                short = max(short, (hk[r] - h0) * 1e3 - cum)
                cum += times[r]
            for mark, h in marks:
                short = max(short, (h - h0) * 1e3 - ev_pre.elapsed_time(mark))
            if covered and short <= 0:
                return Measurement(statistics.median(times), solo)
            if not covered:
                k = 2 * k + 2
            if short > 0:
                self.gap_retries += 1
                extra += 1.5 * short + 0.5
        raise RuntimeError(f"co-run window not covered or not enqueued in time after retries (k={k})")

    # -------------------------------------------------------------- the pair table
    def _pair(self, p: Point) -> Measurement:
        """Side A (p.op) on p.sm_count SMs and side B (p.partner_op) on the other p.partner_sms SMs of
        one split, each with its fastest impl there, launched together (see the module docstring)."""
        full = self.parts.num_sms
        s_a, s_b = self._pair_streams(p.sm_count, p.partner_sms)
        side_a = (p.op, p.num_tokens, p.context)
        side_b = (p.partner_op, p.partner_tokens, p.partner_context)
        impl_a, part_a = self._fastest(*side_a, p.sm_count, s_a)
        impl_b, part_b = self._fastest(*side_b, p.partner_sms, s_b)
        full_a = self._fastest(*side_a, full, self.parts.stream(full))[1]
        full_b = self._fastest(*side_b, full, self.parts.stream(full))[1]
        fa, na = self._fn(p.op, impl_a, p.num_tokens, p.context, p.sm_count)
        fb, nb = self._fn(p.partner_op, impl_b, p.partner_tokens, p.partner_context, p.partner_sms)
        co_a, co_b, makespan, clock = self._together(fa, na, s_a, fb, nb, s_b)
        return Measurement.of_pair(self.plan.pair_point(
            p, impl_a, impl_b, corun_a_ms=co_a, corun_b_ms=co_b, makespan_ms=makespan, part_a_ms=part_a,
            part_b_ms=part_b, full_a_ms=full_a, full_b_ms=full_b, sm_clock_mhz=clock,
            nvml_sm_clock_mhz=self._nvml_clock()))

    def _pair_streams(self, sms_a: int, sms_b: int):
        """(stream of side A, stream of side B) of a split of the GPU: the smaller side's green
        partition first; a side of 0 SMs (a copy-engine collective, holding no share) on a plain
        stream beside the other on the whole GPU."""
        if 0 in (sms_a, sms_b):
            whole = self.parts.stream(self.parts.num_sms)
            return (whole, self._side_stream()) if sms_b == 0 else (self._side_stream(), whole)
        is_a_small = sms_a <= sms_b
        s_small, s_big = self._split(sms_a if is_a_small else sms_b)
        return (s_small, s_big) if is_a_small else (s_big, s_small)

    def _side_stream(self):
        """A plain stream of the whole device beside parts.stream(num_sms) (a no-share pair side)."""
        if self._plain is None:
            self._plain = self.t.cuda.Stream(device=self.dev)
        return self._plain

    def _fastest(self, op: str, tok: int, ctx: int, sms: int, stream) -> tuple[str, float]:
        """The impl of `op` fastest alone on `stream` (sms SMs) and its time; cached. Impls that fail
        are skipped (and said once); none running fails every point that needs this side."""
        key = (op, tok, ctx, sms)
        if key not in self.fastest:
            times, errors = {}, []
            for impl in self.plan.pair_impls(op, sms):
                try:
                    fn, ns = self._fn(op, impl, tok, ctx, sms)
                    ms = statistics.median(self.solo(fn, stream, ns, (op, impl)))
                    if not (math.isfinite(ms) and ms > 0):
                        raise RuntimeError(f"time {ms}")
                    times[impl] = ms
                except Exception as exc:  # noqa: BLE001 - this impl cannot run here; the others may
                    errors.append(f"{impl}: {type(exc).__name__}: {exc}"[:200])
                    self.log(f"pair side {op}/{impl} {tok} x {ctx} on {sms} SMs failed alone: {errors[-1]}")
            self.fastest[key] = min(times.items(), key=lambda kv: kv[1]) if times else (
                f"no impl of {op} ran alone at {tok} x {ctx} on {sms} SMs ({'; '.join(errors) or 'none registered'})")
        got = self.fastest[key]
        if isinstance(got, str):
            raise RuntimeError(got)
        return got

    def _together(self, fa, na, s_a, fb, nb, s_b) -> tuple[float, float, float, float | None]:
        """Median times (ms) from a common start to A's end, to B's end, to the later end; the SM clock (MHz)."""
        t = self.t
        reps = self.plan.settings.pair_repeats
        warm = profiling.PAIR_WARMUP

        def launch(i, start, end_a, end_b):
            start.record(s_a)
            s_b.wait_event(start)
            with t.cuda.stream(s_a):
                fa(i % na)
            with t.cuda.stream(s_b):
                fb(i % nb)
            end_a.record(s_a)
            end_b.record(s_b)
            s_a.wait_event(end_b)                # the next launch starts when both have ended

        host = []
        for i in range(warm):                    # under interference; also the host's time per launch
            evs = self._events(3)
            h = time.perf_counter()
            launch(i, *evs)
            host.append(time.perf_counter() - h)
        t.cuda.synchronize()
        per_launch = min(host[1:] or host or [1e-4])
        lead = self._agree_max(min(MAX_CORUN_LEAD_MS, 1.5 * reps * per_launch * 1e3 + 0.2), None)
        for _attempt in range(4):
            ev_pre, c0, c1 = self._events(3)
            starts, ends_a, ends_b = self._events(reps), self._events(reps), self._events(reps)
            hk = []
            self._align(None)
            with t.cuda.stream(s_a):
                h0 = time.perf_counter()
                ev_pre.record()
                self._sleep(lead)
            for r in range(reps):
                launch(warm + r, starts[r], ends_a[r], ends_b[r])
                hk.append(time.perf_counter())
            with t.cuda.stream(s_a):
                c0.record()
                t.cuda._sleep(CLOCK_CYCLES)
                c1.record()
            c1.synchronize()
            t.cuda.synchronize()
            co_a = [starts[r].elapsed_time(ends_a[r]) for r in range(reps)]
            co_b = [starts[r].elapsed_time(ends_b[r]) for r in range(reps)]
            # each launch was enqueued before the GPU reached its start (host clock from h0, GPU from ev_pre)
            short = self._agree_max(max((hk[r] - h0) * 1e3 - ev_pre.elapsed_time(starts[r]) for r in range(reps)),
                                    None)
            if short <= 0:
                spin_ms = c0.elapsed_time(c1)
                clock = round(CLOCK_CYCLES / spin_ms / 1e3, 1) if spin_ms > 0 else None
                both = [max(x, y) for x, y in zip(co_a, co_b)]
                return statistics.median(co_a), statistics.median(co_b), statistics.median(both), clock
            self.gap_retries += 1
            lead = min(MAX_CORUN_LEAD_MS, lead + 1.5 * short + 0.5)
        raise RuntimeError(f"pair launches not enqueued ahead of the GPU after retries (short by {short:.3f} ms)")

    def _nvml_clock(self) -> float | None:
        """NVML's SM clock (MHz) now, through torch.cuda.clock_rate (needs pynvml); None without it."""
        if self._nvml_ok is False:
            return None
        try:
            mhz = float(self.t.cuda.clock_rate(self.t.cuda.current_device()))
            self._nvml_ok, self.nvml_note = True, "torch.cuda.clock_rate (NVML)"
            return mhz if math.isfinite(mhz) and mhz > 0 else None
        except Exception as exc:  # noqa: BLE001 - no pynvml, no permission, an old torch: no NVML reading
            self._nvml_ok, self.nvml_note = False, f"unavailable ({type(exc).__name__})"
            return None
