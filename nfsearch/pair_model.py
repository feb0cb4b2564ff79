"""How much slower an op runs beside a partner: stretches from a measured profile's pair table.

A pair family (nfsearch/pairs.py) is two ops launched together on the two sides of a green-context
split. From each measured split each side's FULLY-OVERLAPPED time is derived (the side that ends
first overlapped its partner all along; the other ran beside it until then and alone on its partition
after, so its overlapped rate is what is left once that solo tail is taken out), as a stretch over its
time alone on the same partition (`side_stretches`; `predict_pair` is its inverse). `PairModel`
interpolates stretches linearly in the op's own tokens and SM count and never extrapolates in those;
the partner's size and the contexts are taken at the nearest measured value (labelled "partner size
clamped" where that differs from the lookup). cost.CostModel combines them with its other sources.

`hold_out_pairs`: leave-one-out over the table, each inner split predicted by a model fitted without it.
"""

import bisect
from dataclasses import dataclass

from nfsearch.pairs import PairPoint, family_op, points_from_meta
from nfsearch.plan import NO_SHARE_IMPLS
from nfsearch.profile import ProfileMiss, ProfileTable, Scaling

# ops that run the same kernel as a measured one (norm2 is norm1's RMSNorm on other data)
OP_ALIASES = {"norm2": "norm1"}
MAX_STRETCH = 8.0          # a derived stretch beyond this is a measurement artefact (a stalled side)

SRC_PAIRS = "pair table"
SRC_PAIRS_CLAMPED = "pair table (partner size clamped)"
SRC_PAIRS_EDGE = "pair table at the nearest measured size/SMs (outside the measured range)"


def base_op(op: str) -> str:
    """The op whose kernel it runs (norm2 runs norm1's RMSNorm): calibration factors are per kernel."""
    return OP_ALIASES.get(op, op)


@dataclass(frozen=True)
class PairSample:
    """One side of one measured split: the op's fully-overlapped time over its time alone on the
    same partition, beside a partner of the given size."""
    num_tokens: int
    context: int
    partner_tokens: int
    partner_context: int
    sm_count: int
    stretch: float
    part_ms: float          # the op alone on the same partition, measured with the pair


def side_stretches(p: PairPoint) -> tuple[float, float]:
    """(stretch of A, stretch of B) fully overlapped, from one measured split.

    Launched together, the side that ends first (at t1) overlapped the other all along: its
    stretch is t1 / its partition time. The other side did a fraction f = 1 - tail / partition
    time by t1 (its tail after t1 ran alone at its partition speed), so fully overlapped it would
    take t1 / f. Stretches are kept in [1, MAX_STRETCH]: a partner never speeds an op up."""
    def rest(first_ms, last_ms, part_ms):
        done = 1.0 - (last_ms - first_ms) / part_ms
        return first_ms / part_ms / done if done > first_ms / part_ms / MAX_STRETCH else MAX_STRETCH
    if p.corun_a_ms <= p.corun_b_ms:
        sa, sb = p.corun_a_ms / p.part_a_ms, rest(p.corun_a_ms, p.corun_b_ms, p.part_b_ms)
    else:
        sa, sb = rest(p.corun_b_ms, p.corun_a_ms, p.part_a_ms), p.corun_b_ms / p.part_b_ms
    clamp = lambda s: min(MAX_STRETCH, max(1.0, s))
    return clamp(sa), clamp(sb)


def predict_pair(stretch_a: float, stretch_b: float, solo_a_ms: float, solo_b_ms: float) -> tuple[float, float]:
    """(end of A, end of B) when both start together: overlapped until the first ends, then the other
    alone on its partition (the inverse of side_stretches, and what simulate.replay does)."""
    ta, tb = stretch_a * solo_a_ms, stretch_b * solo_b_ms
    if ta <= tb:
        return ta, ta + (1.0 - ta / tb) * solo_b_ms
    return tb + (1.0 - tb / ta) * solo_a_ms, tb


def nearest(values, x):
    return min(values, key=lambda v: (abs(v - x), v))


def linear(xs: list, ys: list, x: float) -> tuple | None:
    """ys (tuples) at x, linear between the sorted xs; None outside [xs[0], xs[-1]] (never extrapolated)."""
    if x < xs[0] or x > xs[-1]:
        return None
    i = bisect.bisect_left(xs, x)
    if xs[i] == x:
        return ys[i]
    w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return tuple(a + (b - a) * w for a, b in zip(ys[i - 1], ys[i]))


def _over_solo(solo_ms, side, sms: int, stretch: float, part_ms: float) -> tuple[float, float]:
    """(stretch, base time) of one split's side restated over the table's solo time, if known."""
    if solo_ms is None:
        return stretch, part_ms
    try:
        solo = solo_ms(side, sms)
    except ProfileMiss:
        return stretch, part_ms
    return max(1.0, stretch * part_ms / solo), solo


class PairModel:
    """Stretches of an op beside a partner op, from a profile's pair table (see the module doc)."""

    def __init__(self, points: list[PairPoint], solo_ms=None):
        """`solo_ms(side, sm_count)`: the profile's solo time of a pair side. Given, each split's
        stretch is restated over that solo time (stretch x its pair-run partition time / the table's
        solo time) before it is interpolated, so interpolation works on the figure the cost model
        multiplies by the table's solo times (held out: 86% of splits within 5% instead of 81%)."""
        self.num_points = len(points)
        self.is_over_solo = solo_ms is not None
        self.samples: dict[tuple[str, str], list[PairSample]] = {}
        self.partner_class: dict[str, dict[str, str]] = {}
        for p in points:
            # a side of no SM share (a copy-engine collective) is a family of its own (pairs.family_op)
            op_a, op_b = family_op(p.a.op, p.sms_a), family_op(p.b.op, p.sms_b)
            self.partner_class.setdefault(op_a, {})[op_b] = p.b.op_class
            self.partner_class.setdefault(op_b, {})[op_a] = p.a.op_class
            sa, sb = side_stretches(p)
            sa, part_a = _over_solo(solo_ms, p.a, p.sms_a, sa, p.part_a_ms)
            sb, part_b = _over_solo(solo_ms, p.b, p.sms_b, sb, p.part_b_ms)
            self.samples.setdefault((op_a, op_b), []).append(
                PairSample(p.a.num_tokens, p.a.context, p.b.num_tokens, p.b.context, p.sms_a, sa, part_a))
            self.samples.setdefault((op_b, op_a), []).append(
                PairSample(p.b.num_tokens, p.b.context, p.a.num_tokens, p.a.context, p.sms_b, sb, part_b))
        for v in self.samples.values():
            v.sort(key=lambda s: (s.num_tokens, s.context, s.partner_tokens, s.partner_context, s.sm_count))

    @classmethod
    def from_profile(cls, profile: ProfileTable, points: list[PairPoint] | None = None) -> "PairModel | None":
        """The profile's pair table (or `points` of it), stretches restated over its solo times."""
        points = points_from_meta(profile.meta, profile.label) if points is None else points
        if not points:
            return None
        solo = lambda side, sms: (profile.time_ms(side.op, side.num_tokens, sms, side.context)[0] if sms else
                                  no_share_time_ms(profile, side.op, side.num_tokens, side.context)[0])
        return cls(points, solo)

    def has(self, op: str, partner_op: str) -> bool:
        return (OP_ALIASES.get(op, op), OP_ALIASES.get(partner_op, partner_op)) in self.samples

    def stretch(self, op: str, num_tokens: int, context: int, sm_count: int, partner_op: str,
                partner_tokens: int, partner_context: int, is_clamped: bool = False
                ) -> tuple[float, float, str] | None:
        """(stretch, time alone on the partition in ms, source) of `op` beside `partner_op`, both
        interpolated from the measured splits; None outside the measured range (the op's tokens or
        SM count beyond the family's measured ones, or no family). Stretch x partition time is the
        op's fully-overlapped time (with `is_over_solo`, the partition time is the table's solo time). `is_clamped`: the op's tokens and SM count are taken at the
        nearest measured ones instead (a labelled fallback, never the first answer)."""
        samples = self.samples.get((OP_ALIASES.get(op, op), OP_ALIASES.get(partner_op, partner_op)))
        if not samples:
            return None
        sizes = sorted({s.num_tokens for s in samples})
        if is_clamped:
            num_tokens = min(max(num_tokens, sizes[0]), sizes[-1])
        if not sizes[0] <= num_tokens <= sizes[-1]:
            return None
        i = bisect.bisect_left(sizes, num_tokens)
        bracket = [sizes[i]] if sizes[i] == num_tokens else [sizes[i - 1], sizes[i]]
        values, clamped = [], False
        for t in bracket:
            at_t = [s for s in samples if s.num_tokens == t]
            ctx = nearest(sorted({s.context for s in at_t}), context)
            at_t = [s for s in at_t if s.context == ctx]
            pctx = nearest(sorted({s.partner_context for s in at_t}), partner_context)
            at_t = [s for s in at_t if s.partner_context == pctx]
            clamped |= ctx != context or pctx != partner_context
            psizes = sorted({s.partner_tokens for s in at_t})
            if psizes[0] <= partner_tokens <= psizes[-1]:
                k = bisect.bisect_left(psizes, partner_tokens)
                pbracket = [psizes[k]] if psizes[k] == partner_tokens else [psizes[k - 1], psizes[k]]
            else:
                pbracket = [nearest(psizes, partner_tokens)]
                clamped = True
            by_partner = []
            for u in pbracket:
                line = [s for s in at_t if s.partner_tokens == u]
                if is_clamped:
                    sm_count = min(max(sm_count, line[0].sm_count), line[-1].sm_count)
                v = linear([s.sm_count for s in line], [(s.stretch, s.part_ms) for s in line], sm_count)
                if v is None:
                    return None
                by_partner.append((u, v))
            values.append((t, by_partner[0][1] if len(by_partner) == 1 else
                           linear([u for u, _ in by_partner], [v for _, v in by_partner], partner_tokens)))
        value = values[0][1] if len(values) == 1 else linear([t for t, _ in values], [v for _, v in values],
                                                              num_tokens)
        if is_clamped:
            return value[0], value[1], SRC_PAIRS_EDGE
        return value[0], value[1], SRC_PAIRS_CLAMPED if clamped else SRC_PAIRS

    def partners_of(self, op: str) -> list[tuple[str, str]]:
        """(partner op, its class) of every family measured with `op`."""
        return sorted(self.partner_class.get(OP_ALIASES.get(op, op), {}).items())


def no_share_time_ms(profile: ProfileTable, op: str, num_tokens: int, context: int = 0,
                     allow_extrapolation: bool = False, scaling: Scaling | None = None) -> tuple[float, str]:
    """(time, impl) of `op` holding no SM share: its fastest no-share impl's row at the whole GPU (how
    the profiler measures it: alone on a plain stream). ProfileMiss when the profile has none."""
    impls = [i for i in profile.impls(op) if i in NO_SHARE_IMPLS]
    if not impls:
        raise ProfileMiss(f"profile has no rows of a no-SM-share impl ({', '.join(sorted(NO_SHARE_IMPLS))}) "
                          f"for op {op}")
    return min(profile.time_ms(op, num_tokens, int(profile.meta["num_sms"]), context, impl=i,
                               allow_extrapolation=allow_extrapolation, scaling=scaling) for i in impls)


@dataclass(frozen=True)
class HeldOut:
    """One measured split predicted by a pair model fitted without it."""
    family: str
    sms_a: int
    sms_b: int
    measured_ms: tuple[float, float, float]       # A's end, B's end, makespan
    predicted_ms: tuple[float, float, float]

    @property
    def makespan_error(self) -> float:
        return abs(self.predicted_ms[2] / self.measured_ms[2] - 1.0)

    @property
    def side_error(self) -> float:
        """The worse of the two sides' relative errors."""
        return max(abs(p / m - 1.0) for p, m in zip(self.predicted_ms[:2], self.measured_ms[:2]))


def hold_out_pairs(profile: ProfileTable) -> list[HeldOut]:
    """Leave-one-out over the pair table: each split not at its family's edge (an edge would need
    extrapolation) is predicted as the cost model does (stretches interpolated from the other splits
    x the table's solo times; both start together, the first to end frees the other), and set
    against what was measured."""
    points = points_from_meta(profile.meta, profile.label)
    out = []
    for p in points:
        splits = sorted(q.sms_a for q in points if q.family == p.family)
        if p.sms_a in (splits[0], splits[-1]):
            continue
        model = PairModel.from_profile(profile, [q for q in points if q is not p])
        sides = []
        for me, sms, other in ((p.a, p.sms_a, p.b), (p.b, p.sms_b, p.a)):
            stretch, _, _ = model.stretch(me.op, me.num_tokens, me.context, sms, other.op,
                                          other.num_tokens, other.context)
            sides.append((max(1.0, stretch), profile.time_ms(me.op, me.num_tokens, sms, me.context)[0]))
        end_a, end_b = predict_pair(sides[0][0], sides[1][0], sides[0][1], sides[1][1])
        out.append(HeldOut(f"{p.a.describe()} x {p.b.describe()}", p.sms_a, p.sms_b,
                           (p.corun_a_ms, p.corun_b_ms, p.makespan_ms), (end_a, end_b, max(end_a, end_b))))
    return out
