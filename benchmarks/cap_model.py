"""A plan's layer time at the power cap, modelled offline: the whole layer at one steady SM clock, the
cap's fixed point. Not used by nfsearch: judged on 24 capped runs (benchmarks/cap_model_eval.py) it
misses the same two overlapped plans as max(replay, power bound) does (results/energy_2026-11-27/
ANALYSIS.md), so it stays here until it tells those apart.

Measured on H100s at their 700 W limit (benchmarks/results/energy_2026-11-27/ANALYSIS.md): plans doing
the same FLOPs and bytes spent 1.12-1.33 J of dynamic energy per layer, and the dearer ones held the
higher clocks. Voltage falls with the clock, and so does the energy of an operation; a plan that keeps
the GPU busier reaches the cap at a lower clock and spends less per layer. A bound that sums each op's
energy measured alone (cost.EnergyModel.layer_bound) gives every schedule of a layer one time; this
model gives each plan its own:

- T(f): the plan's replayed timeline with every compute-class nano-op stretched by f_ref / f (memory,
  network and small ops kept), re-timed along its streams and dependencies, keeping each wait and gap
  the replay had. f_ref is the clock the profile's GEMM times hold at, read off the profile itself:
  a capped GEMM's energy loop ran at a known clock for a known time, and the table times the same
  GEMM at the same size (median over the capped compute points).
- E(f): each nano-op's dynamic energy (its share of its op's, cost.nano_dynamic_j) times
  (f / f_op)^alpha, f_op the clock the op's energy point ran at. For a capped GEMM that clock is taken
  from its times (f_ref x table / loop), not from NVML's sampled clock, which reads noisily in loops
  of a millisecond.
- The plan runs at the highest f <= f_ref with E(f) / T(f) <= limit - static. Above f_ref the replay
  holds (the calibrated profile already matches plans that never reach the cap), so the model never
  predicts a plan faster than its replay.

alpha is to be fitted from measured runs; DEFAULT_ALPHA is the reading of the H100 rows in ANALYSIS.md
(dynamic energy per layer rose about as the clock^0.9-1.3).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from nfsearch.profile import ProfileMiss

DEFAULT_ALPHA = 1.0
CAPPED = 0.5                    # an energy point whose loop saw the SW power cap in at least this share
MIN_CLOCK_SHARE = 0.2           # the search for the clock stops at this share of f_ref


@dataclass(frozen=True, slots=True)
class CappedLayer:
    """One plan's modelled steady state at the cap (per layer; per GPU under TP)."""
    layer_ms: float             # T(f)
    sm_clock_mhz: float         # f
    ref_clock_mhz: float        # f_ref: the clock the replayed times hold at
    dynamic_j: float            # E(f)
    replayed_layer_ms: float
    alpha: float

    @property
    def is_capped(self) -> bool:
        return self.sm_clock_mhz < self.ref_clock_mhz

    def describe(self) -> str:
        if not self.is_capped:
            return (f"below the cap at the profile's clock ({self.ref_clock_mhz:.0f} MHz): "
                    f"{self.layer_ms:.4f} ms per layer, as replayed")
        return (f"at the cap: {self.layer_ms:.4f} ms per layer at a modelled {self.sm_clock_mhz:.0f} MHz "
                f"({self.dynamic_j:.3f} J dynamic per layer; replayed {self.replayed_layer_ms:.4f} ms at "
                f"{self.ref_clock_mhz:.0f} MHz; energy ~ clock^{self.alpha:g})")


def reference_clock_mhz(cost) -> float | None:
    """f_ref: the SM clock the profile's compute-class times hold at (module doc); where no
    compute-class energy point was capped, the max clock (None if the profile does not say it)."""
    energy = cost.profile.energy
    clocks = []
    for p in energy.points:
        if p.capped_share < CAPPED or not p.sm_clock_mhz or not _is_compute(cost, p.op):
            continue
        table_ms = _table_ms(cost, p)
        if table_ms:
            clocks.append(p.sm_clock_mhz * p.time_ms / table_ms)
    if clocks:
        return statistics.median(clocks)
    return energy.max_sm_clock_mhz


def point_clocks(cost, f_ref: float) -> dict[str, list[tuple[int, float]]]:
    """Per op: (tokens, the clock its energy point ran at), capped compute points from their times."""
    energy = cost.profile.energy
    f_max = energy.max_sm_clock_mhz or f_ref
    out: dict[str, list[tuple[int, float]]] = {}
    for p in energy.points:
        clock = p.sm_clock_mhz or f_max
        if p.capped_share >= CAPPED and _is_compute(cost, p.op):
            table_ms = _table_ms(cost, p)
            if table_ms:
                clock = f_ref * table_ms / p.time_ms
        out.setdefault(p.op, []).append((p.num_tokens, clock))
    return out


def capped_layer(schedule, timeline, cost, alpha: float = DEFAULT_ALPHA) -> CappedLayer | None:
    """The plan's layer time at the cap (module doc), or None where the profile has no energy."""
    if cost.energy is None:
        return None
    f_ref = reference_clock_mhz(cost)
    if not f_ref:
        return None
    clocks = point_clocks(cost, f_ref)
    headroom_w = cost.energy.energy.power_limit_w - cost.energy.energy.static_power_w
    num_layers = schedule.num_layers
    spans = {s.id: s for s in timeline.spans}
    ops = sorted(schedule.nano_ops, key=lambda o: o.order)
    energies = []                   # (dynamic J at the op's point clock, that clock)
    for o in ops:
        points = clocks.get(o.op) or [(o.num_tokens, f_ref)]
        clock = min(points, key=lambda p: (abs(p[0] - o.num_tokens), p[0]))[1]
        energies.append((cost.nano_dynamic_j(o.op, o.num_tokens), clock))

    def layer_ms(f: float) -> float:
        return _retimed_ms(ops, spans, f_ref / f) / num_layers

    def dynamic_j(f: float) -> float:
        return sum(e * (f / clock) ** alpha for e, clock in energies) / num_layers

    def is_over(f: float) -> bool:
        return dynamic_j(f) / layer_ms(f) * 1e3 > headroom_w

    replayed = timeline.layer_time_ms
    f = f_ref
    if is_over(f_ref):
        lo, hi = MIN_CLOCK_SHARE * f_ref, f_ref
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if is_over(mid) else (mid, hi)
        f = lo
    return CappedLayer(max(layer_ms(f), replayed) if f >= f_ref else layer_ms(f), f, f_ref, dynamic_j(f),
                       replayed, alpha)


def _retimed_ms(ops, spans, stretch: float) -> float:
    """The makespan with compute-class spans stretched by `stretch`, each op starting after its stream's
    previous op and its dependencies as late after them as it started in the replay."""
    end, orig_end, last_of_stream = {}, {}, {}
    for o in ops:
        s = spans[o.id]
        duration = (s.end_ms - s.start_ms) * (stretch if o.op_class == "compute" else 1.0)
        before = [d for d in o.deps if d in end]
        if o.stream in last_of_stream:
            before.append(last_of_stream[o.stream])
        start = max((end[p] + max(0.0, s.start_ms - orig_end[p]) for p in before), default=s.start_ms)
        end[o.id] = start + duration
        orig_end[o.id] = s.end_ms
        last_of_stream[o.stream] = o.id
    return max(end.values(), default=0.0)


def _is_compute(cost, op: str) -> bool:
    return op in cost.ops and cost.op_class(op) == "compute"


def _table_ms(cost, point) -> float | None:
    try:
        return cost.profile.time_ms(point.op, point.num_tokens, cost.num_sms, point.context, impl=point.impl)[0]
    except ProfileMiss:
        return None
