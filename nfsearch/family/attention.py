"""The engine's attention in a plan family: priced by the paged kernels the engine runs, where measured.

The serving engine runs decode attention through page tables and each prefill chunk over its
request's cached prefix (runtime/kernels/paged_attention.py), whatever a plan names. A profile's
"paged" rows (runtime/kernels/paged_adapters.py) time those kernels behind the contiguous signatures:
decode attention (requests, context) with every request at that context, its pages shuffled;
prefill attention (tokens, context) with `context` the cost model's pair-weighted prompt length
(specs.Workload.prefill_context), measured as one chunk of T tokens over a prefix of (context - T) // 2
where context >= T (a chunk of C tokens over a prefix of P is the row (C, C + 2P)), else as whole
prompts of that length (paged_adapters.prefill_chunks).

* `engine_view`: what a family prices with: for each attention op with paged rows, only those rows
  (and the paged energy points in place of that op's others); the profile as it is otherwise.
* `family_plan`: the measurement plan of `nfsearch profile --family`: each bucket's decode and prefill
  attention (its mean batch's requests and mean context; its chunks' tokens and pair-weighted context)
  at the whole op, a half and a quarter of it, on every SM count of the partition grid.
* `merge_paged`: the base profile with those rows (replacing earlier paged rows at the same contexts)
  and the record of the run under meta["paged_attention"] (its energy points there too: the base's
  own energy, which the contiguous search prices, is left as it was).
"""

from __future__ import annotations

import dataclasses

import pandas as pd

from nfsearch.energy import ENERGY_KEY, EnergyPoint
from nfsearch.errors import NfsearchError
from nfsearch.graph import layer_ops
from nfsearch.profile import ProfileTable
from nfsearch.specs import ModelSpec, Workload

INPUTS = ("paged impl: the engine's kernels (runtime/kernels/paged_attention.py) on a copy of bf16 random K/V "
          "in shuffled 16-token pages; decode_attn: `num_tokens` requests, each at `context` tokens; prefill_attn: "
          "`context` is the pair-weighted prompt length (specs.Workload.prefill_context): where context >= "
          "num_tokens one chunk of num_tokens over a cached prefix of (context - num_tokens) // 2 (a chunk of C "
          "over a prefix of P is the row (C, C + 2P)), else prompts of `context` tokens (the last one shorter)")
PAGED_IMPL = "paged"
ATTENTION_OPS = ("decode_attn", "prefill_attn")
META_KEY = "paged_attention"
TOKEN_FRACTIONS = (1, 2, 4)          # measured: the whole op, a half and a quarter (nano-batches)


def paged_ops(profile: ProfileTable) -> list[str]:
    """The attention ops the profile has solo paged rows of."""
    rows = profile.rows
    have = set(rows[(rows["impl"] == PAGED_IMPL) & (rows["co_class"] == "")]["op"])
    return [op for op in ATTENTION_OPS if op in have]


def paged_energy_points(profile: ProfileTable) -> list[EnergyPoint]:
    try:
        return [EnergyPoint(**d) for d in (profile.meta.get(META_KEY) or {}).get("energy_points", [])]
    except (TypeError, NfsearchError) as exc:
        raise NfsearchError(f"profile {META_KEY} energy points: {exc}") from None


def engine_view(profile: ProfileTable) -> ProfileTable:
    """The profile a family prices the engine with (module doc); the profile itself without paged rows."""
    ops = paged_ops(profile)
    if not ops:
        return profile
    rows = profile.rows[~(profile.rows["op"].isin(ops) & (profile.rows["impl"] != PAGED_IMPL))]
    meta = dict(profile.meta)
    paged = [p for p in paged_energy_points(profile) if p.op in ops]
    swap = {p.op for p in paged}
    if profile.energy is not None and swap:
        points = [p for p in profile.energy.points if p.op not in swap] + paged
        meta[ENERGY_KEY] = dataclasses.replace(profile.energy, points=tuple(sorted(points, key=lambda p: p.key))
                                               ).to_dict()
    return ProfileTable(rows, meta, is_engine_view=True, base_fingerprint=profile.fingerprint())


def pricing(profile: ProfileTable) -> dict:
    """The family file's record of how attention was priced: {"impl": "paged" | "mixed" | "contiguous", "note"}
    ("mixed": one attention op has paged rows, the other not)."""
    ops = paged_ops(profile)
    contiguous = [op for op in ATTENTION_OPS if op not in ops]
    names = lambda op: "/".join(profile.impls(op)) or "none"
    if not ops:
        return {"impl": "contiguous", "note": "attention priced with the contiguous kernels (" + ", ".join(
            f"{op} {names(op)}" for op in ATTENTION_OPS) + "): the profile has no paged rows of the engine's "
            "kernels (`nfsearch profile --family FAMILY.json` measures them)"}
    energy = {p.op for p in paged_energy_points(profile)} & set(ops)
    note = (f"attention priced with the engine's paged kernels ({', '.join(ops)}; energy "
            f"{'of ' + ', '.join(sorted(energy)) + ' ' if energy else ''}"
            f"{'from the paged points' if energy else 'from the contiguous points'})")
    if contiguous:
        note += f"; {', '.join(f'{op} {names(op)}' for op in contiguous)} contiguous (no paged rows)"
    return {"impl": "paged" if not contiguous else "mixed", "note": note}


# ------------------------------------------------------------------------------------------ measuring
@dataclasses.dataclass(frozen=True, order=True)
class AttentionShape:
    """One bucket's whole attention op: requests (decode) or chunk tokens (prefill) at its context."""
    op: str
    num_tokens: int
    context: int


def bucket_shapes(workloads: list[Workload]) -> list[AttentionShape]:
    """The attention ops of the buckets' batches (their plans' workloads), each shape once."""
    out = set()
    for wl in workloads:
        if wl.num_decode:
            out.add(AttentionShape("decode_attn", wl.num_decode, wl.decode_context))
        if wl.num_prefill_tokens:
            out.add(AttentionShape("prefill_attn", wl.num_prefill_tokens, wl.prefill_context))
    return sorted(out)


def token_levels(num_tokens: int) -> list[int]:
    return sorted({max(1, -(-num_tokens // k)) for k in TOKEN_FRACTIONS})


def family_grid(shapes: list[AttentionShape]) -> dict[tuple[str, int], list[int]]:
    """(op, context) -> the token counts measured there (every shape's levels at its context)."""
    grid: dict[tuple[str, int], set[int]] = {}
    for s in shapes:
        grid.setdefault((s.op, s.context), set()).update(token_levels(s.num_tokens))
    return {key: sorted(v) for key, v in sorted(grid.items())}


def family_plan(model: ModelSpec, workloads: list[Workload], num_sms: int, granularity: int,
                is_quick: bool = False, settings=None, label: str = "plan family"):
    """measurements.Plan of the paged attention at the buckets' shapes on every SM count of the grid
    (quick: 2 and 8 granules and the whole GPU)."""
    from nfsearch.runtime import measurements as m
    grid_sms = m.sm_grid(num_sms, granularity)
    if is_quick:
        grid_sms = sorted({s for s in (2 * granularity, 8 * granularity, num_sms) if s <= num_sms})
    shapes = bucket_shapes(workloads)
    if not shapes:
        raise NfsearchError(f"{label}: no bucket has attention to measure")
    grid = family_grid(shapes)
    points = [m.Point("solo", op, PAGED_IMPL, t, ctx, sms) for (op, ctx), tokens in grid.items()
              for sms in sorted(grid_sms, reverse=True) for t in tokens]
    cover = Workload("cover", 1, 1024, (256,), 1, "bf16")
    ops = {op.name: op for op in layer_ops(model, cover)}
    described = {"ops": sorted({op for op, _ in grid}), "sm_counts": grid_sms, "is_quick": is_quick,
                 "shapes": [f"{s.op} {s.num_tokens} x {s.context}" for s in shapes],
                 "tokens_by_context": {f"{op} {ctx}": tokens for (op, ctx), tokens in grid.items()},
                 "covers": label}
    return m.Plan(model, 1, num_sms, granularity, is_quick, settings or m.Settings(), ops, points, described,
                  impls={op: (PAGED_IMPL,) for op in ATTENTION_OPS})


def energy_requests(shapes: list[AttentionShape], table: ProfileTable, num_sms: int) -> tuple[list, list[str]]:
    """measurements.EnergyRequest of each shape (the whole op, whole GPU, paged) and a note per miss."""
    from nfsearch.runtime.measurements import EnergyRequest
    out, notes = [], []
    for s in shapes:
        try:
            ms = table.time_ms(s.op, s.num_tokens, num_sms, s.context, impl=PAGED_IMPL)[0]
        except NfsearchError as exc:
            notes.append(f"{s.op} {s.num_tokens} x {s.context}: {exc}")
            continue
        out.append(EnergyRequest(s.op, PAGED_IMPL, s.num_tokens, s.context, ms))
    return out, notes


def merge_paged(base: ProfileTable, measured: ProfileTable, record: dict,
                energy_points: list[EnergyPoint] = ()) -> ProfileTable:
    """`base` with `measured`'s solo paged attention rows (earlier paged rows of the same op and context
    replaced) and `record` (plus the energy points, merged by key) under meta["paged_attention"]."""
    rows = measured.rows
    new = rows[(rows["impl"] == PAGED_IMPL) & rows["op"].isin(ATTENTION_OPS) & (rows["co_class"] == "")]
    if new.empty:
        raise NfsearchError("no paged attention point was measured: nothing to merge")
    old = base.rows
    fresh = set(zip(new["op"], new["context"]))
    replaced = (old["impl"] == PAGED_IMPL) & pd.Series([k in fresh for k in zip(old["op"], old["context"])],
                                                       index=old.index, dtype=bool)
    prior = dict(base.meta.get(META_KEY) or {})
    points = {p.key: p for p in paged_energy_points(base)}
    points.update({p.key: p for p in energy_points})
    runs = list(prior.get("runs", [])) + [record]
    meta = {**base.meta, META_KEY: {"runs": runs, "energy_points": [points[k].to_dict() for k in sorted(points)]}}
    return ProfileTable(pd.concat([old[~replaced], new], ignore_index=True), meta)


# ------------------------------------------------------------------------------------------ reporting
def compare_lines(family, profile: ProfileTable) -> list[str]:
    """Per bucket of `family`: each attention op's predicted whole time per layer on the whole GPU (and
    its energy per call, where the profile has energy) by the paged rows against the contiguous ones."""
    from nfsearch.cost import make_problem
    from nfsearch.family.predict import attention_ms
    views = {"paged": engine_view(profile), "contiguous": profile}
    if not views["paged"].is_engine_view:
        return [f"the profile has no paged attention rows: {pricing(profile)['note']}"]
    header = (f"{'bucket T/B/S/ctx':>20} {'hits':>6} {'op':<13} {'shape':>12} {'paged ms':>9} {'contig ms':>10} "
              f"{'impl':>6} {'x':>5} {'paged J':>8} {'contig J':>8}")
    lines = [header]
    total = max(1, family.num_iterations)
    for b in family.buckets:
        wl, k = b.plan.workload, b.bucket
        problems = {name: make_problem(b.plan.model, wl, view) for name, view in views.items()}
        costs = {name: p.cost for name, p in problems.items()}
        times = {name: attention_ms(p) for name, p in problems.items()}
        for op, paged in times["paged"].items():
            contiguous = times["contiguous"][op]
            shape = f"{costs['paged'].whole_tokens[op]}@{costs['paged'].context(op)}"
            joules = []
            for name in ("paged", "contiguous"):
                cost = costs[name]
                try:
                    joules.append(f"{cost.energy.op_energy(op, cost.whole_tokens[op], cost.context(op))[0]:.4f}"
                                  if cost.energy is not None else "-")
                except NfsearchError:
                    joules.append("-")
            hits = f"{100 * b.num_iterations / total:.1f}%" if b.num_iterations else "-"
            lines.append(f"{f'{k.max_tokens}/{k.max_decode}/{k.max_segments}/{k.max_context}':>20} {hits:>6} "
                         f"{op:<13} {shape:>12} {paged['ms']:>9.4f} {contiguous['ms']:>10.4f} "
                         f"{contiguous['impl']:>6} {contiguous['ms'] / paged['ms']:>5.2f} {joules[0]:>8} {joules[1]:>8}")
    lines.append("per layer, the whole op on the whole GPU; x: contiguous / paged; J: energy per call (the paged "
                 "points where measured, else the profile's points scaled)")
    return lines
