"""Energy: what a profile measured of it, the power bound it gives one layer, and the energy factor
that calibrates that bound against measured runs. Torch-free, below profile.py and cost.py.

Energy points (`ProfileEnergy`, a profile's metadata key "energy"): the GPU's enforced power limit,
its static power, and per op a few points (op, impl, tokens, context) of the board energy per call
measured in a sustained back-to-back loop on the whole GPU with the op's fastest impl
(nfsearch/runtime/power.py says how). It is metadata, so a profile's fingerprint (rows and required
keys) does not change when energy is added. Pair points (`PairEnergyPoint`): a pair family of the
pair table at its best split, both sides launched together in a sustained loop, against the same two
ops back to back on the whole GPU measured the same way: what overlapping them costs in energy, which
ops measured alone cannot say.

The power bound (`PowerBound`): the cost model (cost.py) sums a layer's dynamic energy from the
points; no schedule runs the layer faster than that energy spent at the power the limit leaves above
static power.

The energy factor (`EnergyCalibration`, a profile's metadata key "energy_calibration"): fitted from
run reports (`calibrate --energy PLAN RUN_JSON`: the executor's measured energy per layer against the
profile's predicted dynamic energy), it scales the power bound's energies.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

from nfsearch.errors import NfsearchError
from nfsearch.files import shown
from nfsearch.plan import NO_SHARE_IMPLS
from nfsearch.specs import MAX_CONTEXT, MAX_LABEL_CHARS, MAX_RATE, MAX_SMS, MAX_TIME_MS

ENERGY_KEY = "energy"
MAX_POWER_W = 1e5               # a board's power limit beyond this is a unit error
MAX_ENERGY_J = 1e4              # one kernel call
MAX_CLOCK_MHZ = 1e5
# an op's dynamic energy goes about as SM clock^this under the power cap: fits over H100 plans at
# their power limit gave exponents of 0.9-1.3, and 1 sits in the middle
ENERGY_CLOCK_EXPONENT = 1.0
MAX_ENERGY_POINTS = 10_000


# ------------------------------------------------------------------------------------ energy points
def _positive(value, what: str, high: float, may_be_zero: bool = False) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value >= 0 if may_be_zero else value > 0) and value <= high)
    if not ok:
        raise NfsearchError(f"profile energy: {what} must be a {'' if may_be_zero else 'positive '}number up to "
                            f"{high:g}, not {value!r}")
    return float(value)


def _optional(value, what: str, high: float) -> float | None:
    return None if value is None else _positive(value, what, high)


def _short_name(value, what: str) -> str:
    if not (isinstance(value, str) and value and value.isprintable() and len(value) <= MAX_LABEL_CHARS):
        raise NfsearchError(f"profile energy: {what} must be a short name, not {shown(value, 40)!r}")
    return value


def _count(value, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise NfsearchError(f"profile energy: {what} must be an integer in {low}..{high}, not {value!r}")
    return value


def _check_loop(point, prefix: str, what: str) -> None:
    """Check (and store as floats) the readings of one sustained loop of an energy point: the fields
    `prefix` + energy_j, time_ms, power_w, sm_clock_mhz (optional) and capped_share (0..1)."""
    for key, high in (("energy_j", MAX_ENERGY_J), ("time_ms", MAX_TIME_MS), ("power_w", MAX_POWER_W)):
        name = prefix + key
        object.__setattr__(point, name, _positive(getattr(point, name), f"{what} {name}", high))
    name = prefix + "sm_clock_mhz"
    object.__setattr__(point, name, _optional(getattr(point, name), f"{what} {name}", MAX_CLOCK_MHZ))
    name = prefix + "capped_share"
    object.__setattr__(point, name, _positive(getattr(point, name), f"{what} {name}", 1.0, may_be_zero=True))


@dataclass(frozen=True)
class EnergyPoint:
    """One op at one size, run back to back on the whole GPU with `impl` (its fastest there):
    the board energy per call (static power included), the GPU time per call in that loop (at the
    clock the loop ran at, which the power cap may have lowered), the loop's mean board power, median
    SM clock and the share of NVML samples with the SW power cap on."""
    op: str
    impl: str
    num_tokens: int
    context: int
    energy_j: float
    time_ms: float
    power_w: float
    sm_clock_mhz: float | None = None
    capped_share: float = 0.0

    def __post_init__(self):
        for key in ("op", "impl"):
            _short_name(getattr(self, key), f"point {key}")
        for key, low in (("num_tokens", 1), ("context", 0)):
            _count(getattr(self, key), f"{self.op} {key}", low, MAX_CONTEXT)
        _check_loop(self, "", self.op)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.op, self.num_tokens, self.context)

    def energy_within_limit_j(self, power_limit_w: float) -> float:
        """The board energy per call, with the mean power of a loop that the SW power cap held (capped
        samples) taken at the enforced limit where it read more. A layer runs at the limit, which the
        board holds it to; capped short GEMM loops (512 tokens) read 10-12% over it, and priced at
        that reading a 512 + 1536 split costs 4-7% more per GEMM, which put overlapped plans 3-6
        points further above their measured layers than their sequential twins. At the limit the
        split costs at most 2% more, and the layers agree (tests/test_energy_choice.py)."""
        if self.capped_share <= 0 or self.power_w <= power_limit_w:
            return self.energy_j
        return self.energy_j * power_limit_w / self.power_w

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class PairEnergyPoint:
    """One pair family at one split (sides A and B each on its SMs, launched together, one call
    each per launch, launches back to back) and the same two ops back to back on the whole GPU
    (`b2b_*`, each with its fastest impl there): board energy (static included) and GPU time per
    launch, mean board power, median SM clock, share of samples at the SW power cap."""
    op_a: str
    num_tokens_a: int
    context_a: int
    sms_a: int
    impl_a: str
    op_b: str
    num_tokens_b: int
    context_b: int
    sms_b: int
    impl_b: str
    energy_j: float
    time_ms: float
    power_w: float
    b2b_energy_j: float
    b2b_time_ms: float
    b2b_power_w: float
    sm_clock_mhz: float | None = None
    capped_share: float = 0.0
    b2b_sm_clock_mhz: float | None = None
    b2b_capped_share: float = 0.0

    def __post_init__(self):
        for side in ("a", "b"):
            _short_name(getattr(self, f"op_{side}"), f"pair point op_{side}")
            _short_name(getattr(self, f"impl_{side}"), f"pair point impl_{side}")
            _count(getattr(self, f"num_tokens_{side}"), f"pair point num_tokens_{side}", 1, MAX_CONTEXT)
            _count(getattr(self, f"context_{side}"), f"pair point context_{side}", 0, MAX_CONTEXT)
            # 0 SMs: a side that holds no SM share (a copy-engine collective, plan.NO_SHARE_IMPLS)
            low = 0 if getattr(self, f"impl_{side}") in NO_SHARE_IMPLS else 1
            _count(getattr(self, f"sms_{side}"), f"pair point sms_{side}", low, MAX_SMS)
        for prefix in ("", "b2b_"):
            _check_loop(self, prefix, f"pair {self.op_a} x {self.op_b}")

    @property
    def key(self) -> tuple:
        return (self.op_a, self.num_tokens_a, self.context_a, self.op_b, self.num_tokens_b, self.context_b)

    def dynamic_ratio(self, static_power_w: float, alpha: float = ENERGY_CLOCK_EXPONENT) -> float:
        """The pair's dynamic energy (above static power) over the two back to back's, at one SM
        clock: above 1, overlapping them costs energy. Each loop settles at its own clock under the
        power cap, and an op's energy goes about as clock^alpha (voltage falls with the clock), while a
        layer runs its overlaps and its other ops at one clock: so the pair's energy is taken to the
        back-to-back loop's clock where both clocks were read."""
        pair = self.energy_j - static_power_w * self.time_ms / 1e3
        b2b = self.b2b_energy_j - static_power_w * self.b2b_time_ms / 1e3
        if pair <= 0 or b2b <= 0:
            raise NfsearchError(f"profile energy: {self.op_a} x {self.op_b} spends no energy above the "
                                f"static power {static_power_w:.0f} W")
        at_one_clock = 1.0
        if self.sm_clock_mhz and self.b2b_sm_clock_mhz:
            at_one_clock = (self.b2b_sm_clock_mhz / self.sm_clock_mhz) ** alpha
        return pair / b2b * at_one_clock

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ProfileEnergy:
    """The energy part of a profile (module doc): the power limit and static power of the GPU (W),
    and the op points. `method` and `static_method` say how they were measured."""
    power_limit_w: float
    static_power_w: float
    points: tuple[EnergyPoint, ...]
    method: str = ""
    static_method: str = ""
    idle_power_w: float | None = None
    static_sm_clock_mhz: float | None = None
    max_sm_clock_mhz: float | None = None
    date: str = ""
    failures: tuple[str, ...] = ()          # points that could not be measured, one line each
    pair_points: tuple[PairEnergyPoint, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "points", tuple(self.points))
        object.__setattr__(self, "pair_points", tuple(self.pair_points))
        object.__setattr__(self, "failures", tuple(str(f)[:300] for f in self.failures))
        limit = _positive(self.power_limit_w, "power_limit_w", MAX_POWER_W)
        static = _positive(self.static_power_w, "static_power_w", MAX_POWER_W)
        if static >= limit:
            raise NfsearchError(f"profile energy: static power {static:g} W is not below the power limit {limit:g} W")
        object.__setattr__(self, "power_limit_w", limit)
        object.__setattr__(self, "static_power_w", static)
        for key in ("idle_power_w", "static_sm_clock_mhz", "max_sm_clock_mhz"):
            object.__setattr__(self, key, _optional(getattr(self, key), key,
                                                    MAX_POWER_W if key == "idle_power_w" else MAX_CLOCK_MHZ))
        for key in ("method", "static_method", "date"):
            value = getattr(self, key)
            if not isinstance(value, str) or len(value) > 4000:
                raise NfsearchError(f"profile energy: {key} must be a text, not {shown(value, 40)!r}")
        if not all(isinstance(p, EnergyPoint) for p in self.points):
            raise NfsearchError("profile energy: points must be energy points")
        if not 1 <= len(self.points) <= MAX_ENERGY_POINTS:
            raise NfsearchError(f"profile energy: needs 1..{MAX_ENERGY_POINTS} points, has {len(self.points)}")
        keys = [p.key for p in self.points]
        if len(set(keys)) != len(keys):
            twice = next(k for k in keys if keys.count(k) > 1)
            raise NfsearchError(f"profile energy: two points for {twice[0]} at {twice[1]} tokens, context {twice[2]}")
        if not all(isinstance(p, PairEnergyPoint) for p in self.pair_points):
            raise NfsearchError("profile energy: pair_points must be pair energy points")
        if len(self.pair_points) > MAX_ENERGY_POINTS:
            raise NfsearchError(f"profile energy: more than {MAX_ENERGY_POINTS} pair points")
        pair_keys = [p.key for p in self.pair_points]
        if len(set(pair_keys)) != len(pair_keys):
            raise NfsearchError(f"profile energy: two pair points for {next(k for k in pair_keys if pair_keys.count(k) > 1)}")

    def merged(self, newer: ProfileEnergy) -> ProfileEnergy:
        """`newer`'s limit, static power and points, with this one's points (and pair points) it did
        not re-measure."""
        mine = {p.key: p for p in self.points}
        mine.update({p.key: p for p in newer.points})
        pairs = {p.key: p for p in self.pair_points}
        pairs.update({p.key: p for p in newer.pair_points})
        return ProfileEnergy(newer.power_limit_w, newer.static_power_w, tuple(sorted(mine.values(), key=lambda p: p.key)),
                             newer.method, newer.static_method, newer.idle_power_w, newer.static_sm_clock_mhz,
                             newer.max_sm_clock_mhz, newer.date, newer.failures,
                             tuple(sorted(pairs.values(), key=lambda p: p.key)))

    def to_dict(self) -> dict:
        return {"power_limit_w": self.power_limit_w, "static_power_w": self.static_power_w,
                "points": [p.to_dict() for p in self.points], "method": self.method,
                "static_method": self.static_method, "idle_power_w": self.idle_power_w,
                "static_sm_clock_mhz": self.static_sm_clock_mhz, "max_sm_clock_mhz": self.max_sm_clock_mhz,
                "date": self.date, "failures": list(self.failures),
                "pair_points": [p.to_dict() for p in self.pair_points]}

    @classmethod
    def from_dict(cls, d) -> ProfileEnergy:
        if not isinstance(d, dict):
            raise NfsearchError("profile energy must be a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise NfsearchError(f"profile energy: unknown keys {', '.join(shown(k, 30) for k in unknown[:5])}")
        for key in ("power_limit_w", "static_power_w", "points"):
            if key not in d:
                raise NfsearchError(f"profile energy lacks {key}")
        parsed = _parse_points(d["points"], EnergyPoint, "points", "point")
        failures = d.get("failures", [])
        if not isinstance(failures, list):
            raise NfsearchError("profile energy: failures must be a list")
        pairs = _parse_points(d.get("pair_points", []), PairEnergyPoint, "pair_points", "pair point")
        rest = {k: d[k] for k in known - {"points", "failures", "power_limit_w", "static_power_w", "pair_points"}
                if k in d}
        return cls(d["power_limit_w"], d["static_power_w"], parsed, failures=tuple(failures), pair_points=pairs,
                   **rest)


def _parse_points(items, point_cls, key: str, what: str) -> tuple:
    """The `point_cls` objects (EnergyPoint, PairEnergyPoint) of the list of JSON objects `items`
    found under `key` of a profile's energy; one line naming what is wrong otherwise."""
    if not isinstance(items, list) or not all(isinstance(p, dict) for p in items):
        raise NfsearchError(f"profile energy: {key} must be a list of objects")
    if len(items) > MAX_ENERGY_POINTS:
        raise NfsearchError(f"profile energy: more than {MAX_ENERGY_POINTS} {what}s")
    fields_ = point_cls.__dataclass_fields__
    required = [f for f, spec in fields_.items() if spec.default is dataclasses.MISSING]
    parsed = []
    for p in items:
        odd = sorted(str(k) for k in p if k not in fields_)
        if odd:
            raise NfsearchError(f"profile energy: unknown {what} keys {', '.join(shown(k, 30) for k in odd[:5])}")
        missing = [f for f in required if f not in p]
        if missing:
            raise NfsearchError(f"profile energy: a {what} lacks {', '.join(missing)}")
        parsed.append(point_cls(**p))
    return tuple(parsed)


def energy_from_meta(meta: dict) -> ProfileEnergy | None:
    """The profile's energy (checked), or None where it has none."""
    entry = meta.get(ENERGY_KEY) if isinstance(meta, dict) else None
    return None if entry is None else ProfileEnergy.from_dict(entry)


# ------------------------------------------------------------------------------------ power bound
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise NfsearchError(message)


def _is_float(x, low: float = 0.0, high: float = MAX_RATE, may_be_low: bool = False) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and (x >= low if may_be_low else x > low) and x <= high)


@dataclass(frozen=True)
class PowerBound:
    """The power bound of one layer: the layer's dynamic energy (the sum of its ops' energies above
    static power, from the profile; times the calibrated energy factor) cannot be spent faster than
    the power the limit leaves above static power, so no schedule runs a layer faster than
    bound_ms = dynamic_energy_j / (power_limit_w - static_power_w). Overlap does not lower the energy.
    A predicted layer time is max(the replayed makespan per layer, bound_ms) (cost.py computes it)."""
    dynamic_energy_j: float
    power_limit_w: float
    static_power_w: float
    energy_factor: float = 1.0
    note: str = ""                  # where the energies come from

    def __post_init__(self):
        _require(_is_float(self.dynamic_energy_j, may_be_low=True), f"power bound: dynamic energy must be a "
                 f"finite number >= 0, not {self.dynamic_energy_j!r}")
        _require(_is_float(self.power_limit_w) and _is_float(self.static_power_w)
                 and self.static_power_w < self.power_limit_w,
                 f"power bound: static power {self.static_power_w!r} W must be positive and below the limit "
                 f"{self.power_limit_w!r} W")
        _require(_is_float(self.energy_factor), f"power bound: energy factor must be positive, not {self.energy_factor!r}")
        _require(isinstance(self.note, str), "power bound: note must be a text")

    @property
    def headroom_w(self) -> float:
        return self.power_limit_w - self.static_power_w

    @property
    def bound_ms(self) -> float:
        return self.dynamic_energy_j / self.headroom_w * 1e3

    def layer_ms(self, replayed_layer_ms: float) -> float:
        """The predicted layer time: the replay's, unless the power bound is slower."""
        return max(replayed_layer_ms, self.bound_ms)

    def is_binding(self, replayed_layer_ms: float) -> bool:
        return self.bound_ms > replayed_layer_ms

    def describe(self, replayed_layer_ms: float) -> str:
        """One line: the bound, its terms, and whether it binds this replayed layer time."""
        terms = (f"{self.dynamic_energy_j:.3f} J dynamic energy per layer / ({self.power_limit_w:.0f} W limit - "
                 f"{self.static_power_w:.0f} W static)"
                 + (f", energy factor {self.energy_factor:.3f}" if self.energy_factor != 1.0 else ""))
        if self.is_binding(replayed_layer_ms):
            return (f"power-bound: the power bound is {self.bound_ms:.3f} ms per layer ({terms}), "
                    f"{self.bound_ms / replayed_layer_ms - 1:+.1%} over the replayed {replayed_layer_ms:.3f} ms: "
                    f"predicted layer time {self.bound_ms:.3f} ms")
        return (f"not power-bound: the power bound is {self.bound_ms:.3f} ms per layer ({terms}), "
                f"{1 - self.bound_ms / replayed_layer_ms:.1%} under the replayed {replayed_layer_ms:.3f} ms")

    def to_dict(self) -> dict:
        return {"dynamic_energy_j": self.dynamic_energy_j, "power_limit_w": self.power_limit_w,
                "static_power_w": self.static_power_w, "energy_factor": self.energy_factor,
                "bound_ms": self.bound_ms, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict) -> PowerBound:
        return cls(d["dynamic_energy_j"], d["power_limit_w"], d["static_power_w"], d.get("energy_factor", 1.0),
                   d.get("note", ""))


# ------------------------------------------------------------------------------------ energy factor
ENERGY_CALIBRATION_KEY = "energy_calibration"
ENERGY_FACTOR_RANGE = (0.2, 3.0)


@dataclass(frozen=True)
class EnergyRun:
    """One measured plan run: its dynamic energy per layer (the executor's sustained loop: energy per
    layer minus the profile's static power x its time per layer) against the profile's prediction
    (the sum of its ops' dynamic energies, no factor)."""
    source: str
    measured_j: float
    predicted_j: float
    is_power_capped: bool

    def __post_init__(self):
        for key in ("measured_j", "predicted_j"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise NfsearchError(f"energy calibration: {key} of {self.source!r} must be positive, not {value!r}")
        if not isinstance(self.is_power_capped, bool):
            raise NfsearchError("energy calibration: is_power_capped must be true or false")

    @property
    def ratio(self) -> float:
        return self.measured_j / self.predicted_j


@dataclass(frozen=True)
class EnergyCalibration:
    """The energy factor the cost model multiplies every op's dynamic energy by (1 without one):
    the median measured / predicted ratio over the power-capped runs where there are any (the factor
    matters only where the bound binds, and there the clocks and voltage have fallen, so energy per
    op with them), else over all runs; clamped to ENERGY_FACTOR_RANGE."""
    factor: float
    runs: tuple[EnergyRun, ...]
    fitted_on: str                      # "power-capped runs" or "all runs"

    def __post_init__(self):
        object.__setattr__(self, "runs", tuple(self.runs))
        lo, hi = ENERGY_FACTOR_RANGE
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not lo <= self.factor <= hi:
            raise NfsearchError(f"energy calibration: factor must be in {lo:g}..{hi:g}, not {self.factor!r}")
        if not self.runs:
            raise NfsearchError("energy calibration: no measured run named")
        if not isinstance(self.fitted_on, str):
            raise NfsearchError("energy calibration: fitted_on must be a text")

    @property
    def label(self) -> str:
        return f"energy factor {self.factor:.3f} (median measured/predicted over {self.fitted_on}, {len(self.runs)} run(s))"

    def to_dict(self) -> dict:
        return {"factor": self.factor, "fitted_on": self.fitted_on,
                "runs": [{"source": r.source, "measured_j": r.measured_j, "predicted_j": r.predicted_j,
                          "is_power_capped": r.is_power_capped} for r in self.runs]}

    @classmethod
    def from_dict(cls, d, where: str = "energy calibration") -> EnergyCalibration:
        try:
            return cls(d["factor"], tuple(EnergyRun(**r) for r in d["runs"]), d["fitted_on"])
        except NfsearchError as exc:
            raise NfsearchError(f"{where}: {exc}") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise NfsearchError(f"{where}: not an energy calibration ({type(exc).__name__}: {exc})") from None


def fit_energy(runs: list[EnergyRun]) -> EnergyCalibration:
    """The energy factor of `runs` (EnergyCalibration's doc)."""
    if not runs:
        raise NfsearchError("an energy calibration needs at least one measured run")
    capped = [r for r in runs if r.is_power_capped]
    chosen, fitted_on = (capped, "power-capped runs") if capped else (runs, "all runs (none power-capped)")
    lo, hi = ENERGY_FACTOR_RANGE
    factor = min(max(statistics.median(r.ratio for r in chosen), lo), hi)
    return EnergyCalibration(round(factor, 6), tuple(runs), fitted_on)


def energy_calibration_from_meta(meta: dict) -> EnergyCalibration | None:
    """The profile's energy calibration, or None where it has none."""
    entry = meta.get(ENERGY_CALIBRATION_KEY) if isinstance(meta, dict) else None
    return None if entry is None else EnergyCalibration.from_dict(entry, "profile energy calibration")
