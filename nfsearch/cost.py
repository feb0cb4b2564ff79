"""The cost model and the scheduling problem the search works on.

CostModel: time of a nano-op at an SM count, alone or beside other nano-ops. An op beside others is
its solo time (profile rows) times a STRETCH per partner, the stretches combined additively
(1 + sum of (stretch - 1): two partners each costing 10% cost 20%). A stretch comes from, in order:

1. the PAIR TABLE of a measured profile (nfsearch/pairs.py, `pair_model.PairModel`): the two ops of a
   pair family launched together on the two sides of a split. From each measured split we derive
   each side's FULLY-OVERLAPPED time (the side that ends first overlapped its partner all along;
   the other ran beside it until then and alone on its partition after, so its overlapped rate
   is what is left once that solo tail is taken out), as a stretch over its time alone on the same
   partition. Stretches are interpolated linearly in the op's own tokens and SM count and never
   extrapolated in those; the partner's size and the contexts are taken at the nearest measured
   value (labelled "partner size clamped" where that differs from the lookup).
2. the profile's older co-run rows (`co_class`: the op measured beside a class), where they answer;
3. for a measured profile, the pair table at its nearest measured size and SM count, or (no family
   for this pair) the worst measured partner of the partner's class, each labelled;
4. the A100 curves published with NanoFlow (Zhu et al., 2024): an op of class c on a share R of the
   SMs runs at P_c(R) of its full-GPU speed. Analytic profiles use these; for a measured profile
   only where nothing above answers (labelled).
Same-class partners without a pair family stretch nothing here: simulate.replay's class ceiling
caps them. Every lookup's source is counted (`CostModel.source_counts`) and the plan's
profile.interference string names the sources.

Overheads: without a calibration, a launch on the same stream costs nothing extra (profile times
are single kernels timed with their own launch gap) and a wait on another stream's event costs
`event_wait_ms` (profile metadata "overheads": {"event_wait_us": x} where measured, else
DEFAULT_EVENT_WAIT_US, labelled default). A calibrated profile (calibration.py) brings its own: the
wait and the launch gap read off measured timelines (3.1 us and 0.46 us on an H100), and per-op solo
and co-run factors that `solo_ms` and `beside_ms` apply.

Power (energy_model.EnergyModel): a profile with energy (energy.ProfileEnergy: per op, the board energy per call of a sustained
back-to-back loop on the whole GPU, and the GPU's power limit and static power) gives a POWER BOUND
(energy.PowerBound): one layer's dynamic energy, the sum over its ops of (energy - static power x
time) at the op's whole token count, cannot be spent faster than limit - static allows. Every plan
has its own bound: a nano-op costs the energy of its own token count (`split_energy_j`: a GEMM split
512 + 1536 reads its weights twice and costs at most 2% more than at 2048 tokens on an H100, each point's
power held to the limit the layer runs at: EnergyPoint.energy_within_limit_j), and where
the profile has pair energy points (energy.PairEnergyPoint: a pair family at its best split in a
sustained loop against the two back to back) each two nano-ops that a replay runs at once cost
(r - 1) x the dynamic energy each spends in their overlap more, r the measured pair's dynamic
energy over back to back's (the family's point nearest in tokens and context; `overlap_energy_j`;
r on an H100 at one clock: a GEMM beside decode attention 0.88-1.11, beside prefill attention
0.91-1.17, decode beside prefill attention 0.87-0.94). Energies are interpolated linearly in tokens
between the profile's points; outside them, and at a context the profile did not measure, scaled
with the op's time (the cost model's lookup: at the measured point's power), labelled "scaled".
`nfsearch calibrate --energy` fits a
factor on the dynamic energies (1 without it). The predicted layer time is max(the replayed makespan
per layer, the bound): simulate, run and solve's margin rule use it; the replay itself does not.
Under TP the profile's energy is of one GPU's shard (runtime/tp_profile.py) and every GPU has its own
power limit, so the bound is per GPU: the shard's dynamic energy per layer over that GPU's headroom.
Collectives (network ops) are not measured on one GPU: without points of their own they count as no
dynamic energy, and the bound's note says so (the bound is then on the low side by their share).

Outside the profile's measured tokens and contexts a solo time is the nearest measured point's,
scaled by the op's roofline shape (roofline.op_scaling: linear in work, flat where launch or weight
reads bound it) and never below the op's own roofline; plans name the ops so priced (`scaled_ops`).

Problem bundles model, workload, GPU, profile, layer graph and cost model for the search; make_problem
refuses a profile of another model (profile.check_profile_model) and a batch the GPU's memory cannot
hold (graph.check_memory).
"""

import math
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import networkx as nx

from nfsearch.calibration import Calibration, calibration_from_meta
from nfsearch.energy import PowerBound
from nfsearch.energy_model import EnergyModel, no_energy_note
from nfsearch.errors import NfsearchError
from nfsearch.graph import MemoryNeed, Op, build_layer, check_memory, op_context
from nfsearch.pair_model import SRC_PAIRS_EDGE, PairModel, base_op, no_share_time_ms
from nfsearch.pairs import NO_SHARE_TAG, family_op
from nfsearch.plan import MAX_NUM_LAYERS, NO_SHARE_IMPLS, PlanGpu, PlanProfile
from nfsearch.profile import (
    LINEAR,
    ProfileMiss,
    ProfileTable,
    Scaling,
    check_profile_model,
    gpu_from_profile,
    load,
    model_mismatch,
    read_meta,
)
from nfsearch.roofline import analytic_profile, interp, op_scaling, profile_roofline
from nfsearch.specs import GpuSpec, ModelSpec, Workload, load_gpu

# share R -> normalised speed P(R); GEMM-like compute is linear (P = R)
PUBLISHED_CURVES = {
    "compute": ((0.0, 0.0), (1.0, 1.0)),
    "memory": ((0.0, 0.0), (0.1, 0.25), (0.2, 0.4), (0.3, 0.5), (0.4, 0.6), (0.5, 0.7), (0.6, 0.8),
               (0.7, 0.85), (0.8, 0.9), (0.9, 0.95), (1.0, 1.0)),
    "network": ((0.0, 0.0), (0.1, 0.4), (0.2, 0.6), (0.3, 0.7), (0.4, 0.8), (0.5, 0.9), (1.0, 1.0)),
}
PUBLISHED_CURVES["other"] = PUBLISHED_CURVES["memory"]
CURVES_SOURCE = "published NanoFlow curves (A100)"

# a cross-stream event wait in a CUDA graph where no calibration measured one (measured timelines
# show 2.5-3.1 us on an H100 and 4.9 us under TP on 2x H200): 5 us, labelled default
DEFAULT_EVENT_WAIT_US = 5.0
SRC_PAIRS_OTHER = "pair table, worst measured partner of the class (no family for this pair)"
SRC_ROWS = "co-run rows"
SRC_CURVES = "A100 curves"
SRC_CURVES_FALLBACK = "A100 curves (outside the measured pairs)"
SRC_SAME_CLASS = "same class (replay ceiling)"
SRC_NO_SHARE = "no SM share, no pair measured (stretch 1)"


@dataclass(frozen=True)
class Interference:
    """The published curves; `source` says where co-run figures come from."""
    source: str = CURVES_SOURCE

    def speed(self, op_class: str, share: float) -> float:
        curve = PUBLISHED_CURVES[op_class]
        return max(1e-6, interp(curve[1:], share) if share > curve[1][0] else curve[1][1] * share / curve[1][0])

    def corun_ms(self, op_class: str, solo_ms: float, full_gpu_ms: float, share: float) -> float:
        return max(solo_ms, full_gpu_ms / self.speed(op_class, share))


@dataclass(frozen=True)
class Overheads:
    """Costs the kernels' own times do not hold: a wait on another stream's event, and the gap
    between two kernels of one stream (0 where the profile's times carry their own launch gap)."""
    event_wait_ms: float
    source: str
    launch_gap_ms: float = 0.0

    def __post_init__(self):
        for name in ("event_wait_ms", "launch_gap_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1.0):
                raise NfsearchError(f"{name[:-3].replace('_', ' ')} must be in 0..1000 us, not {value * 1e3:g} us")

    def describe(self) -> str:
        gap = f", launch gap {self.launch_gap_ms * 1e3:.2g} us" if self.launch_gap_ms else ""
        return f"cross-stream wait {self.event_wait_ms * 1e3:.2g} us{gap} ({self.source})"


def overheads_from_meta(meta: dict, cal: Calibration | None = None) -> Overheads:
    """The overheads `nfsearch calibrate` fitted from measured timelines (`cal`, else the one in
    `meta`), else the profile's measured ones ("overheads": {"event_wait_us": x}), else the labelled
    default."""
    cal = cal or calibration_from_meta(meta)
    if cal is not None:
        return Overheads(cal.event_wait_us / 1e3, f"fitted from {cal.num_waits} waits and {cal.num_gaps} gaps "
                         f"in {len(cal.sources)} measured plan run(s)", cal.launch_gap_us / 1e3)
    entry = meta.get("overheads")
    if isinstance(entry, dict) and "event_wait_us" in entry:
        value = entry["event_wait_us"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise NfsearchError(f"profile overheads: event_wait_us must be a number, not {value!r}")
        return Overheads(float(value) / 1e3, "measured")
    return Overheads(DEFAULT_EVENT_WAIT_US / 1e3, "default, not measured")


class Partner(NamedTuple):
    """A nano-op running beside another: its op, size and SM count."""
    op: str
    num_tokens: int
    sm_count: int


def power_bound_of(profile: ProfileTable, model: ModelSpec, workload: Workload) -> tuple[PowerBound | None, str]:
    """The power bound of one layer of `model` under `workload` from `profile`'s energy, or None and
    one line saying why there is none."""
    cost = CostModel(profile, build_layer(model, workload), workload)
    return cost.power_bound(), cost.power_note


# ------------------------------------------------------------------------------------ cost model
class CostModel:
    def __init__(self, profile: ProfileTable, layer: nx.DiGraph, workload: Workload,
                 interference: Interference | None = None, allow_extrapolation: bool = False,
                 pairs: PairModel | None = None, overheads: Overheads | None = None):
        self.profile = profile
        self.workload = workload
        self.interference = interference or Interference()
        # kept for callers; a lookup outside the profile's grid scales by the roofline's shape whatever
        # it says (op_scaling), and only without the model (a hand-built graph) needs it
        self.is_extrapolating = allow_extrapolation
        self.pairs = pairs
        # `nfsearch calibrate`'s factors and overheads, applied only where the profile has them
        self.calibration = calibration_from_meta(profile.meta)
        self.overheads = overheads or overheads_from_meta(profile.meta, self.calibration)
        self.layer = layer
        self.ops: dict[str, Op] = {name: layer.nodes[name]["op"] for name in layer.nodes}
        self.whole_tokens = {name: layer.nodes[name]["token_range"][1] - layer.nodes[name]["token_range"][0]
                             for name in layer.nodes}
        self.num_sms = int(profile.meta["num_sms"])
        # network ops the profile has a no-SM-share impl of (stage 1 asks per nano-op, per structure)
        self.no_share_ops = frozenset(name for name, op in self.ops.items() if op.op_class == "network"
                                      and any(i in NO_SHARE_IMPLS for i in profile.impls(name)))
        self.source_counts: Counter = Counter()       # distinct stretch lookups by source
        self.raw_solo_ms = lru_cache(maxsize=None)(self._raw_solo_ms)
        self.solo_ms = lru_cache(maxsize=None)(self._solo_ms)
        self.corun_ms = lru_cache(maxsize=None)(self._corun_ms)
        self.stretch = lru_cache(maxsize=None)(self._stretch)
        self.beside_ms = lru_cache(maxsize=None)(self._beside_ms)
        self.stretched_ms = lru_cache(maxsize=None)(self._stretched_ms)
        self.nano_dynamic_j = lru_cache(maxsize=None)(self._nano_dynamic_j)
        self.model: ModelSpec | None = layer.graph.get("model")
        self.gpu = gpu_from_profile(profile)
        self._scalings: dict[str, Scaling | None] = {}
        self.energy = EnergyModel.from_profile(profile, self._whole_gpu_ms)
        self._power: tuple[PowerBound | None, str] | None = None

    def scaling(self, op: str) -> Scaling | None:
        """How lookups of `op` outside the profile's grid scale (roofline.op_scaling); without the
        model, linear where extrapolation is allowed, else none (ProfileMiss)."""
        if op not in self._scalings:
            if self.model is not None:
                self._scalings[op] = op_scaling(self.ops[op], self.model, self.workload, self.gpu)
            else:
                self._scalings[op] = LINEAR if self.is_extrapolating else None
        return self._scalings[op]

    def _whole_gpu_ms(self, op: str, num_tokens: int, context: int) -> float:
        """The op's profile time on the whole GPU at any context (the energy model scales by it)."""
        if op not in self.ops:
            raise ProfileMiss(f"op {op} is not in this layer")
        return self.profile.time_ms(op, num_tokens, self.num_sms, context, scaling=self.scaling(op))[0]

    def scaled_ops(self) -> list[str]:
        """The ops whose whole batch lies outside the profile's measured tokens or contexts (priced by
        the roofline's shape from the nearest measured point)."""
        return [name for name in self.ops if self.profile.impls(name) and
                not self.profile.covers(name, self.whole_tokens[name], self.context(name))]

    @property
    def event_wait_ms(self) -> float:
        return self.overheads.event_wait_ms

    @property
    def launch_gap_ms(self) -> float:
        return self.overheads.launch_gap_ms

    def op_class(self, op: str) -> str:
        return self.ops[op].op_class

    def context(self, op: str) -> int:
        return op_context(self.ops[op], self.workload)

    def impl(self, op: str, num_tokens: int, sm_count: int) -> str:
        return self._lookup(op, num_tokens, sm_count)[1]

    def _raw_solo_ms(self, op: str, num_tokens: int, sm_count: int) -> float:
        """The profile's time, as measured (stretches are ratios over it)."""
        return self._lookup(op, num_tokens, sm_count)[0]

    def _solo_ms(self, op: str, num_tokens: int, sm_count: int) -> float:
        """The time predicted alone: the profile's, times the calibration's solo factor of its class
        (what the op takes inside a replayed plan against what the profiler timed it at)."""
        raw = self.raw_solo_ms(op, num_tokens, sm_count)
        return raw if self.calibration is None else raw * self.calibration.solo_factor(self.op_class(op), base_op(op))

    def _corun_ms(self, op: str, num_tokens: int, sm_count: int, co_class: str) -> float:
        """Time while some op of `co_class` runs beside it, by class: the older co-run rows if the
        table has them, else the published curves (the pair table needs the partner op itself)."""
        return self.solo_ms(op, num_tokens, sm_count) * self._class_stretch(op, num_tokens, sm_count, co_class)[0]

    def _class_stretch(self, op: str, num_tokens: int, sm_count: int, co_class: str) -> tuple[float, str]:
        solo = self.raw_solo_ms(op, num_tokens, sm_count)
        if co_class == self.op_class(op) or not co_class:
            return 1.0, SRC_SAME_CLASS
        if sm_count == 0:         # no SM share: no partition scaling or SM interference to apply
            return 1.0, SRC_NO_SHARE
        if co_class in self.profile.rows["co_class"].values and self.profile.impls(op, co_class):
            try:
                row, impl = self._lookup(op, num_tokens, sm_count, co_class)
                # against the same impl's solo time where the table has it (rows of an older impl)
                try:
                    base = self.profile.time_ms(op, num_tokens, sm_count, self.context(op), impl=impl,
                                                scaling=self.scaling(op))[0]
                except ProfileMiss:
                    base = solo
                return max(1.0, row / base), SRC_ROWS
            except ProfileMiss:
                pass
        full = self.raw_solo_ms(op, num_tokens, self.num_sms)
        corun = self.interference.corun_ms(self.op_class(op), solo, full, sm_count / self.num_sms)
        return corun / solo, SRC_CURVES_FALLBACK if self.pairs is not None else SRC_CURVES

    def _stretch(self, op: str, num_tokens: int, sm_count: int, partner: Partner) -> tuple[float, str]:
        """(stretch, source) of the op beside one partner nano-op."""
        if self.pairs is not None and partner.op in self.ops:
            got = self.pairs.stretch(family_op(op, sm_count), num_tokens, self.context(op), sm_count,
                                     family_op(partner.op, partner.sm_count), partner.num_tokens,
                                     self.context(partner.op))
            if got is not None:
                stretch, part_ms, source = got
                if not self.pairs.is_over_solo:
                    # the fully-overlapped time measured with the pair over this table's solo time
                    # (the two measurements of one op alone differ by up to ~10%)
                    stretch = stretch * part_ms / self.raw_solo_ms(op, num_tokens, sm_count)
                self.source_counts[source] += 1
                return max(1.0, stretch), source
        value, source = self._class_stretch(op, num_tokens, sm_count, self.op_class(partner.op))
        if source == SRC_CURVES_FALLBACK:
            # a measured profile: the curves mix partition scaling (already in the solo rows) into
            # interference, so the pair table's nearest measurement is preferred, labelled
            got = self._pair_fallback(op, num_tokens, sm_count, partner)
            if got is not None:
                value, source = got
        self.source_counts[source] += 1
        return value, source

    def _pair_fallback(self, op: str, num_tokens: int, sm_count: int, partner: Partner) -> tuple[float, str] | None:
        """Outside the measured range: the same family at its nearest measured size and SM count;
        with no family for this pair, the worst measured partner of the partner's class (any class
        if none), each at its nearest measured point."""
        def at_edge(partner_op: str, partner_tokens: int) -> float | None:
            base = partner_op.removesuffix(NO_SHARE_TAG)
            got = self.pairs.stretch(family_op(op, sm_count), num_tokens, self.context(op), sm_count, partner_op,
                                     partner_tokens, self.context(base) if base in self.ops else 0, is_clamped=True)
            if got is None:
                return None
            return got[0]          # (over the clamped point's own partition time)
        value = at_edge(family_op(partner.op, partner.sm_count), partner.num_tokens)
        if value is not None:
            return value, SRC_PAIRS_EDGE
        known = self.pairs.partners_of(family_op(op, sm_count))
        same = [q for q, c in known if c == self.op_class(partner.op)] or [q for q, _ in known]
        values = [v for v in (at_edge(q, partner.num_tokens) for q in same) if v is not None]
        return (max(values), SRC_PAIRS_OTHER) if values else None

    def _beside_ms(self, op: str, num_tokens: int, sm_count: int, partners: tuple[Partner, ...]) -> float:
        """Time of the op while `partners` (sorted) run beside it: solo x (1 + sum of (stretch - 1))."""
        solo = self.solo_ms(op, num_tokens, sm_count)
        extra = sum(self.stretch(op, num_tokens, sm_count, p)[0] - 1.0 for p in partners)
        if partners and self.calibration is not None:
            return solo * max(1.0, (1.0 + extra) * self.calibration.factor(self.op_class(op), base_op(op)))
        return solo * (1.0 + extra)

    def _stretched_ms(self, op: str, num_tokens: int, sm_count: int, co_classes: frozenset[str]) -> float:
        """Time beside the WORST single partner among the layer's ops of `co_classes` (each whole, on
        the SMs this op leaves): the pessimistic figure stage 2 plans with."""
        others = [name for name in self.ops if self.op_class(name) in co_classes and name != op
                  and self.op_class(name) != self.op_class(op)]
        if not others or sm_count >= self.num_sms or sm_count == 0:     # 0: holds no SM share
            return self.solo_ms(op, num_tokens, sm_count)
        rest = self.num_sms - sm_count
        return max(self.beside_ms(op, num_tokens, sm_count, (Partner(name, self.whole_tokens[name], rest),))
                   for name in others)

    def power_bound(self) -> PowerBound | None:
        """The power bound of one layer (cost.py's module doc); None without energy (power_note says why)."""
        if self._power is None:
            if self.energy is None:
                self._power = (None, no_energy_note(self.profile))
            else:
                try:
                    bound = self.energy.layer_bound(self.layer, self.workload)
                    self._power = (bound, bound.note)
                except ProfileMiss as miss:
                    self._power = (None, f"no power bound: {miss}")
        return self._power[0]

    @property
    def power_note(self) -> str:
        self.power_bound()
        return self._power[1]

    def _nano_dynamic_j(self, op: str, num_tokens: int) -> float:
        """Dynamic energy of a nano-op of `num_tokens` of `op`, at its own token count (0 without energy):
        a split costs what its nano-batches cost, each reading the op's weights again (on an H100 a
        GEMM split 512 + 1536 takes at most 2% more energy than at 2048 tokens at the power limit)."""
        if self.energy is None or self.energy.is_unmeasured_network(self.layer.nodes[op]["op"]):
            return 0.0
        return self.energy.dynamic_j(op, num_tokens, self.context(op))[0]

    def split_energy_j(self, spans) -> float:
        """Dynamic energy the nano-ops of the timeline `spans` spend beyond their ops' whole (unsplit)
        energies, over all its layers (0 where no op is split, or without energy)."""
        if self.energy is None:
            return 0.0
        layers = {sp.layer for sp in spans}
        by_op = Counter(sp.op for sp in spans)
        split = {op for op, n in by_op.items() if n > len(layers)}
        whole = {op: self.nano_dynamic_j(op, self.whole_tokens[op]) for op in split}
        return sum(self.nano_dynamic_j(sp.op, sp.num_tokens) for sp in spans if sp.op in split) - \
            len(layers) * sum(whole.values())

    def overlap_energy_j(self, spans) -> tuple[float, int, int]:
        """(extra dynamic energy J, overlaps priced, overlaps without a measured pair) of the timeline
        `spans` (Span: op, num_tokens, start_ms, end_ms): for each two nano-ops of different ops that
        ran at once, (r - 1) x the share of each one's dynamic energy spent in the overlap, r the
        measured pair energy ratio (EnergyModel.pair_ratio). 0 without pair energy points."""
        if self.energy is None or not self.energy.pair_points:
            return 0.0, 0, 0
        extra, num_priced, num_unpriced = 0.0, 0, 0
        spans = sorted(spans, key=lambda sp: sp.start_ms)
        for i, a in enumerate(spans):
            for b in spans[i + 1:]:
                if b.start_ms >= a.end_ms:
                    break
                overlap_ms = min(a.end_ms, b.end_ms) - b.start_ms
                if overlap_ms <= 0 or a.op == b.op:
                    continue
                ratio = self.energy.pair_ratio(a.op, a.num_tokens, self.context(a.op),
                                               b.op, b.num_tokens, self.context(b.op))
                if ratio is None:
                    num_unpriced += 1
                    continue
                num_priced += 1
                extra += (ratio - 1.0) * sum(self.nano_dynamic_j(sp.op, sp.num_tokens) * overlap_ms
                                             / (sp.end_ms - sp.start_ms) for sp in (a, b))
        return extra, num_priced, num_unpriced

    def plan_power_bound(self, spans, num_layers: int) -> PowerBound | None:
        """The power bound of one layer of the plan whose replayed timeline is `spans`: the layer's
        (power_bound), plus what its nano-batches cost beyond the whole ops (split_energy_j), plus its
        overlaps' energy where the profile has pair energy points (overlap_energy_j). A plan of whole
        ops without overlap has the layer's."""
        bound = self.power_bound()
        if bound is None:
            return bound
        split = self.split_energy_j(spans) / num_layers
        extra, num_priced, num_unpriced = self.overlap_energy_j(spans)
        notes = [f"nano-batches {split:+.3f} J per layer over the whole ops"] if split else []
        if self.energy.pair_points:
            unpriced = (f", {num_unpriced} without a measured pair (counted as back to back)"
                        if num_unpriced else "")
            notes.append(f"overlaps {extra / num_layers:+.3f} J per layer from {num_priced} measured pair "
                         f"energies{unpriced}")
        if not notes:
            return bound
        return replace(bound, dynamic_energy_j=max(0.0, bound.dynamic_energy_j + split + extra / num_layers),
                       note="; ".join([bound.note] + notes))

    def describe_sources(self) -> str:
        """The interference sources, for plans and timelines."""
        if self.pairs is not None:
            head = (f"measured pair table ({self.pairs.num_points} splits; interpolated in tokens and SMs, "
                    f"partner size clamped; outside it, labelled: the co-run rows, the pair table's nearest "
                    f"measured point or worst partner of the class, last {CURVES_SOURCE})")
        elif self.profile.has_corun():
            head = f"measured co-run rows by class; elsewhere {CURVES_SOURCE}"
        else:
            head = self.interference.source
        calibrated = f"; {self.calibration.label}" if self.calibration is not None else ""
        power = f"; power bound from the profile's energy ({self.power_note})" if self.power_bound() else ""
        scaled = self.scaled_ops()
        outside = (f"; {', '.join(scaled)} outside the profile's measured sizes: scaled from the nearest "
                   "measured point by the roofline's shape" if scaled else "")
        return f"{head}; {self.overheads.describe()}{calibrated}{power}{outside}"

    def has_no_share(self, op: str) -> bool:
        """Whether the profile has an impl of `op` that holds no SM share (a nano-op of it may take 0 SMs)."""
        return op in self.no_share_ops

    def _lookup(self, op: str, num_tokens: int, sm_count: int, co_class: str = "") -> tuple[float, str]:
        context = op_context(self.ops[op], self.workload)
        if sm_count == 0:
            if co_class or self.op_class(op) != "network":
                raise ProfileMiss(f"op {op} cannot run on 0 SMs (only a network op of a no-SM-share impl)")
            return no_share_time_ms(self.profile, op, num_tokens, context, scaling=self.scaling(op))
        # co-run rows answer inside their own grid only (outside it the pair table's nearest point is
        # preferred, labelled); solo times scale outside the grid by the roofline's shape
        return self.profile.time_ms(op, num_tokens, sm_count, context, co_class=co_class,
                                    scaling=None if co_class else self.scaling(op))


@dataclass(frozen=True)
class Problem:
    model: ModelSpec
    workload: Workload
    gpu: GpuSpec
    profile: ProfileTable
    layer: nx.DiGraph
    cost: CostModel
    num_layers: int
    memory: MemoryNeed | None = None          # what one GPU holds for the batch (graph.memory_need)

    @property
    def bound_ms(self) -> float:
        return profile_roofline(self.model, self.workload, self.profile).bound_ms

    def plan_gpu(self) -> PlanGpu:
        return PlanGpu(self.gpu.name, self.gpu.num_sms, self.gpu.sm_granularity)

    def plan_profile(self) -> PlanProfile:
        return PlanProfile(self.profile.fingerprint(), self.profile.meta["source"], self.profile.label,
                           self.cost.describe_sources())


def make_problem(model: ModelSpec, workload: Workload, profile: ProfileTable, num_layers: int = 2,
                 allow_extrapolation: bool = False) -> Problem:
    if not 1 <= num_layers <= MAX_NUM_LAYERS:
        raise NfsearchError(f"num_layers must be in 1..{MAX_NUM_LAYERS}, not {num_layers}")
    layer = build_layer(model, workload)
    check_profile_model(profile, model, workload)
    gpu = gpu_from_profile(profile)
    memory = check_memory(model, workload, gpu.memory_bytes)
    pairs = None if profile.is_analytic else PairModel.from_profile(profile)
    cost = CostModel(profile, layer, workload, Interference(), allow_extrapolation, pairs)
    return Problem(model, workload, gpu, profile, layer, cost, num_layers, memory)



def profiles_dir() -> Path:
    """The bundled profiles/ folder (in the source tree beside the package)."""
    return Path(str(resources.files("nfsearch"))).parent / "profiles"


def bundled_profile(model: ModelSpec, workload: Workload, gpu_key: str = "h100-sxm") -> ProfileTable | None:
    """The bundled table of this GPU for this model: the one named after it, else any that measured its
    shapes, TP degree and data type (profile.check_profile_model: a Llama-3-8B config.json is priced
    by llama-3-8b's table); measured tables before analytic ones; None where none fits."""
    path = bundled_profile_path(model, workload, gpu_key)
    return None if path is None else load(path)


def bundled_profile_path(model: ModelSpec, workload: Workload, gpu_key: str = "h100-sxm") -> Path | None:
    """bundled_profile's file (read by its metadata alone)."""
    folder = profiles_dir() / gpu_key
    own = [folder / f"{model.name}.parquet", folder / f"{model.name}.analytic.parquet"]
    others = sorted(folder.glob("*.parquet"), key=lambda p: (p.name.endswith(".analytic.parquet"), p.name))
    for path in own + [p for p in others if p not in own]:
        if path.is_file() and not model_mismatch(read_meta(path), model, workload):
            return path
    return None


def default_profile(model: ModelSpec, workload: Workload, gpu_key: str = "h100-sxm") -> ProfileTable:
    """The bundled table for this GPU and model if there is one, else an analytic one."""
    return bundled_profile(model, workload, gpu_key) or analytic_profile(model, workload, load_gpu(gpu_key))


def default_gpu(model: ModelSpec, workload: Workload, gpu_key: str = "h100-sxm") -> GpuSpec:
    """The GPU rates a plan solved without --profile is priced and bounded with: the bundled table's
    (its measured ceilings), else the bundled GPU's (what the analytic table is built from)."""
    path = bundled_profile_path(model, workload, gpu_key)
    return gpu_from_profile(read_meta(path)) if path is not None else load_gpu(gpu_key)

