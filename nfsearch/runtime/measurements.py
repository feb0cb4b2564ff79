"""The measurement plan of a profile, its checkpoint, and the table built from it (pure Python).

No torch here: the GPU side (nfsearch/runtime/profiler.py) supplies a `measure(point)` function;
this module decides WHAT is measured and keeps the books:

* `make_plan`: the grid of points per op / impl / tokens / context / SM count, the co-run rows, the
  pair table's points and the ceilings. The default grid covers the standard workloads W1-W3 (tokens 128..4096 in
  nano-batches of multiples of 128, decode contexts 1024 and 2048, prompt lengths 256 and 512) in
  union with what the given workload needs, so one table per model serves all of them.
* `Checkpoint`: every finished measurement is appended (and flushed) to `<output>.partial.csv`; a
  killed run started again with the same request continues where it stopped, losing at most the
  measurement in flight. The file's first line holds the plan's identity (model, device, kernel
  code, grid, settings); a different request starts afresh.
* `run_plan`: walks the plan, skips what the checkpoint holds, reports progress with an ETA; a
  failed point is counted and skipped, and a run of failures on a device that no longer answers
  stops the walk (what was measured is still assembled).
* `assemble_table`: the ProfileTable (solo rows, co-run rows with co_class) and its metadata, the
  pair table under meta["pairs"] (nfsearch/pairs.py reads and reports it).
* `summarize`: the key numbers (ceilings, GEMM vs cuBLAS, decode bandwidth, co-run ratios, pairs).

Co-run points: a compute op (the GEMMs, prefill attention) on n SMs beside decode attention (class
memory) on the complementary num_sms - n SMs of ONE green-context split (a group of m SMs for decode
attention, the remainder for the compute op). The measured op is timed while the other side runs
back to back for the whole window; its row's co_class is the other side's class.

Energy points (kind "energy", `energy_plan`): each op of the layer at its whole token count in W1-W3
(for this model) and in the given workload, on the whole GPU with the fastest impl the timing table
has there; the profiler runs each back to back (nfsearch/runtime/power.py) and the profile keeps the
energy per call under meta["energy"] (energy.ProfileEnergy).

Pair points (kind "pair", the pair table): two ops of different classes the search may overlap,
launched together on the two sides of ONE two-way green-context split, at every split on the
partition grid: the smaller side gets m SMs (m = granularity, 2 x granularity, ... <= num_sms / 2),
the other side the rest, in both orientations. Families (`pair_families`): each GEMM x decode
attention, x prefill attention, x each small op (at the GEMM's token count; ops with identical work,
such as norm2 beside norm1, once), x each collective when the runtime has one; decode x prefill
attention. Each side runs its fastest impl on its partition (measured in the same run); the point
records both sides' co-run times, the makespan, each side alone on its partition and on the whole
GPU, and the SM clock (see nfsearch/pairs.py for the columns and profiler.py for the method).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from nfsearch import pairs as pair_table
from nfsearch.errors import NfsearchError
from nfsearch.graph import Op, build_layer, layer_ops, op_context, op_work
from nfsearch.plan import NETWORK_IMPLS, NO_SHARE_IMPLS
from nfsearch.profile import ProfileMiss, ProfileTable
from nfsearch.roofline import BW_FRACTION, interp
from nfsearch.specs import Ceilings, ModelSpec, Workload, load_workload

FORMAT = 3        # 2: pair points with both sides' sizes, checkpoint rows with the pair's detail;
                  # 3: a checkpoint's pair row holds the pair table's point (pairs.PairPoint.to_json)

# ---------------------------------------------------------------------------------------- the grid
TOKENS = (128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
DECODE_REQUESTS = (64, 128, 256, 384, 512)
PROFILED_CONTEXTS = (1024, 2048)       # decode contexts measured (the analytic grid, roofline.DECODE_CONTEXTS, is wider)
PREFILL_TOKENS = (128,) + tuple(range(256, 3841, 256))
PROMPT_LENGTHS = (256, 512)
# co-run splits: decode attention gets a group of m SMs, the compute op the remainder
CORUN_MEMORY_SMS = (8, 16, 24, 32, 40, 48, 64)
CORUN_TOKENS = (128, 256, 512, 1024, 2048, 4096)
CORUN_PREFILL_TOKENS = (128, 256, 512, 1024, 2048, 3840)
CORUN_COMPUTE_OPS = ("kqv", "o", "ug", "d", "prefill_attn")
CORUN_MEMORY_OP = "decode_attn"

QUICK_TOKENS = (128, 512, 2048)
QUICK_DECODE_REQUESTS = (128, 512)
QUICK_PREFILL_TOKENS = (256, 1536)
QUICK_CORUN_MEMORY_SMS = (32,)
QUICK_CORUN_TOKENS = (512, 2048)
QUICK_CORUN_PREFILL_TOKENS = (256, 1536)

# the other side of a co-run: decode attention over 512 requests at context 1024 (W1/W2's decode
# part) beside compute ops; the layer's four GEMMs over 1024 tokens, back to back, beside decode.
MEMORY_BACKGROUND = ("decode_attn", 512, 1024)
COMPUTE_BACKGROUND = (("kqv", "o", "ug", "d"), 1024)

# the pair table's sizes: GEMMs (and small ops, collectives beside them) over these tokens; decode
# attention (requests, context); prefill attention (tokens, prompt length)
PAIR_GEMM_TOKENS = (512, 2048)
ATTENTION_OPS = ("decode_attn",)           # pair sides beside a collective under TP, with the GEMMs
PAIR_DECODE = ((256, 1024), (512, 1024))
PAIR_PREFILL = ((1536, 512),)
QUICK_PAIR_GEMM_TOKENS = (2048,)
MIN_PAIR_GEMM_TOKENS = 256               # the smallest GEMM size of a profiled workload's pairs
QUICK_PAIR_DECODE = ((512, 1024),)
QUICK_PAIR_MINORITY_SMS = (16, 48)       # quick: the smaller side of a split gets one of these
PAIR_WARMUP = 2                          # pair launches before the timed ones

# (op, impl)s left out of profiles: rope_append's torch impl runs about a dozen small ops where the
# triton and cuda impls run one fused kernel; measuring it would lengthen every profile for nothing
SKIP_IMPLS = {("rope_append", "torch")}
DEFAULT_IMPLS = {op: ("triton", "torch") for op in
                 ("norm1", "kqv", "rope_append", "decode_attn", "prefill_attn", "o", "norm2", "ug", "act", "d")}

# the ceilings: a cuBLAS bf16 GEMM of this size and a device-to-device copy of this many bytes
GEMM_CEILING_N = 8192
COPY_CEILING_BYTES = 1 << 30


@dataclass(frozen=True)
class Settings:
    warmup: int = 3
    repeats: int = 12            # the median of this many timed runs
    corun_repeats: int = 10
    pair_repeats: int = 10

    def __post_init__(self):
        if self.warmup < 0 or min(self.repeats, self.corun_repeats, self.pair_repeats) < 1:
            raise ValueError(f"bad profile settings {self}")


@dataclass(frozen=True)
class Point:
    """One measurement. kind: ceiling | solo | corun | pair.

    corun: `op` on `sm_count` SMs while the other side (class co_class) runs on `partner_sms`.
    pair: `op` (num_tokens, context) on `sm_count` SMs and `partner_op` (partner_tokens,
    partner_context) on `partner_sms`, launched together on one split; impl "" (each side runs its
    fastest impl on its partition, chosen when measured); co_class is the partner's class.
    """
    kind: str
    op: str
    impl: str = ""
    num_tokens: int = 0
    context: int = 0
    sm_count: int = 0
    co_class: str = ""
    partner_sms: int = 0
    partner_op: str = ""
    partner_tokens: int = 0
    partner_context: int = 0

    def key(self) -> tuple:
        return (self.kind, self.op, self.impl, self.num_tokens, self.context, self.sm_count, self.co_class,
                self.partner_sms, self.partner_op, self.partner_tokens, self.partner_context)

    def describe(self) -> str:
        if self.kind == "ceiling":
            return f"ceiling {self.op}"
        unit = "req" if self.op == "decode_attn" else "tok"
        ctx = f" ctx {self.context}" if self.context else ""
        text = f"{self.op}/{self.impl} {self.num_tokens} {unit}{ctx} @{self.sm_count}"
        if self.kind == "corun":
            text += f" beside {self.co_class}@{self.partner_sms}"
        if self.kind == "pair":
            text = (f"pair {self.side_a().describe()} @{self.sm_count} + {self.side_b().describe()} "
                    f"@{self.partner_sms}")
        return text

    def side_a(self) -> pair_table.PairSide:
        return pair_table.PairSide(self.op, "", self.num_tokens, self.context)

    def side_b(self) -> pair_table.PairSide:
        return pair_table.PairSide(self.partner_op, self.co_class, self.partner_tokens, self.partner_context)


@dataclass(frozen=True)
class Measurement:
    """What measuring one Point gave. A pair point's whole record is the pair table's point itself
    (pairs.PairPoint: its sides and SM counts come from the Point, its op classes from the plan,
    the rest from the GPU; `Plan.pair_point` builds it); time_ms is then its makespan."""
    time_ms: float                  # solo, co-run or pair makespan time; ceilings: the raw time
    solo_ms: float | None = None    # corun: the op alone on the same split stream
    pair: pair_table.PairPoint | None = None   # pair: the pair table's point

    @classmethod
    def of_pair(cls, point: pair_table.PairPoint) -> Measurement:
        return cls(point.makespan_ms, pair=point)


@dataclass
class Plan:
    model: ModelSpec
    tp_degree: int
    num_sms: int
    granularity: int
    is_quick: bool
    settings: Settings
    ops: dict[str, Op]              # every op with kernels (measured ones and co-run backgrounds)
    points: list[Point]
    grid: dict
    rotate_bytes: float = 150e6
    impls: dict[str, tuple[str, ...]] = field(default_factory=dict)   # op -> impl names measured
    # decode context -> page-table width in tokens for the paged impls (plan.ENGINE_IMPLS): the engine
    # bucket's context cap, which sets the decode kernel's split count (empty: each context's own)
    decode_max_context: dict[int, int] = field(default_factory=dict)

    def pair_impls(self, op: str, sm_count: int | None = None) -> tuple[str, ...]:
        """The impls a pair side chooses among (the fastest alone on its partition runs). A collective
        on 0 SMs (no share) runs a no-share impl (copy engines), on an SM share the others."""
        impls = tuple(i for i in self.impls.get(op, ()) if (op, i) not in SKIP_IMPLS)
        if sm_count is None or op not in self.ops or self.ops[op].op_class != "network":
            return impls
        return tuple(i for i in impls if (i in NO_SHARE_IMPLS) == (sm_count == 0))

    def identity(self, device: dict) -> str:
        """What must match for a checkpoint to be resumed: model, device, kernel code, grid, settings."""
        text = json.dumps({"format": FORMAT, "model": self.model.to_dict(), "tp": self.tp_degree,
                           "device": {k: device.get(k) for k in ("gpu_name", "num_sms", "sm_granularity",
                                                                  "code_version")},
                           "settings": self.settings.__dict__, "rotate_bytes": self.rotate_bytes,
                           "points": [p.key() for p in self.points],
                           **({"decode_max_context": sorted(self.decode_max_context.items())}
                              if self.decode_max_context else {})}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def workload(self) -> Workload:
        """A workload of this plan's TP degree, for op_work."""
        return Workload("profile", 1, 1, (1,), self.tp_degree)

    def sizes(self, op: str) -> list[tuple[int, int]]:
        """Every (num_tokens, context) at which `op` runs in this plan, backgrounds included."""
        out = {(p.num_tokens, p.context) for p in self.points
               if p.op == op and p.kind in ("solo", "corun", "pair", "energy")}
        out |= {(p.partner_tokens, p.partner_context) for p in self.points if p.kind == "pair" and p.partner_op == op}
        if any(p.kind == "corun" for p in self.points):
            if op == MEMORY_BACKGROUND[0]:
                out.add(MEMORY_BACKGROUND[1:])
            if op in COMPUTE_BACKGROUND[0]:
                out.add((COMPUTE_BACKGROUND[1], 0))
        return sorted(out)

    def estimate_s(self) -> float:
        """Rough GPU-side seconds of the whole plan (for the ETA and for planning)."""
        return sum(point_weight(self, p) for p in self.points) + pair_solo_estimate_s(self)

    def pair_points(self) -> list[Point]:
        return [p for p in self.points if p.kind == "pair"]

    def pair_point(self, p: Point, impl_a: str, impl_b: str, *, corun_a_ms: float, corun_b_ms: float,
                   makespan_ms: float, part_a_ms: float, part_b_ms: float, full_a_ms: float, full_b_ms: float,
                   sm_clock_mhz: float | None = None,
                   nvml_sm_clock_mhz: float | None = None) -> pair_table.PairPoint:
        """The pair table's point of the measured pair point `p` (side A p.op on p.sm_count SMs, side B
        p.partner_op on p.partner_sms): a time that is not positive and finite raises ValueError."""
        a = pair_table.PairSide(p.op, self.ops[p.op].op_class, p.num_tokens, p.context)
        b = pair_table.PairSide(p.partner_op, self.ops[p.partner_op].op_class, p.partner_tokens, p.partner_context)
        return pair_table.PairPoint(a, b, impl_a, impl_b, p.sm_count, p.partner_sms, corun_a_ms, corun_b_ms,
                                    makespan_ms, part_a_ms, part_b_ms, full_a_ms, full_b_ms, sm_clock_mhz,
                                    nvml_sm_clock_mhz)


def sm_grid(num_sms: int, granularity: int) -> list[int]:
    """Partition sizes of the device: multiples of the granularity below num_sms, and num_sms."""
    return list(range(granularity, num_sms, granularity)) + [num_sms]


def make_plan(model: ModelSpec, workload: Workload, num_sms: int, granularity: int, is_quick: bool = False,
              ops: tuple[str, ...] | None = None, impls: dict[str, tuple[str, ...]] | None = None,
              settings: Settings | None = None, sm_counts: tuple[int, ...] | None = None,
              with_pairs: bool = True, pair_minority_sms: tuple[int, ...] | None = None) -> Plan:
    """The measurement plan for `model` on a device of `num_sms` SMs split at `granularity`.

    ops: restrict to these op names (tests); impls: op -> impl names available (the profiler passes
    the runtime's registry, nfsearch.runtime.kernels.IMPLS; default: triton and torch for every op);
    sm_counts: restrict the SM grid (tests); with_pairs: measure the pair table;
    pair_minority_sms: restrict the pair splits to these sizes of the smaller side (tests).
    """
    impls = impls if impls is not None else DEFAULT_IMPLS
    settings = settings or Settings()
    # the layer's ops with both attentions present, whatever the workload (the grid covers W1-W3)
    cover = Workload("cover", 1, 1024, (256,), workload.tp_degree, workload.dtype)
    layer = {op.name: op for op in layer_ops(model, cover)}
    runnable = {name: op for name, op in layer.items() if name in impls}
    chosen = {name: op for name, op in runnable.items() if ops is None or name in ops}
    unknown = set(ops or ()) - set(layer)
    if unknown:
        raise NfsearchError(f"profile: unknown op(s) {', '.join(sorted(unknown))}")
    if not chosen:
        raise NfsearchError(f"profile: no measurable op (layer ops: {', '.join(layer)}; kernels for: "
                            f"{', '.join(sorted(impls))})")
    grid_sms = sm_grid(num_sms, granularity)
    if is_quick:
        grid_sms = sorted({s for s in (2 * granularity, 8 * granularity, num_sms) if s <= num_sms})
    if sm_counts:
        grid_sms = sorted(set(sm_counts))
        bad = [s for s in grid_sms if s not in sm_grid(num_sms, granularity)]
        if bad:
            raise NfsearchError(f"profile: SM counts {bad} are not partition sizes of this device")

    def up128(n: int) -> int:
        return -(-n // 128) * 128

    tokens = set(QUICK_TOKENS if is_quick else TOKENS)
    if workload.num_tokens > max(tokens):
        tokens.add(up128(workload.num_tokens))
    requests = set(QUICK_DECODE_REQUESTS if is_quick else DECODE_REQUESTS)
    if workload.num_decode > max(requests):
        requests.add(workload.num_decode)
    contexts = set() if is_quick else set(PROFILED_CONTEXTS)
    if workload.num_decode:
        contexts.add(workload.decode_context)
    contexts = contexts or {1024}
    prefill_tokens = set(QUICK_PREFILL_TOKENS if is_quick else PREFILL_TOKENS)
    if workload.num_prefill_tokens > max(prefill_tokens):
        prefill_tokens.add(up128(workload.num_prefill_tokens))
    prompts = set() if is_quick else set(PROMPT_LENGTHS)
    if workload.num_prefill_tokens and "prefill_attn" in layer:
        prompts.add(op_context(layer["prefill_attn"], workload))
    prompts = prompts or {512}

    def domain(name: str) -> tuple[list[int], list[int]]:
        if name == "decode_attn":
            return sorted(requests), sorted(contexts)
        if name == "prefill_attn":
            return sorted(prefill_tokens), sorted(prompts)
        return sorted(tokens), [0]

    points = [Point("ceiling", "gemm_bf16", "torch", GEMM_CEILING_N), Point("ceiling", "copy", "torch")]
    for name in chosen:
        toks, ctxs = domain(name)
        for impl in impls[name]:
            if (name, impl) in SKIP_IMPLS:
                continue
            for sms in sorted(grid_sms, reverse=True):
                for ctx in ctxs:
                    for t in toks:
                        points.append(Point("solo", name, impl, t, ctx, sms))

    # co-run pairs on one split each: decode attention on m SMs, the compute op on num_sms - m
    corun_ms_list = [m for m in (QUICK_CORUN_MEMORY_SMS if is_quick else CORUN_MEMORY_SMS)
                     if m % granularity == 0 and 0 < m <= num_sms // 2]
    has = lambda name: name in chosen and "triton" in impls[name]
    bg_ok = has(MEMORY_BACKGROUND[0]) and all(name in runnable and "triton" in impls[name]
                                              for name in COMPUTE_BACKGROUND[0])
    corun_ops = [name for name in CORUN_COMPUTE_OPS if has(name)]
    if bg_ok and (corun_ops or has(CORUN_MEMORY_OP)) and not sm_counts:
        ctoks = sorted(set(QUICK_CORUN_TOKENS if is_quick else CORUN_TOKENS))
        ptoks = sorted(set(QUICK_CORUN_PREFILL_TOKENS if is_quick else CORUN_PREFILL_TOKENS))
        for m in corun_ms_list:
            n = num_sms - m
            for name in corun_ops:
                toks, ctxs = (ptoks, sorted(prompts)) if name == "prefill_attn" else (ctoks, [0])
                for ctx in ctxs:
                    for t in toks:
                        points.append(Point("corun", name, "triton", t, ctx, n, layer[CORUN_MEMORY_OP].op_class, m))
            if has(CORUN_MEMORY_OP):
                toks, ctxs = domain(CORUN_MEMORY_OP)
                for ctx in ctxs:
                    for t in toks:
                        points.append(Point("corun", CORUN_MEMORY_OP, "triton", t, ctx, m, "compute", n))
    pair_fams: list[tuple[pair_table.PairSide, pair_table.PairSide]] = []
    pair_splits_list: list[tuple[int, int]] = []
    if with_pairs:
        pair_fams = pair_families(model, layer, chosen, impls, is_quick, workload)
        minority = pair_minority_sms if pair_minority_sms is not None else (
            QUICK_PAIR_MINORITY_SMS if is_quick else None)
        pair_splits_list = pair_splits(num_sms, granularity, minority)
        for a, b in pair_fams:
            for sa, sb in pair_splits_list:
                points.append(Point("pair", a.op, "", a.num_tokens, a.context, sa, b.op_class, sb,
                                    b.op, b.num_tokens, b.context))
    grid = {"ops": list(chosen), "sm_counts": sorted(grid_sms), "tokens": sorted(tokens), "decode_requests": sorted(requests),
            "decode_contexts": sorted(contexts), "prefill_tokens": sorted(prefill_tokens),
            "prompt_lengths": sorted(prompts), "corun_memory_sms": corun_ms_list if bg_ok else [],
            "is_quick": is_quick,
            "pair_families": [f"{a.describe()} x {b.describe()}" for a, b in pair_fams],
            "pair_splits": [list(x) for x in pair_splits_list],
            "covers": ("quick grid" if is_quick else "W1-W3 defaults") + f" + workload {workload.name}"}
    return Plan(model, workload.tp_degree, num_sms, granularity, is_quick, settings, runnable, points, grid,
                impls={name: tuple(impls[name]) for name in runnable})


def pair_splits(num_sms: int, granularity: int, minority: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
    """(SMs of side A, SMs of side B) of every two-way split on the partition grid, both orientations.

    The smaller side gets m = granularity, 2 x granularity, ... up to half the device (one green
    group of m SMs), the other side the remainder; each split is listed with A small and with A large
    (once when the two halves are equal). minority: only these m.
    """
    out = []
    for m in range(granularity, num_sms // 2 + 1, granularity):
        if minority is not None and m not in minority:
            continue
        out.append((m, num_sms - m))
        if num_sms - m != m:
            out.append((num_sms - m, m))
    return out


def pair_sizes(workload: Workload | None, is_quick: bool = False
               ) -> tuple[list[int], list[tuple[int, int]], list[tuple[int, int]]]:
    """(GEMM tokens, decode (requests, context), prefill (tokens, prompt length)) of the pair table.

    Beside the fixed sizes: the decode attention and prompts' attention of `workload`'s batch and, in
    the full grid, of W1-W3's (at the workload's TP degree, as the full grid covers them: one table
    still serves every standard workload of a model), and GEMMs from 256 tokens (two of the search's
    128-token chunks), so that a plan's own nano-batches fall between measured sizes instead of being
    priced at the nearest one.
    Why: on 2x H100 a W4 plan that overlaps llama-3-70b's 384-token nano-batches beside its
    1280-request decode, priced from the quick table's 2048-token and 512-request pairs, runs 10-14%
    slower than replayed."""
    gemm = sorted({MIN_PAIR_GEMM_TOKENS, *(QUICK_PAIR_GEMM_TOKENS if is_quick else PAIR_GEMM_TOKENS)})
    decode = list(QUICK_PAIR_DECODE if is_quick else PAIR_DECODE)
    prefill = list(PAIR_PREFILL)
    tp = workload.tp_degree if workload is not None else 1
    batches = [] if is_quick else standard_batches(tp)
    for w in batches + ([workload] if workload is not None else []):
        if w.num_decode and (w.num_decode, w.decode_context) not in decode:
            decode.append((w.num_decode, w.decode_context))
        if w.prefill_lengths:
            size = (w.num_prefill_tokens, round(w.num_prefill_tokens / len(w.prefill_lengths)))
            if size not in prefill:
                prefill.append(size)
    return gemm, decode, prefill


def pair_families(model: ModelSpec, layer: dict[str, Op], chosen: dict[str, Op], impls: dict[str, tuple[str, ...]],
                  is_quick: bool = False, workload: Workload | None = None
                  ) -> list[tuple[pair_table.PairSide, pair_table.PairSide]]:
    """The pairs of op classes the search may overlap, at the pair table's sizes (side A first:
    pair_sizes, with `workload`'s own batch).

    Each GEMM x decode attention (every PAIR_DECODE size), x prefill attention (PAIR_PREFILL), x each
    small op ("other" class, same token count; one of ops with identical work), x each collective
    ("network" class, same token count); decode x prefill attention; decode attention (every size
    above) x each collective at the GEMM sizes. Only ops in `chosen` with an
    impl to run.
    """
    def runnable(op: Op) -> bool:
        return op.name in chosen and any((op.name, i) not in SKIP_IMPLS for i in impls.get(op.name, ()))

    ops = [op for op in layer.values() if runnable(op)]
    gemms = [op for op in ops if op.is_gemm and op.op_class == "compute"]
    decodes = [op for op in ops if op.op_class == "memory" and op.domain == "decode"]
    prefills = [op for op in ops if op.op_class == "compute" and op.domain == "prefill" and not op.is_gemm]
    nets = [op for op in ops if op.op_class == "network"]
    smalls: list[Op] = []
    probe = Workload("probe", 1, 1, (1,))
    for op in ops:
        if op.op_class != "other" or op.is_gemm:
            continue
        # a small op with the same work and impls as one already taken (norm2 beside norm1) is the
        # same kernel on the same shapes: measured once
        sig = lambda o: ([op_work(o, model, probe, n, 0) for n in (128, 4096)], tuple(impls[o.name]))
        try:
            if any(sig(op) == sig(s) for s in smalls):
                continue
        except ValueError:            # an op without a work model: keep it
            pass
        smalls.append(op)
    gemm_tokens, decode_sizes, prefill_sizes = pair_sizes(workload, is_quick)
    side = lambda op, t, c=0: pair_table.PairSide(op.name, op.op_class, t, c)
    out = []
    for g in gemms:
        for t in gemm_tokens:
            out += [(side(g, t), side(d, r, c)) for d in decodes for r, c in decode_sizes]
            out += [(side(g, t), side(p, pt, pc)) for p in prefills for pt, pc in prefill_sizes]
            out += [(side(g, t), side(s, t)) for s in smalls]
            out += [(side(g, t), side(n, t)) for n in nets]
    out += [(side(d, r, c), side(p, pt, pc)) for d in decodes for r, c in decode_sizes
            for p in prefills for pt, pc in prefill_sizes]
    # a collective beside another nano-batch's decode attention (the attention side first, as GEMMs
    # are; the memory-bound op NanoFlow hides the network beside). Prefill attention beside a collective
    # is left to the class fallback: PAIR_PREFILL is W2's prompt, off a TP workload's prompts.
    out += [(side(d, r, c), side(n, t)) for n in nets for t in gemm_tokens for d in decodes for r, c in decode_sizes]
    return out


# ------------------------------------------------------------------------------------ energy
ENERGY_WORKLOADS = ("W1", "W2", "W3")       # their token counts are measured for every model, as the grid covers them


def standard_batches(tp_degree: int) -> list[Workload]:
    """W1-W3's batches at `tp_degree` (the shard's shapes under TP), which the full grid covers."""
    return [replace(load_workload(name), tp_degree=tp_degree) for name in ENERGY_WORKLOADS]


@dataclass(frozen=True)
class EnergyRequest:
    """One energy point to measure: an op over its whole token count (requests for decode attention)
    at its context, with the impl the timing table finds fastest on the whole GPU (time_ms there)."""
    op: str
    impl: str
    num_tokens: int
    context: int
    time_ms: float

    def describe(self) -> str:
        unit = "req" if self.op == "decode_attn" else "tok"
        return f"{self.op}/{self.impl} {self.num_tokens} {unit}" + (f" ctx {self.context}" if self.context else "")


def energy_requests(model: ModelSpec, workload: Workload, table: ProfileTable) -> tuple[list[EnergyRequest], list[str]]:
    """The energy points of `model` (module doc): every op at its whole token count in W1-W3 and in
    `workload`, fastest impl on the whole GPU by `table`; and a note per op that cannot be measured
    (the table has no row to pick its impl from). Under TP (workload.tp_degree > 1) W1-W3's batches
    are taken at the workload's TP degree (the shard's shapes, as the profile's grid covers them) and
    the network ops are left out: one GPU alone does not run a collective (profiler.add_energy)."""
    workloads = standard_batches(workload.tp_degree) + [workload]
    found: dict[tuple, EnergyRequest] = {}
    notes: list[str] = []
    full = table.info.num_sms
    for wl in workloads:
        try:
            layer = build_layer(model, wl)
        except NfsearchError as exc:          # a standard batch this model cannot take (a sliding window)
            notes.append(f"{wl.name}: {exc}")
            continue
        for name in layer.nodes:
            if layer.nodes[name]["op"].op_class == "network":
                continue
            lo, hi = layer.nodes[name]["token_range"]
            ctx = op_context(layer.nodes[name]["op"], wl)
            key = (name, hi - lo, ctx)
            if key in found:
                continue
            try:
                ms, impl = table.time_ms(name, hi - lo, full, ctx, allow_extrapolation=True)
            except ProfileMiss as miss:
                notes.append(f"{name} {hi - lo} x {ctx}: {miss}")
                continue
            found[key] = EnergyRequest(name, impl, hi - lo, ctx, ms)
    return sorted(found.values(), key=lambda r: (r.op, r.context, r.num_tokens)), notes


def energy_plan(model: ModelSpec, workload: Workload, requests: list[EnergyRequest], num_sms: int,
                granularity: int, impls: dict[str, tuple[str, ...]]) -> Plan:
    """A measurement plan holding the energy points (so the profiler's inputs are built at their sizes)."""
    cover = Workload("cover", 1, 1024, (256,), workload.tp_degree, workload.dtype)
    ops = {op.name: op for op in layer_ops(model, cover)}
    points = [Point("energy", r.op, r.impl, r.num_tokens, r.context, num_sms) for r in requests]
    return Plan(model, workload.tp_degree, num_sms, granularity, False, Settings(), ops, points,
                {"energy_points": [r.describe() for r in requests]}, impls=impls)


def pair_energy_plan(model: ModelSpec, workload: Workload, families: list, num_sms: int, granularity: int,
                     impls: dict[str, tuple[str, ...]]) -> Plan:
    """A measurement plan holding the best split of each pair family (pairs.FamilyResult), so the
    profiler's inputs are built at the pairs' sizes (profiler.add_pair_energy)."""
    cover = Workload("cover", 1, 1024, (256,), workload.tp_degree, workload.dtype)
    ops = {op.name: op for op in layer_ops(model, cover)}
    points = [Point("pair", f.a.op, "", f.a.num_tokens, f.a.context, f.best.sms_a, f.b.op_class, f.best.sms_b,
                    f.b.op, f.b.num_tokens, f.b.context) for f in families]
    return Plan(model, workload.tp_degree, num_sms, granularity, False, Settings(), ops, points,
                {"pair_energy_points": [p.describe() for p in points]}, impls=impls)


# ------------------------------------------------------------------------------------ collectives
# A tensor-parallel profile's network part (runtime/tp_profile.py: one process per GPU, every rank
# measuring at once): the all-reduces alone at the grid's tokens and SM counts, and beside each GEMM
# of the layer on the pair table's splits. Its rows and pair points have the single-GPU formats.
# NETWORK_IMPL: torch.distributed's NCCL all-reduce, as runtime.collectives runs it; CE_IMPL: the
# copy-engine all-reduce (runtime.ce_collectives), data on the copy engines
NETWORK_IMPL, CE_IMPL = NETWORK_IMPLS
ESTIMATE_BUS_GBPS = 150.0      # for estimates only: an NVLink all-reduce's bus bandwidth (docs/gpu_facts.md)
ESTIMATE_NET_LATENCY_MS = 0.03


def network_plan(model: ModelSpec, workload: Workload, num_sms: int, granularity: int, is_quick: bool = False,
                 impls: dict[str, tuple[str, ...]] | None = None, settings: Settings | None = None,
                 with_pairs: bool = True, sm_counts: tuple[int, ...] | None = None,
                 pair_minority_sms: tuple[int, ...] | None = None,
                 net_impls: tuple[str, ...] = (NETWORK_IMPL,)) -> Plan:
    """The network part of a TP profile: solo points of each collective at the grid's tokens and SM
    counts, and pair points of each GEMM and of decode attention x each collective (the compute or
    memory side A, at the pair table's sizes and splits). Same grid as `make_plan` gives the shard's
    other ops; impls: the GEMMs' and decode attention's (the pair sides run their fastest); the
    collectives get `net_impls`. A no-share impl (plan.NO_SHARE_IMPLS, "ce") is measured as it runs in
    a plan: alone at the whole GPU's SM count (a plain stream), and beside each family's side A on the
    whole GPU (pair points of split (num_sms, 0)); the split pairs' collective side runs the fastest of
    the others."""
    if not net_impls or set(net_impls) - set(NETWORK_IMPLS):
        raise NfsearchError(f"profile: collective impls must be among {', '.join(NETWORK_IMPLS)}, "
                            f"not {', '.join(net_impls) or 'none'}")
    if workload.tp_degree < 2:
        raise NfsearchError("profile: collectives are measured only under tensor parallelism (--tp 2 or more)")
    impls = dict(impls if impls is not None else DEFAULT_IMPLS)
    cover = Workload("cover", 1, 1024, (256,), workload.tp_degree, workload.dtype)
    layer = layer_ops(model, cover)
    nets = [op.name for op in layer if op.op_class == "network"]
    gemms = [op.name for op in layer if op.is_gemm and op.op_class == "compute" and op.name in impls]
    attentions = [op.name for op in layer if op.name in ATTENTION_OPS and op.name in impls]
    impls.update({name: tuple(net_impls) for name in nets})
    plan = make_plan(model, workload, num_sms, granularity, is_quick, tuple(gemms + attentions + nets), impls,
                     settings, sm_counts, with_pairs, pair_minority_sms)
    is_net = lambda op: op in nets
    plan.points = [p for p in plan.points if (p.kind == "solo" and is_net(p.op)
                                              and (p.impl not in NO_SHARE_IMPLS or p.sm_count == num_sms))
                   or (p.kind == "pair" and (is_net(p.op) or is_net(p.partner_op)))]
    if with_pairs and set(net_impls) & NO_SHARE_IMPLS:
        # one more point per GEMM x collective family: the GEMM on the whole GPU, the collective beside it
        # holding no share (split (num_sms, 0)), as a plan runs a copy-engine all-reduce
        families = dict.fromkeys((p.op, p.num_tokens, p.context, p.co_class, p.partner_op, p.partner_tokens,
                                  p.partner_context) for p in plan.points if p.kind == "pair" and is_net(p.partner_op))
        plan.points += [Point("pair", op, "", t, c, num_sms, cls, 0, net, pt, pc)
                        for op, t, c, cls, net, pt, pc in families]
    plan.grid = {**plan.grid, "ops": nets, "network_ops": nets, "pair_gemms": gemms if with_pairs else [],
                 "pair_attentions": attentions if with_pairs else [],
                 "network_impls": list(net_impls)}
    return plan


def combine_ranks(per_rank: list[dict[tuple, Measurement]]) -> dict[tuple, Measurement]:
    """One measurement per point from every rank's: the slowest rank's (largest time_ms), since a
    tensor-parallel layer waits for its slowest GPU; a point some rank lacks is left out."""
    if not per_rank:
        return {}
    keys = set(per_rank[0]).intersection(*per_rank[1:])
    return {k: max((r[k] for r in per_rank), key=lambda m: m.time_ms) for k in sorted(keys)}


# ------------------------------------------------------------------------------------ estimates
def estimate_ms(plan: Plan, op: str, impl: str, num_tokens: int, context: int, sm_count: int) -> float:
    """A rough roofline time of one call (for the ETA and for sizing co-run windows)."""
    work = op_work(plan.ops[op], plan.model, plan.workload(), num_tokens, context)
    if plan.ops[op].op_class == "network":
        share = interp(BW_FRACTION, sm_count or plan.num_sms)        # 0: no SM share (copy engines)
        return work.net_bytes / (ESTIMATE_BUS_GBPS * 1e6 * min(1.0, share * 1.5)) + \
            ESTIMATE_NET_LATENCY_MS
    flops_per_ms = 650e9 * sm_count / plan.num_sms
    bytes_per_ms = 2.9e9 * interp(BW_FRACTION, sm_count)
    t = max(work.flops / flops_per_ms, work.num_bytes / bytes_per_ms) + 0.006
    if impl == "torch" and sm_count < plan.num_sms:
        t *= 1.5
    return t


def point_weight(plan: Plan, p: Point) -> float:
    """Expected seconds of one point on the GPU, overheads included."""
    s = plan.settings
    if p.kind == "ceiling":
        return 0.5
    if p.kind == "pair":
        # launched together: the makespan, stretched by interference, per launch (solos: pair_solo_estimate_s)
        x = estimate_ms(plan, p.op, "triton", p.num_tokens, p.context, p.sm_count)
        y = estimate_ms(plan, p.partner_op, "triton", p.partner_tokens, p.partner_context, p.partner_sms)
        return PAIR_OVERHEAD_S + (PAIR_WARMUP + s.pair_repeats) * 1.3 * max(x, y) / 1e3
    t = estimate_ms(plan, p.op, p.impl, p.num_tokens, p.context, p.sm_count)
    if p.kind == "solo":
        return 0.004 + (s.warmup + s.repeats) * t / 1e3
    # corun: the op alone on the split, then beside the background (up to 2x slower), plus the lead
    return 0.015 + (s.warmup + s.repeats) * t / 1e3 + (1 + s.corun_repeats) * 2 * t / 1e3


PAIR_OVERHEAD_S = 0.025     # host side of one pair point: events, launches, the lead, the checks


def pair_solo_estimate_s(plan: Plan) -> float:
    """Seconds of the solo runs behind the pair table: every impl of each side on its partition and on
    the whole GPU, once per distinct (op, impl, size, SM count) (the profiler caches them)."""
    s = plan.settings
    keys = set()
    for p in plan.pair_points():
        for op, t, c, sms in ((p.op, p.num_tokens, p.context, p.sm_count),
                              (p.partner_op, p.partner_tokens, p.partner_context, p.partner_sms)):
            for impl in plan.pair_impls(op, sms):
                keys.add((op, impl, t, c, sms))
            for impl in plan.pair_impls(op, plan.num_sms):
                keys.add((op, impl, t, c, plan.num_sms))
    return sum(0.004 + (s.warmup + s.repeats) * estimate_ms(plan, op, impl, t, c, sms) / 1e3
               for op, impl, t, c, sms in keys)


def rotation_sets(plan: Plan, op: str, num_tokens: int, context: int, max_sets: int = 64) -> int:
    """How many input sets to rotate among so that one call's data is out of L2 when it comes back."""
    nbytes = op_work(plan.ops[op], plan.model, plan.workload(), num_tokens, context).num_bytes
    return max(1, min(max_sets, math.ceil(plan.rotate_bytes / max(nbytes, 1.0))))


# ------------------------------------------------------------------------------------ checkpoint
CHECKPOINT_MARK = "# nfsearch-profile-checkpoint "
CHECKPOINT_COLUMNS = ("kind", "op", "impl", "num_tokens", "context", "sm_count", "co_class", "partner_sms",
                      "partner_op", "partner_tokens", "partner_context", "time_ms", "solo_ms", "pair")
_NUM_KEY = 11


def checkpoint_path(output: str | Path) -> Path:
    return Path(str(output) + ".partial.csv")


class Checkpoint:
    """Append-only CSV of finished measurements, headed by the plan's identity."""

    def __init__(self, path: str | Path, identity: str, log=None):
        self.path = Path(path)
        self.identity = identity
        self.log = log or (lambda msg: None)
        self._file = None

    def open(self) -> dict[tuple, Measurement]:
        """Load what a previous run of the same plan measured, then open the file for appending."""
        done: dict[tuple, Measurement] = {}
        if self.path.is_file():
            text = self.path.read_text()
            first, _, body = text.partition("\n")
            header = first[len(CHECKPOINT_MARK):] if first.startswith(CHECKPOINT_MARK) else ""
            try:
                same = json.loads(header).get("identity") == self.identity
            except (ValueError, AttributeError):
                same = False
            if same:
                done = _parse_rows(body)
                self.log(f"resuming from {self.path}: {len(done)} measurements already done")
            else:
                self.log(f"{self.path} belongs to another request (grid, device or code); starting afresh")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # rewrite: drops a line cut short by a kill, so appending starts on a clean line
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            f.write(CHECKPOINT_MARK + json.dumps({"identity": self.identity, "format": FORMAT}) + "\n")
            w = csv.writer(f)
            w.writerow(CHECKPOINT_COLUMNS)
            for key, m in done.items():
                w.writerow(_row(key, m))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file)
        return done

    def append(self, point: Point, m: Measurement) -> None:
        self._writer.writerow(_row(point.key(), m))
        self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _row(key: tuple, m: Measurement) -> list:
    fmt = lambda v: "" if v is None else repr(float(v))
    return list(key) + [fmt(m.time_ms), fmt(m.solo_ms), m.pair.to_json() if m.pair else ""]


def _parse_rows(body: str) -> dict[tuple, Measurement]:
    done = {}
    lines = body.splitlines()
    if not lines:
        return done
    if not body.endswith("\n"):
        lines = lines[:-1]          # the measurement in flight when the run was killed
    for rec in csv.reader(io.StringIO("\n".join(lines[1:]))):
        try:
            if len(rec) != len(CHECKPOINT_COLUMNS):
                continue
            key = (rec[0], rec[1], rec[2], int(rec[3]), int(rec[4]), int(rec[5]), rec[6], int(rec[7]),
                   rec[8], int(rec[9]), int(rec[10]))
            vals = [float(v) if v else None for v in rec[_NUM_KEY:_NUM_KEY + 2]]
            if vals[0] is None or not math.isfinite(vals[0]) or vals[0] <= 0:
                continue
            pair = pair_table.PairPoint.from_json(rec[_NUM_KEY + 2]) if rec[_NUM_KEY + 2] else None
            if (key[0] == "pair") != (pair is not None):
                continue
            done[key] = Measurement(*vals, pair=pair)
        except (ValueError, TypeError, KeyError, AttributeError):     # a malformed row: measured again
            continue
    return done


# ------------------------------------------------------------------------------------ running
class Progress:
    """Done / total / ETA from the points' expected weights, scaled by the measured pace."""

    def __init__(self, plan: Plan, todo: list[Point], callback=None, clock=time.monotonic, every_s: float = 0.5):
        self.callback = callback
        self.clock = clock
        self.every_s = every_s
        self.total = len(plan.points)
        self.done = self.total - len(todo)
        self.weights = {p.key(): point_weight(plan, p) for p in todo}
        self.left = sum(self.weights.values())
        self.spent_w = 0.0
        self.start = clock()
        self.last = -1e9

    def step(self, point: Point) -> None:
        self.done += 1
        w = self.weights.get(point.key(), 0.0)
        self.left -= w
        self.spent_w += w
        now = self.clock()
        if self.callback and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            pace = (now - self.start) / self.spent_w if self.spent_w > 0 else 1.0
            self.callback(self.done, self.total, max(0.0, self.left * pace), point.describe())


@dataclass
class RunResult:
    """What a walk of the plan gave: measurements, failed points (key -> message), why it stopped early."""
    results: dict[tuple, Measurement]
    failures: dict[tuple, str]
    stopped: str = ""               # "" when every point was tried

    def __iter__(self):              # results, failures = run_plan(...)
        return iter((self.results, self.failures))


def run_plan(plan: Plan, checkpoint: Checkpoint | None, measure, progress=None, log=None,
             clock=time.monotonic, max_consecutive_failures: int = 25, is_healthy=None) -> RunResult:
    """Measure every point of the plan not yet in the checkpoint.

    measure(point) -> Measurement. An exception fails that point only (recorded, not checkpointed,
    retried by a resumed run). After `max_consecutive_failures` in a row the device is asked
    (`is_healthy()`, when given): if it still answers, the walk goes on (one broken kernel or split
    fails its own points, not the profile); if it does not, or no check is given, the walk stops and
    the result says why: what was measured is kept (and in the checkpoint).
    """
    log = log or (lambda msg: None)
    results = checkpoint.open() if checkpoint else {}
    planned = {p.key() for p in plan.points}
    results = {k: v for k, v in results.items() if k in planned}
    todo = [p for p in plan.points if p.key() not in results]
    prog = Progress(plan, todo, progress, clock)
    failures: dict[tuple, str] = {}
    stopped = ""
    in_a_row = 0
    try:
        for point in todo:
            try:
                m = measure(point)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - any error fails this point only
                failures[point.key()] = f"{type(exc).__name__}: {exc}"[:300]
                log(f"failed: {point.describe()}: {failures[point.key()]}")
                in_a_row += 1
                prog.step(point)
                if in_a_row >= max_consecutive_failures:
                    if is_healthy is not None and _answers(is_healthy):
                        log(f"{in_a_row} failures in a row, the device still answers: going on")
                        in_a_row = 0
                        continue
                    stopped = (f"stopped after {in_a_row} failed measurements in a row (last: "
                               f"{failures[point.key()]}); {len(plan.points) - prog.done} points "
                               f"not tried")
                    log(stopped)
                    break
                continue
            if not (m.time_ms > 0 and math.isfinite(m.time_ms)):
                failures[point.key()] = f"non-positive time {m.time_ms}"
                in_a_row += 1
                prog.step(point)
                continue
            in_a_row = 0
            results[point.key()] = m
            if checkpoint:
                checkpoint.append(point, m)
            prog.step(point)
    finally:
        if checkpoint:
            checkpoint.close()
    return RunResult(results, failures, stopped)


def _answers(is_healthy) -> bool:
    try:
        return bool(is_healthy())
    except Exception:  # noqa: BLE001 - a device that raises does not answer
        return False


# ------------------------------------------------------------------------------------ the table
def gpu_key_for(name: str) -> str:
    """The bundled GPU key of a device name ('h100-sxm' for an H100 SXM, 'h200' for an H200), or ''."""
    up = name.upper()
    if "H200" in up:
        return "h200"
    if "H100" in up and ("HBM3" in up or "SXM" in up):
        return "h100-sxm"
    if "A100" in up and "SXM" in up:
        return "a100-sxm"
    return ""                   # not a bundled GPU: the table names it by gpu_name only


def ceilings(results: dict[tuple, Measurement]) -> Ceilings | None:
    """The ceilings of the measured ceiling points; None unless both were measured as real times
    (a profile run is not lost for want of them: the table's GPU figures then fall back)."""
    times = {key[1]: m.time_ms for key, m in results.items() if key[0] == "ceiling"}
    if "gemm_bf16" not in times or "copy" not in times:
        return None
    try:
        return Ceilings(2.0 * GEMM_CEILING_N ** 3 / times["gemm_bf16"] / 1e9,
                        2.0 * COPY_CEILING_BYTES / times["copy"] / 1e9,
                        f"{GEMM_CEILING_N}^3 bf16 torch.matmul", COPY_CEILING_BYTES)
    except (NfsearchError, ZeroDivisionError):
        return None


def assemble_table(plan: Plan, results: dict[tuple, Measurement], device: dict,
                   failures: dict | None = None, stopped: str = "") -> ProfileTable:
    """The ProfileTable of the measured points.

    The table interpolates on a full tokens x SMs rectangle per (op, impl, co_class, context), so
    holes (failed points) are cut out: a solo group with a hole is dropped whole (a partial impl
    would make lookups miss where the other impl could answer); a co-run group keeps, per context,
    the larger of the rectangles left by removing the SM counts or the token counts that have a
    hole (outside it the cost model falls back to its interference curve).
    device: metadata of the device and run (gpu_name, source, versions, date, ...).
    """
    groups: dict[tuple, list[Point]] = {}
    for p in plan.points:
        if p.kind in ("solo", "corun"):
            groups.setdefault((p.op, p.impl, p.co_class), []).append(p)
    points = pair_points_of(plan, results)
    pair_failures = [k for k in (failures or {}) if k[0] == "pair"]
    rows, dropped = [], []
    for (op, impl, co), pts in groups.items():
        missing = [p for p in pts if p.key() not in results]
        if missing:
            kept = [] if not co else _largest_rectangles(pts, {p.key() for p in missing})
            dropped.append({"op": op, "impl": impl, "co_class": co, "missing": len(missing),
                            "first_missing": missing[0].describe(), "kept": len(kept), "of": len(pts)})
            pts = kept
        rows += [(p.op, p.impl, p.num_tokens, p.context, p.sm_count, results[p.key()].time_ms, p.co_class)
                 for p in pts]
    if not rows:
        raise NfsearchError("profile: nothing was measured" + (f" ({len(failures)} failures)" if failures else "")
                            + (f"; {stopped}" if stopped else ""))
    df = pd.DataFrame(rows, columns=["op", "impl", "num_tokens", "context", "sm_count", "time_ms", "co_class"])
    meta = dict(device)
    if not meta.get("gpu_key"):
        meta.pop("gpu_key", None)
        if gpu_key_for(meta["gpu_name"]):
            meta["gpu_key"] = gpu_key_for(meta["gpu_name"])
    meta.update({"num_sms": plan.num_sms, "sm_granularity": plan.granularity, "model": plan.model.name,
                 "tp_degree": plan.tp_degree, "grid": plan.grid,
                 "timing": {"warmup": plan.settings.warmup, "statistic": f"median of {plan.settings.repeats}",
                            "corun": f"median of {plan.settings.corun_repeats}",
                            "pair": f"median of {plan.settings.pair_repeats} launches together",
                            "l2_rotation_bytes": plan.rotate_bytes},
                 "corun_method": (
                     "one green-context split per pair: decode_attn on a group of m SMs, the compute op "
                     "(GEMM or prefill_attn) on the remaining num_sms - m; the timed op runs while the other "
                     "side runs back to back for the whole window (compute ops beside decode_attn "
                     f"{MEMORY_BACKGROUND[1]} requests x context {MEMORY_BACKGROUND[2]}; decode_attn beside "
                     f"the GEMMs {'+'.join(COMPUTE_BACKGROUND[0])} over {COMPUTE_BACKGROUND[1]} tokens); "
                     "co_class = the other side's class"),
                 "inputs": ("bf16 random data; norms with the residual add fused; GEMMs without residual; "
                            "prefill_attn over prompts of length `context` (the last one shorter); "
                            "decode_attn with every request at the full context")})
    measured = ceilings(results)
    if measured is not None:
        # the profile's GPU figures (profile.gpu_from_profile reads them; old profiles kept them as
        # peak_tflops and mem_bandwidth_tbps, which are still read)
        meta["ceilings"] = measured.to_dict()
        meta["figures_source"] = f"{meta.get('source', 'measured')} in this profile run"
    if plan.pair_points():
        by_key = {p.key(): p for p in plan.pair_points()}
        meta["pairs"] = pair_table.pairs_meta(
            points, PAIR_METHOD, len(pair_failures),
            [f"{by_key[k].describe()}: {(failures or {})[k]}" for k in pair_failures if k in by_key])
    if failures:
        meta["failures"] = len(failures)
    if stopped:
        meta["stopped"] = stopped
    if dropped:
        meta["dropped_groups"] = dropped
    return ProfileTable(df, meta)


PAIR_METHOD = (
    "one two-way green-context split per point (SmPartitions.split: a group of the smaller side's SMs, "
    "the remainder for the other side); each side runs its fastest impl alone on its partition (median "
    "of `repeats` back-to-back calls on that split's stream, measured first, as is the fastest impl on "
    "the whole GPU); then both are launched together: a common start event on side A's stream that side "
    "B's stream waits on, one call per side, an end event on each stream, the next launch after both "
    "ends; a sleep kernel first lets the host enqueue every launch ahead of the GPU (checked against "
    f"host timestamps, retried with a longer lead); {PAIR_WARMUP} launches of warm-up, then "
    "`pair_repeats` timed: corun_a/b = median of start -> that side's end, makespan = median of start -> "
    "the later end; sm_clock_mhz = cycles of a spin kernel on side A's stream right after the timed "
    "launches over its event time; nvml_sm_clock_mhz = NVML's SM clock then (None without NVML)")


def pair_points_of(plan: Plan, results: dict[tuple, Measurement]) -> list[pair_table.PairPoint]:
    """The pair table's points measured in `results` (a point of the plan without its measurement is left out)."""
    measured = (results.get(p.key()) for p in plan.pair_points())
    return [m.pair for m in measured if m is not None and m.pair is not None]


def _largest_rectangles(pts: list[Point], missing: set) -> list[Point]:
    """Per context: the points left after removing the SM counts, or else the token counts, with a hole."""
    kept = []
    for ctx in sorted({p.context for p in pts}):
        here = [p for p in pts if p.context == ctx]
        holes = [p for p in here if p.key() in missing]
        if not holes:
            kept += here
            continue
        by_sms = [p for p in here if p.sm_count not in {h.sm_count for h in holes}]
        by_tokens = [p for p in here if p.num_tokens not in {h.num_tokens for h in holes}]
        kept += max(by_sms, by_tokens, key=len)
    return kept


# ------------------------------------------------------------------------------------ summary
def summarize(plan: Plan, results: dict[tuple, Measurement], table: ProfileTable, wall_s: float | None = None,
              command: str | None = None, failures: dict | None = None) -> dict:
    """Key numbers: ceilings, GEMM vs cuBLAS at the full GPU, decode bandwidth by SM count, co-run ratios."""
    meta = table.meta
    solo = {k: m.time_ms for k, m in results.items() if k[0] == "solo"}
    out = {"gpu": meta["gpu_name"], "gpu_key": meta.get("gpu_key"), "date": meta.get("date"),
           "source": meta["source"], "model": plan.model.name, "command": command,
           "wall_s": None if wall_s is None else round(wall_s, 1),
           "rows": {"total": len(table.rows), "solo": int((table.rows["co_class"] == "").sum()),
                    "corun": int((table.rows["co_class"] != "").sum())},
           "ceilings": meta.get("ceilings"), "grid": plan.grid, "versions": meta.get("versions"),
           "failures": len(failures or {}), "dropped_groups": meta.get("dropped_groups", [])}
    full = plan.num_sms
    wl = plan.workload()
    gem = {}
    for op in ("kqv", "o", "ug", "d"):
        if op not in plan.grid["ops"]:
            continue
        for t in plan.grid["tokens"]:
            at = {impl: solo.get(Point("solo", op, impl, t, 0, full).key()) for impl in plan.impls.get(op, ())}
            tr, tc = at.get("triton"), at.get("torch")
            if tr and tc:
                fl = op_work(plan.ops[op], plan.model, wl, t, 0).flops
                gem.setdefault(op, {})[t] = {"triton_ms": round(tr, 4), "cublas_ms": round(tc, 4),
                                             "triton_tflops": round(fl / tr / 1e9, 1),
                                             "cublas_tflops": round(fl / tc / 1e9, 1),
                                             "cublas_over_triton": round(tc / tr, 3),
                                             "tflops": {i: round(fl / v / 1e9, 1) for i, v in at.items() if v}}
    out["gemm_at_full_gpu"] = gem
    dec = {}
    if "decode_attn" in plan.grid["ops"]:
        for ctx in plan.grid["decode_contexts"]:
            for r in plan.grid["decode_requests"]:
                nbytes = op_work(plan.ops["decode_attn"], plan.model, wl, r, ctx).num_bytes
                for impl in plan.impls.get("decode_attn", ()):
                    for s in plan.grid["sm_counts"]:
                        t = solo.get(Point("solo", "decode_attn", impl, r, ctx, s).key())
                        if t:
                            dec.setdefault(f"{r}x{ctx}", {}).setdefault(impl, {})[s] = round(nbytes / t / 1e9, 3)
    out["decode_attn_tbps"] = dec
    co: dict = {}
    for k, m in results.items():
        if k[0] != "corun" or not m.solo_ms:
            continue
        _, op, _, _t, _ctx, sms, _cls, partner = k[:8]
        if op != "decode_attn":
            split = f"compute{sms}+decode{partner}"
        else:
            split = f"compute{partner}+decode{sms}"
        co.setdefault(split, {}).setdefault(op, []).append(m.time_ms / m.solo_ms)
    out["corun_stretch"] = {split: {op: {"median": round(statistics.median(v), 3), "max": round(max(v), 3),
                                         "points": len(v)} for op, v in ops.items()} for split, ops in co.items()}
    points = pair_table.points_from_meta(meta)
    num_pair_failures = int((meta.get("pairs") or {}).get("failures", 0))
    out["pairs"] = pair_table.make_report(points, False, meta["gpu_name"], num_failures=num_pair_failures).to_dict()
    out["rows"]["pair_points"] = len(points)
    if any(pair_table.is_network_family(p.a, p.b) for p in points):
        out["pairs_network"] = pair_table.make_report(points, True, meta["gpu_name"]).to_dict()
    if meta.get("stopped"):
        out["stopped"] = meta["stopped"]
    return out


def fake_measure(plan: Plan, seed: int = 0):
    """A measure(point) of made-up timings (the rough roofline, jittered): for tests only, never a GPU."""
    rng = random.Random(seed)

    def measure(p: Point) -> Measurement:
        jitter = 1.0 + 0.02 * rng.random()
        if p.kind == "ceiling":
            return Measurement((2.0 * GEMM_CEILING_N ** 3 / 700e9 if p.op == "gemm_bf16"
                                else 2.0 * COPY_CEILING_BYTES / 2.9e9) * jitter)
        if p.kind == "pair":
            est = lambda op, t, c, s: estimate_ms(plan, op, "triton", t, c, s)
            x, y = est(p.op, p.num_tokens, p.context, p.sm_count), est(p.partner_op, p.partner_tokens,
                                                                        p.partner_context, p.partner_sms)
            fx, fy = (est(p.op, p.num_tokens, p.context, plan.num_sms),
                      est(p.partner_op, p.partner_tokens, p.partner_context, plan.num_sms))
            ia, ib = plan.pair_impls(p.op, p.sm_count)[0], plan.pair_impls(p.partner_op, p.partner_sms)[0]
            return Measurement.of_pair(plan.pair_point(
                p, ia, ib, corun_a_ms=x * 1.1 * jitter, corun_b_ms=y * 1.1 * jitter,
                makespan_ms=max(x, y) * 1.1 * jitter, part_a_ms=x, part_b_ms=y, full_a_ms=fx, full_b_ms=fy,
                sm_clock_mhz=1755.0))
        t = estimate_ms(plan, p.op, p.impl, p.num_tokens, p.context, p.sm_count) * jitter
        if p.kind == "corun":
            return Measurement(t * 1.15, t)
        return Measurement(t)

    return measure

