"""A plan family in the engine (`nfsearch bench --plans FAMILY.json`): each bucket's graph runs the
dense-op kernels its plan names.

The family (nfsearch.family) holds one plan per engine bucket. Here each bucket gets a model of its
own: a shallow copy of the engine's PagedModel (same weights, KV cache, buffers and sampled ids) whose
dense ops (norm1, kqv, o, norm2, ug, act, d) are the impls the bucket's plan names; the runner
captures and launches each bucket with its model. Attention stays the engine's paged kernels and
RoPE its own: the plan's decode_attn/prefill_attn/rope_append impls were measured on contiguous
layouts and have no paged counterpart here. A sequential plan runs each op whole at the full GPU; a
plan that splits or overlaps ops runs its nano-ops on their streams and SM shares inside the bucket's
graph (runtime.engine_overlap), unless the engine is asked to run every plan sequentially.

A family made for another model, dense batch or bucket set is refused before anything is built
(Family.check_engine); the engine takes the family's dense batch and decode slots unless given.
"""

from __future__ import annotations

import copy
import importlib.util
from collections import Counter
from dataclasses import dataclass, replace

from nfsearch.errors import NfsearchError
from nfsearch.family import artifact
from nfsearch.family.artifact import Family
from nfsearch.plan import NON_MEASURED_IMPLS, Schedule
from nfsearch.serving.batch import Bucket
from nfsearch.serving.decode_spread import DecodeSpread

DENSE_OPS = ("norm1", "kqv", "o", "norm2", "ug", "act", "d")   # runtime.paged_model.DENSE_OPS
ENGINE_OWN_OPS = ("rope_append", "decode_attn", "prefill_attn")  # the engine's paged kernels run these


@dataclass(frozen=True)
class BucketKernels:
    bucket: Bucket
    op_impls: dict[str, str]         # dense op -> impl name (kernels.IMPLS)
    is_sequential: bool              # the plan runs each op whole on one stream at the full GPU
    is_overlapped: bool = False      # its nano-ops run on their streams (runtime.engine_overlap)
    notes: tuple[str, ...] = ()      # what the overlapped program could not keep of the plan
    decode_ranges: tuple[tuple[int, int], ...] | None = None   # split decode attention's slot ranges,
                                     # its requests spread over them by KV work (serving.decode_spread)

    def describe(self) -> str:
        b = self.bucket
        impls = ", ".join(f"{op} {impl}" for op, impl in self.op_impls.items())
        how = "" if self.is_sequential else (" (overlapped: its nano-ops on their streams and SM shares)"
                                             if self.is_overlapped else " (its plan overlaps ops: run sequentially)")
        notes = "".join(f"; {n}" for n in self.notes)
        if self.decode_ranges:
            notes += "; decode requests spread by KV work over slots " + ", ".join(
                f"[{a}, {e})" for a, e in self.decode_ranges)
        return f"bucket {b.max_tokens}/{b.max_decode}/{b.max_segments}/{b.max_context}: {impls}{how}{notes}"


def read_family(path: str, dense_batch: int | None, max_decode: int | None) -> tuple[Family, int, int]:
    """The family, and the dense batch and decode slots the engine should take (given ones kept, so a
    mismatch is refused later with the reason)."""
    family = artifact.read(path)
    return family, dense_batch or family.engine.dense_batch, max_decode or family.engine.max_decode


def plan_kernels(plan: Schedule, bucket: Bucket, impls: dict[str, dict], defaults: dict[str, str]) -> BucketKernels:
    """The dense-op impls a bucket's plan names: one per op (every nano-op of an op the same impl). A
    profile that measured nothing (impl "analytic" or "fake") names none: the engine's own (`defaults`)."""
    named: dict[str, set[str]] = {}
    for op in plan.nano_ops:
        named.setdefault(op.op, set()).add(op.impl)
    chosen, where = {}, f"bucket {bucket.max_tokens}/{bucket.max_decode}/{bucket.max_segments}/{bucket.max_context}"
    for op in DENSE_OPS:
        options = named.get(op, set())
        if len(options) != 1:
            raise NfsearchError(f"{where}: its plan names {len(options)} impls for {op} "
                                f"({', '.join(sorted(options)) or 'none'}); the engine runs one per op")
        impl = options.pop()
        impl = defaults.get(op, "torch") if impl in NON_MEASURED_IMPLS else impl
        if impl not in impls[op]:
            raise NfsearchError(f"{where}: its plan's {op} impl {impl!r} is not one the engine has "
                                f"({', '.join(sorted(impls[op]))})")
        chosen[op] = impl
    sms = plan.gpu.num_sms
    is_sequential = len(plan.streams) == 1 and all(o.sm_count == sms for o in plan.nano_ops) and \
        all(o.index == 0 for o in plan.nano_ops)
    return BucketKernels(bucket, chosen, is_sequential)


def apply_family(engine, family: Family, is_overlapped: bool = True,
                 is_decode_spread: bool = True) -> list[BucketKernels]:
    """Check the family against the engine, then give each bucket of its runner a model with the bucket
    plan's kernels (before capture), running an overlapped plan's nano-ops on their streams unless
    is_overlapped is False (then each op whole, in sequence). A bucket whose overlapped plan splits decode
    attention places its decode requests by KV work (serving.decode_spread) unless is_decode_spread is
    False. With a "sequential" variant (--compare), each bucket's model there runs the same kernels op by
    op. Returns what each bucket runs."""
    from nfsearch.runtime.engine import PLAN_OPS
    from nfsearch.runtime.engine_overlap import overlapped_model
    from nfsearch.runtime.kernels import IMPLS
    family.check_engine(engine.cfg.spec.name, engine.dense_batch, list(engine.buckets))
    if engine.quantization:
        raise NfsearchError(f"--plans with --quantization {engine.quantization}: the family's plans name "
                            f"bf16 GEMM impls")
    kernels = [plan_kernels(b.plan, b.bucket, IMPLS, PLAN_OPS) for b in family.buckets]
    if engine.is_cuda and any("cuda" in k.op_impls.values() for k in kernels) and importlib.util.find_spec("cupy") is None:
        raise NfsearchError("the family's plans name 'cuda' kernels (small_ops.cu), which need cupy: not installed here")
    model = engine.runner.models["plan"]          # --compare's baseline keeps its own kernels
    plans = {b.bucket: b.plan for b in family.buckets}
    for n, k in enumerate(kernels):
        # on the CPU the GPU kernels cannot run: every bucket keeps the torch ops (the wiring is the same)
        twin = model.with_ops(k.op_impls if engine.is_cuda else None)
        if "sequential" in engine.runner.models:  # --compare with a family: its plans run op by op
            engine.runner.bucket_models[("sequential", k.bucket)] = copy.copy(twin)
        if is_overlapped and not k.is_sequential:
            twin = overlapped_model(twin, plans[k.bucket], k.bucket, k.op_impls)
            ranges = decode_ranges(twin.program)
            if ranges is not None and is_decode_spread:
                twin.decode_spread = DecodeSpread(ranges, k.bucket.max_tokens)
            kernels[n] = k = replace(k, is_overlapped=True, notes=twin.program.notes,
                                     decode_ranges=ranges if is_decode_spread else None)
        engine.runner.bucket_models[("plan", k.bucket)] = twin
        engine.log(k.describe())
    return kernels


def decode_ranges(program) -> tuple[tuple[int, int], ...] | None:
    """The decode slots of each decode-attention nano-batch of an overlapped program (the cut most of its
    layers share), or None where decode attention runs whole."""
    by_layer: dict[int, list] = {}
    for op in program.ops:
        if op.op == "decode_attn":
            by_layer.setdefault(op.layer, []).append(op.rows)
    cuts = Counter(tuple(sorted(rows)) for rows in by_layer.values()).most_common(1)
    return cuts[0][0] if cuts and len(cuts[0][0]) > 1 else None


def family_report(engine, run) -> dict:
    """Per bucket: the family's predicted iteration time and hit share beside the run's measured ones
    (GPU time from CUDA events; the host's on the CPU; measured ms of the "plan" variant). With the
    "sequential" variant (--compare): each variant's iterations and median ms (family.tune)."""
    from nfsearch.family.tune import compare_buckets
    compares = None
    if "sequential" in engine.runner.models:
        overlapped = {x.bucket for x in engine.bucket_kernels if x.is_overlapped}
        compares = compare_buckets(engine.family, list(engine.buckets), overlapped, run.iterations)
    rows = []
    for k, b in enumerate(engine.buckets):
        planned = next(p for p in engine.family.buckets if p.bucket == b)
        hits = [it for it in run.iterations if it.bucket == k]
        times = [it.time_ms for it in hits if it.variant == "plan"]
        rows.append({"bucket": [b.max_tokens, b.max_decode, b.max_segments, b.max_context],
                     "predicted_fraction": planned.num_iterations / max(1, engine.family.num_iterations),
                     "measured_fraction": len(hits) / max(1, len(run.iterations)),
                     "predicted_ms": planned.prediction.iteration_ms,
                     "sequential_predicted_ms": planned.prediction.sequential_iteration_ms,
                     "floor_ms": planned.prediction.floor_ms,
                     "predicted_energy_j": planned.prediction.energy_j,   # layers only (None: no energy profile)
                     "measured_ms": sum(times) / len(times) if times else None,
                     "kernels": next(x.op_impls for x in engine.bucket_kernels if x.bucket == b),
                     "is_overlapped": next(x.is_overlapped for x in engine.bucket_kernels if x.bucket == b)})
        if compares is not None:
            rows[-1]["compare"] = compares[k].to_dict()
    return {"trace": engine.family.trace["name"], "num_requests": engine.family.trace["num_requests"],
            "predicted_tokens_per_s": engine.family.prediction.tokens_per_s, "buckets": rows}


def format_family(report: dict, measured_tokens_per_s: float, energy: dict | None = None) -> list[str]:
    """The family's table: per bucket, predicted and measured hits and iteration ms, predicted J (layers)
    and floor beside the measured ones from the bench's "buckets_energy" block (the "plan" variant's)
    and how close the measured iteration runs to its measured floor."""
    from nfsearch.runtime.bucket_energy_report import headline, measured, pooled_lines
    lines = [(f"plan family ({report['trace']}, {report['num_requests']} requests): predicted "
              f"{report['predicted_tokens_per_s']:,.0f} tokens/s, measured {measured_tokens_per_s:,.0f} (whole run)"),
             (f"{'bucket':>20} {'hits pred/meas':>15} {'ms pred':>8} {'ms meas':>8} {'J pred':>7} {'J meas':>7} "
              f"{'floor pred':>10} {'floor meas':>10} {'ms/floor':>8}")]
    for r in report["buckets"]:
        name = "/".join(str(x) for x in r["bucket"])
        m = measured(energy, r["bucket"]) or {}
        hits = f"{100 * r['predicted_fraction']:.0f}%/{100 * r['measured_fraction']:.0f}%"
        lines.append(f"{name:>20} {hits:>15} {r['predicted_ms']:>8.2f} {_num(r['measured_ms'], 2):>8} "
                     f"{_num(r.get('predicted_energy_j'), 3):>7} {_num(m.get('energy_j'), 3, m):>7} "
                     f"{_num(r['floor_ms'], 2):>10} {_num(m.get('floor_ms'), 2, m):>10} {_num(m.get('closeness'), 3, m):>8}")
    if energy:
        lines += [headline(energy), ("  J pred: the layers only (the LM head is priced at the roofline in floor "
                                     "pred); J meas: the whole iteration; n/s: not separable (never holds more "
                                     "than half of a window)")]
        lines += pooled_lines(energy)
    if all("compare" in r for r in report["buckets"]):
        from nfsearch.family.tune import BucketCompare, format_compare
        lines.append("family against itself op by op (--compare), per bucket:")
        lines += format_compare([BucketCompare.from_dict(r["compare"]) for r in report["buckets"]])
    return lines


def _num(value, digits: int, row: dict | None = None) -> str:
    """A figure, "-" where none, "n/s" where the energy block has the bucket but could not separate it."""
    if value is not None:
        return f"{value:.{digits}f}"
    return "n/s" if row and row.get("power_w") is None else "-"
