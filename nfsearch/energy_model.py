"""Energy of an op and the power bound of a layer, from a profile's energy points.

`EnergyModel` reads energy.ProfileEnergy (per op, the board energy per call of a sustained loop on the
whole GPU): interpolated linearly in tokens at the nearest measured context, scaled with the op's time
outside the measured points, each labelled how. Its `layer_bound` is one layer's dynamic energy over
the power headroom (energy.PowerBound); `pair_ratio` prices two kernels run at once from the pair
energy points. cost.CostModel charges a plan's own split and overlap with it (see cost.py's doc).
"""

import math
from collections import Counter
from functools import lru_cache

import networkx as nx

from nfsearch.energy import PowerBound, ProfileEnergy, energy_calibration_from_meta
from nfsearch.errors import NfsearchError
from nfsearch.graph import Op, op_context
from nfsearch.pair_model import OP_ALIASES, base_op, linear, nearest
from nfsearch.profile import ProfileMiss, ProfileTable
from nfsearch.specs import Workload

ENERGY_MEASURED = "measured"
ENERGY_INTERPOLATED = "interpolated in tokens"
ENERGY_SCALED = "scaled (outside the measured tokens or context)"


class EnergyModel:
    """Energy of an op from a profile's energy points (the module doc): board energy and loop time per
    call, interpolated in tokens at the nearest measured context, scaled outside.

    `op_time_ms(op, num_tokens, context)`: the op's time on the whole GPU (the cost model's lookup).
    Given, energy outside the measured tokens and contexts scales with the op's time (a kernel spends
    about its measured power for as long as it runs: prefill attention of one 32k prompt costs its
    time at the 3840-token point's power, not 1000x that point's energy); without it, in proportion
    to the tokens (and the context)."""

    def __init__(self, energy: ProfileEnergy, factor: float = 1.0, factor_label: str = "", op_time_ms=None):
        self.energy = energy
        self.factor = factor
        self.op_time_ms = op_time_ms
        # without a fitted factor the bound runs low: measured dynamic energy was 1.02-1.05x the
        # profile's (W1-W4 on H100s); a factor fitted on one model carries to others of the GPU
        self.factor_label = factor_label or ("energy factor 1 (none fitted: `nfsearch calibrate --energy` fits one "
                                             "from runs, `calibrate --from` carries one from a profile of this GPU)")
        # pair energy point -> its dynamic energy ratio at one clock; a point that spent no energy
        # above the static power (a bad window) prices nothing rather than failing every replay
        self.pair_points = {}
        for p in energy.pair_points:
            try:
                self.pair_points[p] = p.dynamic_ratio(energy.static_power_w)
            except NfsearchError:
                continue
        self.pair_ratio = lru_cache(maxsize=None)(self._pair_ratio)   # replays ask the same pairs again
        self.points: dict[str, dict[int, list[tuple[int, float, float]]]] = {}
        for p in energy.points:
            self.points.setdefault(p.op, {}).setdefault(p.context, []).append(
                (p.num_tokens, p.energy_within_limit_j(energy.power_limit_w), p.time_ms))
        for by_ctx in self.points.values():
            for line in by_ctx.values():
                line.sort()

    @classmethod
    def from_profile(cls, profile: ProfileTable, op_time_ms=None) -> "EnergyModel | None":
        if profile.energy is None:
            return None
        cal = energy_calibration_from_meta(profile.meta)
        return cls(profile.energy, cal.factor if cal else 1.0, cal.label if cal else "", op_time_ms)

    def _scaled(self, op: str, num_tokens: int, context: int, base_tokens: int, base_context: int) -> float:
        """How much more energy (op, num_tokens, context) takes than (op, base_tokens, base_context):
        the ratio of their times where known, else of tokens x context."""
        if self.op_time_ms is not None:
            try:
                base = self.op_time_ms(op, base_tokens, base_context)
                return self.op_time_ms(op, num_tokens, context) / base
            except ProfileMiss:
                pass
        ratio = num_tokens / base_tokens
        return ratio * (context / base_context if context > 0 and base_context > 0 else 1.0)

    def op_energy(self, op: str, num_tokens: int, context: int) -> tuple[float, float, str]:
        """(board energy J, loop time ms, how) of one call of `op` over `num_tokens` at `context`."""
        by_ctx = self.points.get(op) or self.points.get(OP_ALIASES.get(op, op))
        if not by_ctx:
            raise ProfileMiss(f"profile energy has no points for op {op}")
        ctx = nearest(sorted(by_ctx), context)
        line = by_ctx[ctx]
        tokens = [t for t, _, _ in line]
        got = linear(tokens, [(e, t) for _, e, t in line], num_tokens)
        if got is None:               # outside the measured tokens: from the nearest point, scaled
            edge = line[0] if num_tokens < tokens[0] else line[-1]
            k = self._scaled(op, num_tokens, ctx, edge[0], ctx)
            energy_j, time_ms, how = edge[1] * k, edge[2] * k, ENERGY_SCALED
        else:
            energy_j, time_ms = got
            how = ENERGY_MEASURED if num_tokens in tokens else ENERGY_INTERPOLATED
        if ctx != context and ctx > 0 and context > 0:
            k = self._scaled(op, num_tokens, context, num_tokens, ctx)
            energy_j, time_ms, how = energy_j * k, time_ms * k, ENERGY_SCALED
        return energy_j, time_ms, how

    def dynamic_j(self, op: str, num_tokens: int, context: int) -> tuple[float, str]:
        """(energy above static power x the factor, how) of one call; never below 0."""
        energy_j, time_ms, how = self.op_energy(op, num_tokens, context)
        return self.factor * max(0.0, energy_j - self.energy.static_power_w * time_ms / 1e3), how

    def _pair_ratio(self, op_a: str, num_tokens_a: int, context_a: int, op_b: str, num_tokens_b: int,
                    context_b: int) -> float | None:
        """The dynamic energy of `op_a` and `op_b` run together over theirs back to back, from the pair
        energy point of their family (either order) nearest in tokens and context (log distance);
        None where no pair of these two kernels was measured."""
        a, b = base_op(op_a), base_op(op_b)
        best = None
        for p in self.pair_points:
            for (x, tx, cx, y, ty, cy) in ((p.op_a, p.num_tokens_a, p.context_a, p.op_b, p.num_tokens_b, p.context_b),
                                            (p.op_b, p.num_tokens_b, p.context_b, p.op_a, p.num_tokens_a, p.context_a)):
                if (base_op(x), base_op(y)) != (a, b):
                    continue
                far = (abs(math.log(tx / num_tokens_a)) + abs(math.log(ty / num_tokens_b))
                       + abs(math.log((cx + 1) / (context_a + 1))) + abs(math.log((cy + 1) / (context_b + 1))))
                if best is None or far < best[0]:
                    best = (far, p)
        return None if best is None else self.pair_points[best[1]]

    def is_unmeasured_network(self, op: Op) -> bool:
        """A collective without energy points (a TP profile's): it counts as no dynamic energy."""
        return op.op_class == "network" and not self.points.get(op.name)

    def layer_bound(self, layer: nx.DiGraph, workload: Workload) -> PowerBound:
        """The power bound of one layer (per GPU under TP): its ops at their whole token counts
        (ProfileMiss where an op other than an unmeasured collective has no energy)."""
        total, hows, unmeasured = 0.0, Counter(), []
        for name in layer.nodes:
            op = layer.nodes[name]["op"]
            if self.is_unmeasured_network(op):
                unmeasured.append(name)
                continue
            lo, hi = layer.nodes[name]["token_range"]
            value, how = self.dynamic_j(name, hi - lo, op_context(op, workload))
            total += value
            hows[how] += 1
        per_gpu = f"per GPU: the TP={workload.tp_degree} shard's ops; " if workload.tp_degree > 1 else ""
        network = (f"; collectives {', '.join(unmeasured)} counted as no dynamic energy (not measured on one GPU)"
                   if unmeasured else "")
        note = (f"{per_gpu}{len(self.energy.points)} energy points, ops "
                + ", ".join(f"{n} {h}" for h, n in sorted(hows.items())) + f"{network}; {self.factor_label}")
        return PowerBound(total, self.energy.power_limit_w, self.energy.static_power_w, self.factor, note)


def no_energy_note(profile: ProfileTable) -> str:
    return (f"no power bound: the {profile.label} has no energy"
            + ("" if profile.is_analytic else " (nfsearch profile --energy-only PROFILE adds it on the GPU)"))
