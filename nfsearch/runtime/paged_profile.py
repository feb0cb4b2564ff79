"""`nfsearch profile --family FAMILY.json`: the engine's paged attention at a plan family's bucket shapes.

What is measured (family/attention_plan.py): each bucket's decode attention (its mean batch's requests
at their mean context, page tables as wide as the bucket's context cap) and prefill attention (its
chunks' tokens at their pair-weighted context, one chunk over a cached prefix:
paged_adapters.prefill_chunks), at the whole op, a half and a quarter of it, through the impl of the
family's KV cache ("paged", or "paged_fp8kv" for an fp8 cache: the engine's kernels on copies in
shuffled 16-token pages), on every SM count of the partition grid, timed as every profile point is
(runtime/profiler.py: the green-context stream of that many SMs, rotating input sets, median of
back-to-back calls). Then the pair points of that attention beside the GEMMs (and decode beside
prefill) at the buckets' shapes on a few splits, the buckets with most iterations first, within a
budget of estimated GPU time (`--no-pairs`: none), measured as the pair table's points are. Then, with
NVML, the energy of each bucket's whole op on the whole GPU (profiler._energy_point: CUDA graphs
replayed for an energy-counter window). The rows, pair points and energy points go into a copy of a
measured profile of the same GPU (family.attention.merge_paged), which `nfsearch solve --family
--profile` then prices the engine's attention with.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

from nfsearch.energy import EnergyPoint
from nfsearch.errors import NfsearchError
from nfsearch.family import attention, attention_plan
from nfsearch.profile import ProfileTable
from nfsearch.runtime import measurements as profiling
from nfsearch.runtime import power, profiler


def base_profile(base_path: str | None, model, gpu_name: str) -> tuple[ProfileTable, str]:
    """The measured profile the rows go into: `base_path`, else the bundled one of the model for this GPU."""
    from nfsearch.cost import bundled_profile_path
    from nfsearch.profile import load
    from nfsearch.specs import Workload
    if base_path is None:
        key = profiling.gpu_key_for(gpu_name)
        found = bundled_profile_path(model, Workload.from_batch_shape((1024,), model=model.name), key) if key else None
        if found is None:
            raise NfsearchError(f"no bundled profile of {model.name} for {gpu_name}: give --base PROFILE (a measured "
                                "profile of this GPU)")
        base_path = str(found)
    base = load(base_path)
    if base.is_analytic:
        raise NfsearchError(f"{base_path} is an analytic profile: the paged rows go into a measured one (--base)")
    return base, base_path


def measure_family_attention(family, base_path: str | None = None, gpu_id: int = 0, is_quick: bool = False,
                             with_energy: bool = True, output=None, progress=None, log=None,
                             family_path: str = "", with_pairs: bool = True,
                             pair_budget_s: float = attention_plan.PAIR_BUDGET_S) -> ProfileTable:
    """The base profile with the family's paged attention rows, pairs and energy merged in (module doc)."""
    import torch

    from nfsearch.runtime.kernels import IMPLS
    from nfsearch.runtime.partitions import SmPartitions

    log = log or profiler._stderr
    began = time.time()
    model = family.buckets[0].plan.model
    workloads = [b.plan.workload for b in family.buckets]
    shapes = attention.bucket_shapes(workloads)
    impl = attention_plan.kv_impl(attention_plan.family_kv_dtype(family))
    torch.cuda.set_device(gpu_id)
    torch.manual_seed(0)
    parts = SmPartitions(gpu_id, mode="green")
    try:
        device = profiler.device_meta(torch, parts, gpu_id)
        base, base_path = base_profile(base_path, model, device["gpu_name"])
        if base.meta["gpu_name"] != device["gpu_name"] or base.info.num_sms != parts.num_sms:
            raise NfsearchError(f"{base_path} is a profile of {base.meta['gpu_name']} ({base.info.num_sms} SMs), this "
                                f"GPU is {device['gpu_name']} ({parts.num_sms} SMs)")
        label = f"plan family {Path(family_path).name or family.trace['name']} (trace {family.trace['name']})"
        plan, left_out = _plan(family, model, workloads, parts, is_quick, label, impl, base, with_pairs,
                               pair_budget_s)
        plan.rotate_bytes = 3.0 * device["l2_bytes"]
        estimate = attention_plan.wall_estimate(plan, len(shapes) if with_energy else 0)
        plan.grid["estimate_s"] = estimate
        log(f"{impl} attention of {label} on {device['gpu_name']}: {len(plan.points)} points "
            f"({', '.join(plan.grid['shapes'])}; {len(plan.grid['sm_counts'])} SM counts; "
            f"{len(plan.pair_points())} pair points of {len(plan.grid['pair_families'])} families"
            f"{'' if with_pairs else ' (--no-pairs)'}); {attention_plan.describe_estimate(estimate)}")
        if left_out:
            log(f"pairs of buckets {', '.join(left_out)} left out: over the {pair_budget_s:.0f} s pair budget")
        checkpoint = None
        if output:
            checkpoint = profiling.Checkpoint(profiling.checkpoint_path(output), plan.identity(device), log)
        measurer = profiler._Measurer(torch, parts, plan, IMPLS, log)
        run = profiling.run_plan(plan, checkpoint, measurer, progress, log, is_healthy=measurer.is_healthy)
    finally:
        parts.close()
    measurer = None
    torch.cuda.empty_cache()
    device["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    table = profiling.assemble_table(plan, run.results, device, run.failures, run.stopped)
    points, notes = [], ["not measured (--no-energy)"]
    if with_energy and not run.stopped:
        points, notes = _energy(torch, plan, table, shapes, gpu_id, log, impl)
    record = {"family": {"file": Path(family_path).name, "model": family.model, "trace": family.trace["name"],
                         "dense_batch": family.engine.dense_batch, "buckets": len(family.buckets)},
              "base": Path(base_path).name, "gpu_name": device["gpu_name"], "date": device["date"],
              "code_version": device["code_version"], "versions": device["versions"], "grid": plan.grid,
              "impl": impl, "kv_cache_dtype": attention_plan.family_kv_dtype(family), "inputs": attention.INPUTS,
              "pair_points": len(plan.pair_points()), "pair_buckets_left_out": left_out,
              "timing": table.meta["timing"], "failures": len(run.failures), "stopped": run.stopped,
              "dropped_groups": table.meta.get("dropped_groups", []), "energy_notes": notes,
              "measure_s": round(time.time() - began, 1)}
    merged = attention.merge_paged(base, table, record, points)
    if checkpoint and not run.stopped:
        checkpoint.remove()
    log(f"{impl} attention: {len(table.rows)} rows, {len(profiling.pair_points_of(plan, run.results))} pair points, "
        f"{len(points)} energy points, {len(run.failures)} failures, {time.time() - began:.0f} s "
        f"(estimated {estimate['total']:.0f} s)")
    return merged


def _plan(family, model, workloads, parts, is_quick: bool, label: str, impl: str, base: ProfileTable,
          with_pairs: bool, pair_budget_s: float):
    """(the measurement plan, the buckets whose pairs were left out for the budget)."""
    caps = attention_plan.decode_caps(family)
    gemms = attention_plan.gemm_impls(family, {op: base.impls(op) for op in attention_plan.GEMM_OPS})
    rows = tuple(sorted({b.bucket.max_tokens for b in family.buckets}))
    solo = base.rows[(base.rows["co_class"] == "") & base.rows["op"].isin(attention_plan.GEMM_OPS)]
    sms = tuple(sorted(set(solo["sm_count"])))
    build = lambda pairs: attention_plan.family_plan(model, workloads, parts.num_sms, parts.granularity, is_quick,
                                                     label=label, impl=impl, caps=caps, pairs=pairs, gemms=gemms,
                                                     gemm_rows=rows, gemm_sms=sms)
    families = attention_plan.pair_families(family, model) if with_pairs else []
    return attention_plan.fit_pairs(build, families, pair_budget_s)


def _energy(torch, plan, table: ProfileTable, shapes, gpu_id: int, log, impl: str
            ) -> tuple[list[EnergyPoint], list[str]]:
    """Each bucket's whole paged attention op on the whole GPU: its energy per call (NVML)."""
    from nfsearch.runtime.kernels import IMPLS
    device, how = power.open_device(gpu_id)
    if device is None:
        return [], [f"no energy: {how}"]
    requests, notes = attention_plan.energy_requests(shapes, table, plan.num_sms, impl)
    points = []
    try:
        for op in dict.fromkeys(r.op for r in requests):
            inputs = profiler._Inputs(torch, plan, plan.ops[op], IMPLS)
            for r in (r for r in requests if r.op == op):
                try:
                    m, way = profiler._energy_point(torch, inputs, r, plan.num_sms, device, power.WINDOW_S)
                except Exception as exc:  # noqa: BLE001 - one point lost, not the profile
                    torch.cuda.synchronize()
                    notes.append(f"{r.describe()}: {type(exc).__name__}: {str(exc)[:160]}")
                    log(f"  energy {r.describe()}: FAILED {notes[-1]}")
                    continue
                points.append(EnergyPoint(r.op, r.impl, r.num_tokens, r.context, m.energy_j, m.time_ms, m.power_w,
                                          m.samples.sm_clock_mhz, round(m.samples.capped_share, 3)))
                log(f"  energy {r.describe()} ({way}): {m.describe()}; table {r.time_ms:.4f} ms")
            del inputs
            torch.cuda.empty_cache()
    finally:
        device.close()
    return points, notes

