"""The engine's attention in a plan family: priced by the paged kernels the engine runs, where measured.

The serving engine runs decode attention through page tables and each prefill chunk over its
request's cached prefix (runtime/kernels/paged_attention.py), whatever a plan names. A profile's
"paged" rows (runtime/kernels/paged_adapters.py) time those kernels behind the contiguous signatures:
decode attention (requests, context) with every request at that context, its pages shuffled, the
page tables as wide as the bucket's context cap; prefill attention (tokens, context) with `context`
the cost model's pair-weighted prompt length (specs.Workload.prefill_context), measured as one chunk
of T tokens over a prefix of (context - T) // 2 where context >= T (a chunk of C tokens over a prefix
of P is the row (C, C + 2P)), else as whole prompts of that length (paged_adapters.prefill_chunks).
"paged_fp8kv" rows are the same over the engine's fp8 KV cache (`--kv-cache-dtype fp8`).

* `engine_view(profile, kv_cache_dtype)`: what a family prices with. Per attention op, the rows of the
  first impl of KV_PREFERENCE[kv_cache_dtype] the profile has (fp8: paged_fp8kv, then the bf16 paged
  rows), else its contiguous rows; that impl's paged energy points in place of the op's others; and
  in the pair table, each pair family (two ops) that has paged pair points of such an impl takes
  those in place of its contiguous points (so the cost model's pair model prices a family's overlap
  stretch from them). How is kept in the view's meta[VIEW_KEY]; `pricing` states it.
* `merge_paged`: the base profile with a run's rows (replacing earlier rows of the same impl at the
  same contexts) and the run's record, energy points and pair points under meta["paged_attention"]
  (the base's own energy and pair table, which the contiguous search prices, are left as they were).
* The measurement plan of `nfsearch profile --family` is family/attention_plan.py.
"""

from __future__ import annotations

import dataclasses

import pandas as pd

from nfsearch.energy import ENERGY_KEY, EnergyPoint
from nfsearch.errors import NfsearchError
from nfsearch.family.attention_plan import (  # noqa: F401 - re-exported: the plan's names, as before
    ATTENTION_OPS,
    FP8KV_IMPL,
    GEMM_OPS,
    PAGED_IMPL,
    TOKEN_FRACTIONS,
    AttentionShape,
    bucket_shapes,
    energy_requests,
    family_grid,
    family_kv_dtype,
    family_plan,
    token_levels,
)
from nfsearch.pairs import PairPoint, pairs_meta, points_from_meta
from nfsearch.plan import ENGINE_IMPLS
from nfsearch.profile import ProfileTable

INPUTS = ("paged impls: the engine's kernels (runtime/kernels/paged_attention.py) on a copy of random K/V in "
          "shuffled 16-token pages (paged: the inputs' bf16; paged_fp8kv: e4m3 with a float32 scale per token and "
          "kv head, written as the engine writes it); decode_attn: `num_tokens` requests, each at `context` tokens, "
          "page tables as wide as the bucket's context cap (grid decode_max_context); prefill_attn: `context` is "
          "the pair-weighted prompt length (specs.Workload.prefill_context): where context >= num_tokens one chunk "
          "of num_tokens over a cached prefix of (context - num_tokens) // 2 (a chunk of C over a prefix of P is "
          "the row (C, C + 2P)), else prompts of `context` tokens (the last one shorter)")
META_KEY = "paged_attention"
VIEW_KEY = "engine_view"             # an engine view's meta: how it priced attention (pricing reads it)
KV_PREFERENCE = {"auto": (PAGED_IMPL,), "fp8": (FP8KV_IMPL, PAGED_IMPL)}


def _solo_impls(profile: ProfileTable) -> dict[str, set[str]]:
    rows = profile.rows
    solo = rows[rows["impl"].isin(ENGINE_IMPLS) & (rows["co_class"] == "")]
    return {op: set(solo[solo["op"] == op]["impl"]) for op in ATTENTION_OPS}


def paged_ops(profile: ProfileTable) -> list[str]:
    """The attention ops the profile has solo rows of some paged impl of."""
    have = _solo_impls(profile)
    return [op for op in ATTENTION_OPS if have[op]]


def attention_impls(profile: ProfileTable, kv_cache_dtype: str = "auto") -> dict[str, str | None]:
    """Per attention op, the paged impl an engine of this KV cache is priced by (None: contiguous)."""
    have = _solo_impls(profile)
    prefer = KV_PREFERENCE[kv_cache_dtype or "auto"]
    return {op: next((i for i in prefer if i in have[op]), None) for op in ATTENTION_OPS}


def paged_energy_points(profile: ProfileTable) -> list[EnergyPoint]:
    try:
        return [EnergyPoint(**d) for d in (profile.meta.get(META_KEY) or {}).get("energy_points", [])]
    except (TypeError, NfsearchError) as exc:
        raise NfsearchError(f"profile {META_KEY} energy points: {exc}") from None


def paged_pair_points(profile: ProfileTable) -> list[PairPoint]:
    """The pair points of paged attention beside the GEMMs (and decode beside prefill) the runs measured."""
    return points_from_meta(profile.meta.get(META_KEY) or {}, f"{profile.label} {META_KEY}")


def _pair_impl(p: PairPoint) -> str:
    """The paged impl of a pair point's attention side(s)."""
    return p.impl_a if p.a.op in ATTENTION_OPS else p.impl_b


def _view_pairs(profile: ProfileTable, chosen: dict[str, str | None], prefer: tuple[str, ...]
                ) -> tuple[list[PairPoint] | None, dict[str, str]]:
    """The view's pair table (None: the profile's as it is) and, per pair family taken from paged pair
    points, their impl: a family whose attention ops are all priced paged takes the points of the first
    impl of `prefer` it has, in place of its contiguous points."""
    found: dict[tuple[str, str], dict[str, list[PairPoint]]] = {}
    for p in paged_pair_points(profile):
        if all(chosen.get(op) for op in (p.a.op, p.b.op) if op in ATTENTION_OPS):
            found.setdefault((p.a.op, p.b.op), {}).setdefault(_pair_impl(p), []).append(p)
    taken = {fam: next((i for i in prefer if i in by_impl), None) for fam, by_impl in found.items()}
    taken = {fam: impl for fam, impl in taken.items() if impl}
    if not taken:
        return None, {}
    swapped = set(taken) | {(b, a) for a, b in taken}
    points = [p for p in points_from_meta(profile.meta, profile.label) if (p.a.op, p.b.op) not in swapped]
    points += [p for fam, impl in taken.items() for p in found[fam][impl]]
    return points, {f"{a} x {b}": impl for (a, b), impl in sorted(taken.items())}


def engine_view(profile: ProfileTable, kv_cache_dtype: str = "auto") -> ProfileTable:
    """The profile a family of this KV cache prices the engine with (module doc); the profile itself
    where it has no paged rows."""
    chosen = attention_impls(profile, kv_cache_dtype)
    ops = [op for op, impl in chosen.items() if impl]
    if not ops:
        return profile
    rows = profile.rows
    other = rows["op"].isin(ops) & (rows["impl"] != rows["op"].map(chosen))   # the op's other impls
    rows = rows[~other & ~(rows["impl"].isin(ENGINE_IMPLS) & ~rows["op"].isin(ops))]
    meta = dict(profile.meta)
    paged = [p for p in paged_energy_points(profile) if chosen.get(p.op) == p.impl]
    swap = {p.op for p in paged}
    if profile.energy is not None and swap:
        points = [p for p in profile.energy.points if p.op not in swap] + paged
        meta[ENERGY_KEY] = dataclasses.replace(profile.energy, points=tuple(sorted(points, key=lambda p: p.key))
                                               ).to_dict()
    pairs, pair_impls = _view_pairs(profile, chosen, KV_PREFERENCE[kv_cache_dtype or "auto"])
    if pairs is not None:
        entry = profile.meta.get("pairs") or profile.meta[META_KEY]["pairs"]
        meta["pairs"] = pairs_meta(pairs, entry.get("method", ""), int(entry.get("failures", 0) or 0))
    meta[VIEW_KEY] = {"kv_cache_dtype": kv_cache_dtype or "auto",
                      "attention": {op: impl or "contiguous" for op, impl in chosen.items()},
                      "energy_ops": sorted(swap), "pairs": pair_impls,
                      "contiguous_pairs": sorted({f"{p.a.op} x {p.b.op}" for p in points_from_meta(meta, "view")
                                                  if {p.a.op, p.b.op} & set(ops) and f"{p.a.op} x {p.b.op}"
                                                  not in pair_impls})}
    return ProfileTable(rows.reset_index(drop=True), meta, is_engine_view=True,
                        base_fingerprint=profile.fingerprint())


def pricing(profile: ProfileTable, kv_cache_dtype: str = "auto") -> dict:
    """The family file's record of how attention was priced: {"impl": "paged" | "mixed" | "contiguous", "note"}
    ("mixed": one attention op has paged rows, the other not). `profile`: an engine view (what it did), or
    a profile (what its engine view for this KV cache would do)."""
    view = profile if VIEW_KEY in profile.meta else engine_view(profile, kv_cache_dtype)
    names = lambda op: "/".join(profile.impls(op)) or "none"
    how = view.meta.get(VIEW_KEY)
    fp8 = (how or {}).get("kv_cache_dtype", kv_cache_dtype) == "fp8"
    if how is None:
        return {"impl": "contiguous", "note": "attention priced with the contiguous kernels (" + ", ".join(
            f"{op} {names(op)}" for op in ATTENTION_OPS) + "): the profile has no paged rows of the engine's "
            "kernels (`nfsearch profile --family FAMILY.json` measures them)" +
            ("; the engine's KV cache is fp8" if fp8 else "")}
    impls = {op: i for op, i in how["attention"].items() if i != "contiguous"}
    contiguous = [op for op in ATTENTION_OPS if op not in impls]
    energy = how["energy_ops"]
    note = (f"attention priced with the engine's paged kernels ({', '.join(f'{op} {i}' for op, i in impls.items())}; "
            f"energy {'of ' + ', '.join(energy) + ' ' if energy else ''}"
            f"{'from the paged points' if energy else 'from the contiguous points'})")
    if fp8 and any(i != FP8KV_IMPL for i in impls.values()):
        note += (f"; fp8 KV cache, but no {FP8KV_IMPL} rows of "
                 f"{', '.join(op for op, i in impls.items() if i != FP8KV_IMPL)}: the bf16 paged rows")
    if contiguous:
        note += f"; {', '.join(f'{op} {names(op)}' for op in contiguous)} contiguous (no paged rows)"
    if how["pairs"]:
        note += (f"; overlap stretches of {', '.join(f'{fam} ({i})' for fam, i in how['pairs'].items())} from the "
                 f"paged pair points")
    if how["contiguous_pairs"]:
        note += (f"; of {', '.join(how['contiguous_pairs'])} from the contiguous pair table" if how["pairs"] else
                 "; overlap stretches from the contiguous pair table (no paged pair points)")
    return {"impl": "paged" if not contiguous else "mixed", "note": note}


def merge_paged(base: ProfileTable, measured: ProfileTable, record: dict,
                energy_points: list[EnergyPoint] = ()) -> ProfileTable:
    """`base` with `measured`'s solo paged attention rows (earlier rows of the same op, impl and context
    replaced), its GEMM rows at the record's grid's `gemm_rows`, and `record`, the energy points (merged
    by impl and key) and the pair points (merged by family, split and paged impl) under
    meta["paged_attention"]."""
    rows = measured.rows
    new = rows[rows["impl"].isin(ENGINE_IMPLS) & rows["op"].isin(ATTENTION_OPS) & (rows["co_class"] == "")]
    if new.empty:
        raise NfsearchError("no paged attention point was measured: nothing to merge")
    old = base.rows
    fresh = set(zip(new["op"], new["impl"], new["context"]))
    replaced = pd.Series([k in fresh for k in zip(old["op"], old["impl"], old["context"])], index=old.index,
                         dtype=bool)
    # the GEMMs at the buckets' row counts on the grid (attention_plan's gemm_rows): beside the base's
    # own rows of those impls, replacing any at the same tokens and SM count
    gemm_rows = set((record.get("grid") or {}).get("gemm_rows") or ())
    gemm = rows[rows["op"].isin(GEMM_OPS) & rows["num_tokens"].isin(gemm_rows) & (rows["co_class"] == "")]
    solo = old["co_class"] == ""
    # a row count goes in only on every SM count the base has of that op and impl (lookups need each
    # corner of the tokens x SM grid)
    base_sms = {key: set(g["sm_count"]) for key, g in old[solo & old["op"].isin(GEMM_OPS)].groupby(["op", "impl"])}
    if not gemm.empty:
        gemm = gemm.groupby(["op", "impl", "num_tokens"]).filter(
            lambda g: base_sms.get(g.name[:2], set()) <= set(g["sm_count"]))
    keys = set(zip(gemm["op"], gemm["impl"], gemm["num_tokens"], gemm["sm_count"]))
    replaced |= solo & pd.Series([k in keys for k in zip(old["op"], old["impl"], old["num_tokens"],
                                                          old["sm_count"])], index=old.index, dtype=bool)
    new = pd.concat([new, gemm], ignore_index=True)
    prior = dict(base.meta.get(META_KEY) or {})
    points = {(p.impl, *p.key): p for p in paged_energy_points(base)}
    points.update({(p.impl, *p.key): p for p in energy_points})
    pair_key = lambda p: (p.a, p.b, p.sms_a, p.sms_b, _pair_impl(p))
    pairs = {pair_key(p): p for p in paged_pair_points(base)}
    pairs.update({pair_key(p): p for p in points_from_meta(measured.meta, "the run")})
    entry = {"runs": list(prior.get("runs", [])) + [record],
             "energy_points": [points[k].to_dict() for k in sorted(points)]}
    if pairs:
        method = (measured.meta.get("pairs") or prior.get("pairs") or {}).get("method", "")
        entry["pairs"] = pairs_meta([pairs[k] for k in sorted(pairs, key=str)], method)
    meta = {**base.meta, META_KEY: entry}
    return ProfileTable(pd.concat([old[~replaced], new], ignore_index=True), meta)


# ------------------------------------------------------------------------------------------ reporting
def compare_lines(family, profile: ProfileTable) -> list[str]:
    """Per bucket of `family`: each attention op's predicted whole time per layer on the whole GPU (and
    its energy per call, where the profile has energy) by the paged rows against the contiguous ones."""
    from nfsearch.cost import make_problem
    from nfsearch.family.predict import attention_ms
    kv = family_kv_dtype(family)
    views = {"paged": engine_view(profile, kv), "contiguous": profile}
    if not views["paged"].is_engine_view:
        return [f"the profile has no paged attention rows: {pricing(profile, kv)['note']}"]
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
    lines.append(pricing(views["paged"])["note"])
    return lines
