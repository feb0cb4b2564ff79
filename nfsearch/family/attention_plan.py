"""What `nfsearch profile --family FAMILY.json` measures: the engine's attention at the family's buckets.

* Solo rows (`family_plan`): each bucket's decode attention (its mean batch's requests at their mean
  context) and prefill attention (its chunks' tokens at their pair-weighted context) at the whole op,
  a half and a quarter of it, on every SM count of the partition grid, through the impl of the
  family's KV cache (`kv_impl`: "paged", or "paged_fp8kv" for a family solved with
  `--kv-cache-dtype fp8`; runtime/kernels/paged_adapters.py).
* Decode page tables as wide as the bucket's context cap (`decode_caps`), as the engine sizes them
  (runtime/step_inputs.py: ceil(max_context / page_size) pages), so the decode kernel picks the split
  count the engine runs (paged_attention.decode_splits reads the tables' width, not the lengths).
* Pairs (`pair_families`): the pair table's families with the paged attention as a side, at the
  family's shapes. Per bucket with iterations: each GEMM over all of the batch's tokens and over half
  (`gemm_levels`) beside its decode attention and beside its prefill attention, and its decode
  beside its prefill attention; each on the splits that give the attention side (decode, beside
  prefill) ATTENTION_SMS SMs and the other side the rest. Measured as every pair point is
  (runtime/profiler.py: each side's fastest impl alone on its partition, then both launched
  together); a GEMM side chooses among the base profile's impls of it (`gemm_impls`).
* GEMM rows (`gemm_rows`): each GEMM whole at each bucket's row count, with each impl the base profile
  has of it, on every SM count the base has of the GEMMs (a profile's SM counts share its token grid).
  The engine's graphs run every GEMM at the bucket's rows however few the batch fills, and cuBLAS's
  kernel choice is per shape: the profile's grid (multiples of 128, then wider) can miss a row count
  where its pick is slow (E1's 448 rows on an H100).
* The budget (`fit_pairs`): buckets' pairs are taken in order of iterations while the pairs'
  estimated wall time stays within a budget; `wall_estimate` is the whole run's, by part.

Torch-free: the plan only (measurements.Plan); runtime/paged_profile.py measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

from nfsearch import pairs as pair_table
from nfsearch.errors import NfsearchError
from nfsearch.graph import layer_ops
from nfsearch.plan import NON_MEASURED_IMPLS
from nfsearch.runtime import measurements as m
from nfsearch.specs import ModelSpec, Workload

ATTENTION_OPS = ("decode_attn", "prefill_attn")
GEMM_OPS = ("kqv", "o", "ug", "d")
PAGED_IMPL = "paged"
FP8KV_IMPL = "paged_fp8kv"
KV_IMPLS = {"auto": PAGED_IMPL, "fp8": FP8KV_IMPL}      # the engine's --kv-cache-dtype -> its attention impl
TOKEN_FRACTIONS = (1, 2, 4)          # measured: the whole op, a half and a quarter (nano-batches)
ATTENTION_SMS = (16, 32, 48, 64)     # pairs: the attention side's SMs (the GEMMs', prefill's: the rest)
PAIR_BUDGET_S = 45.0                 # default estimated wall seconds of the pair points

# Wall seconds of the run by part (for the budget and the printout): the roofline's kernel time
# (measurements.estimate_ms) plus each point's host side, guessed from the profiler's method and not
# yet checked against a run: a solo point ~15 ms (warm-up, the lead, events, one sync), a pair point
# ~40 ms (two warm launches and a sync, the lead, ten launches, the clock spin, NVML's clock).
START_S = 20.0           # interpreter, CUDA context, green-context partitions, the inputs
COMPILE_S = 15.0         # Triton compiles of the paged kernels (decode direct and split + reduce, prefill)
PAIR_COMPILE_S = 10.0    # with pairs: the GEMM impls' compiles and weights
SOLO_HOST_S = 0.015
PAIR_HOST_S = 0.04
ENERGY_S = 1.5           # one energy point: graph capture, 0.2 s warm-up, a 0.3 s window, NVML reads


def kv_impl(kv_cache_dtype: str | None) -> str:
    """The paged attention impl of an engine with this --kv-cache-dtype ("auto" or "fp8")."""
    if (kv_cache_dtype or "auto") not in KV_IMPLS:
        raise NfsearchError(f"KV cache dtype {kv_cache_dtype!r}: the engine has {', '.join(KV_IMPLS)}")
    return KV_IMPLS[kv_cache_dtype or "auto"]


def family_kv_dtype(family) -> str:
    return family.memory.get("kv_cache_dtype") or "auto"


# ------------------------------------------------------------------------------------------- solo rows
@dataclass(frozen=True, order=True)
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


def token_levels(num_tokens: int, fractions=TOKEN_FRACTIONS) -> list[int]:
    return sorted({max(1, -(-num_tokens // k)) for k in fractions})


def family_grid(shapes: list[AttentionShape]) -> dict[tuple[str, int], list[int]]:
    """(op, context) -> the token counts measured there (every shape's levels at its context)."""
    grid: dict[tuple[str, int], set[int]] = {}
    for s in shapes:
        grid.setdefault((s.op, s.context), set()).update(token_levels(s.num_tokens))
    return {key: sorted(v) for key, v in sorted(grid.items())}


def decode_caps(family) -> dict[int, int]:
    """Decode context -> the page-table width (tokens) of the engine bucket it is the mean of: that
    bucket's context cap in whole pages (the widest where buckets share a context)."""
    page = family.engine.page_size
    caps: dict[int, int] = {}
    for b in family.buckets:
        wl = b.plan.workload
        if wl.num_decode:
            cap = -(-b.bucket.max_context // page) * page
            caps[wl.decode_context] = max(caps.get(wl.decode_context, 0), cap)
    return caps


# ------------------------------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class PairFamily:
    """Two pair sides of one bucket's batch (a GEMM or decode attention first) and the bucket's hits."""
    a: pair_table.PairSide
    b: pair_table.PairSide
    bucket: str
    num_iterations: int

    def describe(self) -> str:
        return f"{self.a.describe()} x {self.b.describe()}"


def pair_families(family, model: ModelSpec) -> list[PairFamily]:
    """The pair families of the buckets with iterations (all buckets where none has), most iterations
    first, each pair of sides once (module doc)."""
    ops = {op.name: op for op in layer_ops(model, Workload("cover", 1, 1024, (256,), 1, "bf16"))}
    gemms = [op for op in ops.values() if op.is_gemm and op.op_class == "compute"]
    side = lambda name, t, c=0: pair_table.PairSide(name, ops[name].op_class, t, c)
    buckets = [b for b in family.buckets if b.num_iterations] or list(family.buckets)
    out: dict[tuple, PairFamily] = {}
    for b in sorted(buckets, key=lambda b: -b.num_iterations):
        wl, k = b.plan.workload, b.bucket
        name = f"{k.max_tokens}/{k.max_decode}/{k.max_segments}/{k.max_context}"
        gemm_tokens = gemm_levels(wl.num_tokens)
        attention = []
        if wl.num_decode:
            attention.append(side("decode_attn", wl.num_decode, wl.decode_context))
        if wl.num_prefill_tokens:
            attention.append(side("prefill_attn", wl.num_prefill_tokens, wl.prefill_context))
        pairs = [(side(g.name, t), a) for a in attention for g in gemms for t in gemm_tokens]
        if len(attention) == 2:
            pairs.append(tuple(attention))
        for a, bside in pairs:
            out.setdefault((a, bside), PairFamily(a, bside, name, b.num_iterations))
    return list(out.values())


def gemm_levels(num_tokens: int, chunk: int = 128) -> list[int]:
    """A GEMM pair side's tokens in a batch of `num_tokens`: all of them, and half rounded down to the
    search's chunks (half rounded up where that is under one chunk), so its nano-batches fall between."""
    half = num_tokens // 2 // chunk * chunk or -(-num_tokens // 2)
    return sorted({half, num_tokens})


def attention_splits(num_sms: int, granularity: int) -> list[int]:
    """The attention side's SM counts: ATTENTION_SMS on the partition grid (up to half the GPU), else
    the smallest few splits the grid has."""
    fit = [s for s in ATTENTION_SMS if s % granularity == 0 and s <= num_sms // 2]
    return fit or list(range(granularity, num_sms // 2 + 1, granularity))[:len(ATTENTION_SMS)]


def pair_points(families: list[PairFamily], num_sms: int, granularity: int) -> list[m.Point]:
    """Every family on every attention split: side B (attention beside a GEMM) or side A (decode beside
    prefill) on s SMs, the other side on the rest."""
    out = []
    for f in families:
        for s in attention_splits(num_sms, granularity):
            sms_a, sms_b = (s, num_sms - s) if f.a.op in ATTENTION_OPS else (num_sms - s, s)
            out.append(m.Point("pair", f.a.op, "", f.a.num_tokens, f.a.context, sms_a, f.b.op_class, sms_b,
                               f.b.op, f.b.num_tokens, f.b.context))
    return out


def gemm_impls(family, measured: dict[str, list[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """Per GEMM op of the family's plans: the impls `measured` (the base profile) has, as the contiguous
    pair table's GEMM sides chose among (the fastest alone on its partition runs, and the cost model
    restates a stretch over the fastest solo time); else those the plans name; else triton and torch."""
    named: dict[str, set[str]] = {}
    for b in family.buckets:
        for o in b.plan.nano_ops:
            if o.op_class == "compute" and o.op not in ATTENTION_OPS:
                named.setdefault(o.op, set())
                if o.impl not in NON_MEASURED_IMPLS:
                    named[o.op].add(o.impl)
    return {op: tuple(sorted((measured or {}).get(op) or impls or ("triton", "torch")))
            for op, impls in sorted(named.items())}


# ------------------------------------------------------------------------------------------- the plan
def family_plan(model: ModelSpec, workloads: list[Workload], num_sms: int, granularity: int,
                is_quick: bool = False, settings=None, label: str = "plan family", *, impl: str = PAGED_IMPL,
                caps: dict[int, int] | None = None, pairs: list[PairFamily] = (),
                gemms: dict[str, tuple[str, ...]] | None = None, gemm_rows: tuple[int, ...] = (),
                gemm_sms: tuple[int, ...] = ()) -> m.Plan:
    """measurements.Plan of `impl` at the buckets' shapes on every SM count of the grid (quick: 2 and 8
    granules and the whole GPU), decode page tables `caps` wide, the `pairs` (GEMM sides among `gemms`'
    impls) on attention_splits, and each of `gemms`' impls whole at each of `gemm_rows` (the buckets' row
    counts, which the engine's graphs run every GEMM at: module doc) on `gemm_sms` (the base profile's
    SM counts of the GEMMs, quick or not; default: the whole grid)."""
    grid_sms = m.sm_grid(num_sms, granularity)
    if is_quick:
        grid_sms = sorted({s for s in (2 * granularity, 8 * granularity, num_sms) if s <= num_sms})
    shapes = bucket_shapes(workloads)
    if not shapes:
        raise NfsearchError(f"{label}: no bucket has attention to measure")
    grid = family_grid(shapes)
    points = [m.Point("solo", op, impl, t, ctx, sms) for (op, ctx), tokens in grid.items()
              for sms in sorted(grid_sms, reverse=True) for t in tokens]
    points += pair_points(list(pairs), num_sms, granularity)
    gemm_sms = sorted(set(gemm_sms) or set(m.sm_grid(num_sms, granularity)), reverse=True)
    points += [m.Point("solo", op, i, t, 0, sms) for op, op_impls in sorted((gemms or {}).items())
               for i in op_impls for sms in gemm_sms for t in sorted(set(gemm_rows))]
    cover = Workload("cover", 1, 1024, (256,), 1, "bf16")
    ops = {op.name: op for op in layer_ops(model, cover)}
    impls = {op: (impl,) for op in ATTENTION_OPS} | {op: tuple(i) for op, i in (gemms or {}).items()}
    caps = {ctx: cap for ctx, cap in (caps or {}).items() if ("decode_attn", ctx) in grid}
    described = {"ops": sorted({op for op, _ in grid}), "impl": impl, "sm_counts": grid_sms, "is_quick": is_quick,
                 "shapes": [f"{s.op} {s.num_tokens} x {s.context}" for s in shapes],
                 "tokens_by_context": {f"{op} {ctx}": tokens for (op, ctx), tokens in grid.items()},
                 "decode_max_context": {str(ctx): cap for ctx, cap in sorted(caps.items())},
                 "pair_families": [f.describe() for f in pairs],
                 "pair_attention_sms": attention_splits(num_sms, granularity) if pairs else [],
                 "pair_impls": {op: list(i) for op, i in (gemms or {}).items()} if pairs else {},
                 "gemm_rows": sorted(set(gemm_rows)) if gemms else [],
                 "covers": label}
    return m.Plan(model, 1, num_sms, granularity, is_quick, settings or m.Settings(), ops, points, described,
                  impls=impls, decode_max_context=caps)


def fit_pairs(build, families: list[PairFamily], budget_s: float):
    """(plan, buckets left out): build(families) with the pair families of as many buckets as fit,
    most iterations first, in `budget_s` estimated seconds of pair points (pairs_wall_s)."""
    buckets = list(dict.fromkeys(f.bucket for f in families))
    for k in range(len(buckets), -1, -1):
        plan = build([f for f in families if f.bucket in buckets[:k]])
        if k == 0 or pairs_wall_s(plan) <= budget_s:
            return plan, buckets[k:]
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------- estimates
def _kernel_s(plan: m.Plan, op: str, impl: str, t: int, ctx: int, sms: int, calls: int) -> float:
    return calls * m.estimate_ms(plan, op, impl or "triton", t, ctx, sms) / 1e3


def pairs_wall_s(plan: m.Plan) -> float:
    """Estimated wall seconds of the plan's pair points: each point's launches and host side, and each
    side's impls alone on its partition and on the whole GPU (once per size and SM count)."""
    s = plan.settings
    total, sides = 0.0, set()
    for p in plan.pair_points():
        longer = max(m.estimate_ms(plan, p.op, "triton", p.num_tokens, p.context, p.sm_count),
                     m.estimate_ms(plan, p.partner_op, "triton", p.partner_tokens, p.partner_context, p.partner_sms))
        total += PAIR_HOST_S + (m.PAIR_WARMUP + s.pair_repeats) * 1.3 * longer / 1e3
        for op, t, c, sms in ((p.op, p.num_tokens, p.context, p.sm_count),
                              (p.partner_op, p.partner_tokens, p.partner_context, p.partner_sms)):
            sides |= {(op, i, t, c, n) for n in (sms, plan.num_sms) for i in plan.pair_impls(op, n)}
    total += sum(SOLO_HOST_S + _kernel_s(plan, op, i, t, c, n, s.warmup + s.repeats) for op, i, t, c, n in sides)
    return total


def wall_estimate(plan: m.Plan, num_energy: int = 0) -> dict[str, float]:
    """Estimated wall seconds of `profile --family` on the plan, by part, and their "total"."""
    s = plan.settings
    solo = sum(SOLO_HOST_S + _kernel_s(plan, p.op, p.impl, p.num_tokens, p.context, p.sm_count,
                                       s.warmup + s.repeats) for p in plan.points if p.kind == "solo")
    pairs = pairs_wall_s(plan)
    parts = {"start": START_S, "compile": COMPILE_S + (PAIR_COMPILE_S if pairs else 0.0), "solo": solo,
             "pairs": pairs, "energy": ENERGY_S * num_energy}
    return {k: round(v, 1) for k, v in parts.items()} | {"total": round(sum(parts.values()), 1)}


def describe_estimate(est: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {v:.0f}" for k, v in est.items() if k != "total")
    return f"~{est['total']:.0f} s of GPU wall time estimated ({parts})"


# ------------------------------------------------------------------------------------------- energy
def energy_requests(shapes: list[AttentionShape], table, num_sms: int, impl: str = PAGED_IMPL
                    ) -> tuple[list, list[str]]:
    """measurements.EnergyRequest of each shape (the whole op, whole GPU, `impl`) and a note per miss."""
    out, notes = [], []
    for s in shapes:
        try:
            ms = table.time_ms(s.op, s.num_tokens, num_sms, s.context, impl=impl)[0]
        except NfsearchError as exc:
            notes.append(f"{s.op} {s.num_tokens} x {s.context}: {exc}")
            continue
        out.append(m.EnergyRequest(s.op, impl, s.num_tokens, s.context, ms))
    return out, notes
