"""The typed report of one plan run: what `nfsearch run`, `tune` and benchmarks/run_workloads.py
write, and what reads them back (no torch).

A RunReport holds the run's facts (GPU, plan, correctness, one Timing per timed variant, ceilings,
bound, notes); the numbers derived from them (measured layer time, speedups, % of bound, tokens/s)
are properties, and ``to_dict`` writes them beside the facts for readers of the JSON. ``from_dict``
reads the facts back (the derived keys are ignored and recomputed), so
``RunReport.from_dict(r.to_dict()) == r``.

Timing: every variant (the plan, seq-torch, seq-same, seq-compiled) is timed in ``repeats`` rounds;
a round is the median of ``iters`` CUDA-graph replays. The reported time is the median of the
rounds and the spread their min-max (rounds of the variants interleave, so slow drift of the GPU
clock hits all of them alike).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, fields

from nfsearch.energy import PowerBound
from nfsearch.errors import NfsearchError
from nfsearch.specs import MAX_RATE, Ceilings
from nfsearch.timeline import Timeline, timeline_from_dict, timeline_to_dict

HOWS = ("cuda-graph", "eager", "cpu")
BASELINES = ("seq-torch", "seq-same", "seq-compiled")
WAIT_KINDS = ("data", "order", "capacity", "stream")     # a launch's waits (runtime/launch.py)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise NfsearchError(message)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_ms(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _pairs(value, where: str) -> tuple[tuple[str, str], ...]:
    """A {str: str} mapping (JSON) or pairs, as sorted pairs (hashable, one order)."""
    items = value.items() if isinstance(value, dict) else value
    out = tuple(sorted((str(k), "" if v is None else str(v)) for k, v in items))
    _require(len({k for k, _ in out}) == len(out), f"{where}: duplicate names")
    return out


@dataclass(frozen=True)
class Timing:
    """One timed variant: per-layer ms of each repeat (each the median of `iters` replays)."""
    label: str                                   # "plan" or one of BASELINES
    repeat_layer_ms: tuple[float, ...]
    iters: int
    how: str                                     # "cuda-graph" | "eager"
    impls: tuple[tuple[str, str], ...] = ()      # (op, impl) it ran
    note: str = ""

    def __post_init__(self):
        object.__setattr__(self, "repeat_layer_ms", tuple(self.repeat_layer_ms))
        object.__setattr__(self, "impls", _pairs(self.impls, f"timing {self.label}: impls"))
        _require(isinstance(self.label, str) and self.label, "a timing needs a label")
        _require(len(self.repeat_layer_ms) >= 1 and all(_is_ms(x) and x > 0 for x in self.repeat_layer_ms),
                 f"timing {self.label}: repeat times must be positive finite ms, not {self.repeat_layer_ms!r}")
        _require(_is_int(self.iters) and self.iters >= 1, f"timing {self.label}: iters must be >= 1")
        _require(self.how in HOWS, f"timing {self.label}: how must be one of {HOWS}, not {self.how!r}")

    @property
    def layer_ms(self) -> float:
        return statistics.median(self.repeat_layer_ms)

    @property
    def min_layer_ms(self) -> float:
        return min(self.repeat_layer_ms)

    @property
    def max_layer_ms(self) -> float:
        return max(self.repeat_layer_ms)

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats."""
        return (self.max_layer_ms - self.min_layer_ms) / self.layer_ms

    def to_dict(self) -> dict:
        return {"label": self.label, "layer_ms": self.layer_ms, "min_layer_ms": self.min_layer_ms,
                "max_layer_ms": self.max_layer_ms, "spread": self.spread,
                "repeat_layer_ms": list(self.repeat_layer_ms), "iters": self.iters, "how": self.how,
                "impls": dict(self.impls), "note": self.note}

    @classmethod
    def from_dict(cls, d: dict) -> Timing:
        return cls(d["label"], tuple(d["repeat_layer_ms"]), d["iters"], d["how"], _pairs(d.get("impls", {}), "impls"),
                   d.get("note", ""))


@dataclass(frozen=True)
class OpError:
    layer: int
    op: str
    buffer: str
    rel_error: float


@dataclass(frozen=True)
class Correctness:
    """The plan's output against the sequential torch reference, op by op."""
    passed: bool
    tolerance: float
    max_rel_error: float
    first_divergence: str = ""                  # "L0.ug (ug): 0.031", empty when passed
    per_op: tuple[OpError, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "per_op", tuple(self.per_op))
        _require(isinstance(self.passed, bool), "correctness: passed must be true or false")
        _require(_is_ms(self.tolerance), "correctness: tolerance must be a finite number >= 0")

    def to_dict(self) -> dict:
        return {"passed": self.passed, "tolerance": self.tolerance, "max_rel_error": self.max_rel_error,
                "first_divergence": self.first_divergence,
                "per_op": [{"layer": e.layer, "op": e.op, "buffer": e.buffer, "rel_error": e.rel_error}
                           for e in self.per_op]}

    @classmethod
    def from_dict(cls, d: dict) -> Correctness:
        return cls(d["passed"], d["tolerance"], d["max_rel_error"], d.get("first_divergence", ""),
                   tuple(OpError(e["layer"], e["op"], e["buffer"], e["rel_error"]) for e in d.get("per_op", ())))


@dataclass(frozen=True)
class Bound:
    """The roofline bound of one layer from the measured ceilings (docs/workloads.md)."""
    bound_ms: float
    compute_ms: float
    mem_ms: float
    optimal_tokens_per_s: float

    def to_dict(self) -> dict:
        return {"bound_ms": self.bound_ms, "compute_ms": self.compute_ms, "mem_ms": self.mem_ms,
                "optimal_tokens_per_s": self.optimal_tokens_per_s}

    @classmethod
    def from_dict(cls, d: dict) -> Bound:
        return cls(d["bound_ms"], d["compute_ms"], d["mem_ms"], d["optimal_tokens_per_s"])


def _is_float(x, low: float = 0.0, high: float = MAX_RATE, may_be_low: bool = False) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and (x >= low if may_be_low else x > low) and x <= high)


POWER_CAPPED_SHARE = 0.5        # a run is power-capped when the SW power cap is on in this share of samples


def _reasons(value, where: str) -> tuple[tuple[str, float], ...]:
    items = value.items() if isinstance(value, dict) else value
    out = tuple(sorted((str(k), float(v)) for k, v in items))
    _require(all(0.0 <= v <= 1.0 for _, v in out), f"{where}: reason shares must be in 0..1")
    return out


@dataclass(frozen=True)
class PowerReading:
    """The plan's power in a run, from NVML (nfsearch/runtime/power.py). Two measurements:

    - a SUSTAINED loop of back-to-back replays of the plan's graph right after the timing rounds,
      its window on energy-counter updates: energy per layer (board, static included), GPU time per
      layer in that loop, mean board power, and NVML samples (SM clock, clock-event reasons);
    - the TIMING rounds themselves (the loop `measured_layer_ms` comes from): the energy counter read
      before and after each round (its mean power is coarse: the counter moves every few tens of ms)
      and NVML samples during them.

    `is_power_capped` goes by the timing rounds' samples where there are any (they ran the time that
    is reported), else the sustained loop's."""
    energy_per_layer_j: float
    layer_ms: float
    power_w: float
    power_limit_w: float
    window_s: float
    num_samples: int
    capped_share: float
    sm_clock_mhz: float | None = None               # median of the samples
    min_sm_clock_mhz: float | None = None
    max_sm_clock_mhz: float | None = None           # the device's maximum
    reasons: tuple[tuple[str, float], ...] = ()     # (clock-event reason, share of samples)
    timing_power_w: float | None = None
    timing_num_samples: int = 0
    timing_capped_share: float = 0.0
    timing_sm_clock_mhz: float | None = None
    timing_reasons: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "reasons", _reasons(self.reasons, "power reading"))
        object.__setattr__(self, "timing_reasons", _reasons(self.timing_reasons, "power reading"))
        for key in ("energy_per_layer_j", "layer_ms", "power_w", "power_limit_w", "window_s"):
            _require(_is_float(getattr(self, key)), f"power reading: {key} must be positive, not {getattr(self, key)!r}")
        for key in ("sm_clock_mhz", "min_sm_clock_mhz", "max_sm_clock_mhz", "timing_power_w", "timing_sm_clock_mhz"):
            value = getattr(self, key)
            _require(value is None or _is_float(value), f"power reading: {key} must be positive, not {value!r}")
        for key in ("num_samples", "timing_num_samples"):
            _require(_is_int(getattr(self, key)) and getattr(self, key) >= 0, f"power reading: {key} must be >= 0")
        for key in ("capped_share", "timing_capped_share"):
            _require(_is_float(getattr(self, key), high=1.0, may_be_low=True), f"power reading: {key} must be in 0..1")

    @property
    def is_power_capped(self) -> bool:
        if self.timing_num_samples:
            return self.timing_capped_share >= POWER_CAPPED_SHARE
        return self.num_samples > 0 and self.capped_share >= POWER_CAPPED_SHARE

    def dynamic_energy_j(self, static_power_w: float) -> float:
        """Energy per layer above static power (what the power bound's dynamic energy predicts)."""
        return self.energy_per_layer_j - static_power_w * self.layer_ms / 1e3

    def describe(self) -> str:
        clock = self.timing_sm_clock_mhz or self.sm_clock_mhz
        share = self.timing_capped_share if self.timing_num_samples else self.capped_share
        where = "timing rounds" if self.timing_num_samples else "sustained loop"
        return (f"{'power-capped' if self.is_power_capped else 'not power-capped'} (SW power cap in {share:.0%} of "
                f"the {where}' samples); {self.power_w:.0f} W of {self.power_limit_w:.0f} W, "
                f"SM {clock or float('nan'):.0f} MHz (max {self.max_sm_clock_mhz or float('nan'):.0f}); "
                f"{self.energy_per_layer_j:.3f} J per layer over {self.layer_ms:.3f} ms (sustained loop)")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["reasons"], out["timing_reasons"] = dict(self.reasons), dict(self.timing_reasons)
        out["is_power_capped"] = self.is_power_capped
        return out

    @classmethod
    def from_dict(cls, d: dict) -> PowerReading:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class TimingPower:
    """What NVML saw on one GPU during one variant's timing rounds only (a TP run's baselines): the
    energy counter read around each round (a coarse mean power: the counter moves every few tens of
    ms) and NVML samples in between."""
    power_w: float | None
    num_samples: int
    capped_share: float
    sm_clock_mhz: float | None = None
    reasons: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "reasons", _reasons(self.reasons, "timing power"))
        for key in ("power_w", "sm_clock_mhz"):
            value = getattr(self, key)
            _require(value is None or _is_float(value), f"timing power: {key} must be positive, not {value!r}")
        _require(_is_int(self.num_samples) and self.num_samples >= 0, "timing power: num_samples must be >= 0")
        _require(_is_float(self.capped_share, high=1.0, may_be_low=True), "timing power: capped_share must be in 0..1")

    @property
    def is_power_capped(self) -> bool:
        return self.num_samples > 0 and self.capped_share >= POWER_CAPPED_SHARE

    def describe(self) -> str:
        return (f"{'power-capped' if self.is_power_capped else 'not power-capped'} (SW power cap in "
                f"{self.capped_share:.0%} of {self.num_samples} samples), {self.power_w or float('nan'):.0f} W, "
                f"SM {self.sm_clock_mhz or float('nan'):.0f} MHz")

    def to_dict(self) -> dict:
        return {"power_w": self.power_w, "num_samples": self.num_samples, "capped_share": self.capped_share,
                "sm_clock_mhz": self.sm_clock_mhz, "reasons": dict(self.reasons),
                "is_power_capped": self.is_power_capped}

    @classmethod
    def from_dict(cls, d: dict) -> TimingPower:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class RankPower:
    """One GPU of a tensor-parallel run: the plan's reading (a sustained loop of its graph, in
    lockstep with the other ranks, and its timing rounds), the baselines' timing rounds by label, and
    why a reading is missing."""
    rank: int
    gpu: str
    plan: PowerReading | None = None
    baselines: tuple[tuple[str, TimingPower], ...] = ()
    note: str = ""

    def __post_init__(self):
        object.__setattr__(self, "baselines", tuple(sorted((str(k), v) for k, v in (
            self.baselines.items() if isinstance(self.baselines, dict) else self.baselines))))
        _require(_is_int(self.rank) and self.rank >= 0, f"rank power: rank must be an integer >= 0, not {self.rank!r}")
        _require(isinstance(self.gpu, str) and isinstance(self.note, str), "rank power: gpu and note must be texts")
        _require(self.plan is None or isinstance(self.plan, PowerReading), "rank power: plan must be a power reading")
        _require(all(isinstance(v, TimingPower) for _, v in self.baselines),
                 "rank power: baselines must be timing power readings")

    def to_dict(self) -> dict:
        return {"rank": self.rank, "gpu": self.gpu, "plan": None if self.plan is None else self.plan.to_dict(),
                "baselines": {k: v.to_dict() for k, v in self.baselines}, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict) -> RankPower:
        return cls(d["rank"], d.get("gpu", ""), None if d.get("plan") is None else PowerReading.from_dict(d["plan"]),
                   tuple((k, TimingPower.from_dict(v)) for k, v in d.get("baselines", {}).items()), d.get("note", ""))


@dataclass(frozen=True)
class TpPower:
    """The power side of a tensor-parallel run: every rank's readings, and the profile's power bound of
    one layer on ONE GPU (the shard's ops; every GPU has its own limit, so the bound is per GPU:
    that rank's dynamic energy per layer over its limit minus static power), applied as on one GPU:
    predicted layer time = max(replayed, bound)."""
    ranks: tuple[RankPower, ...]
    power_bound: PowerBound | None = None
    replay_layer_ms: float | None = None
    bound_note: str = ""            # why there is no bound (where there is none)

    def __post_init__(self):
        object.__setattr__(self, "ranks", tuple(self.ranks))
        _require(all(isinstance(r, RankPower) for r in self.ranks), "TP power: ranks must be rank power readings")
        _require([r.rank for r in self.ranks] == sorted({r.rank for r in self.ranks}),
                 "TP power: ranks must be distinct and in order")
        _require(self.replay_layer_ms is None or (_is_ms(self.replay_layer_ms) and self.replay_layer_ms > 0),
                 f"TP power: replay_layer_ms must be positive, not {self.replay_layer_ms!r}")
        _require(isinstance(self.bound_note, str), "TP power: bound_note must be a text")

    @property
    def predicted_layer_ms(self) -> float | None:
        """max(replayed, bound); the replay alone without a bound; None without a replay."""
        if self.replay_layer_ms is None:
            return None
        return self.replay_layer_ms if self.power_bound is None else self.power_bound.layer_ms(self.replay_layer_ms)

    @property
    def is_power_bound(self) -> bool | None:
        if self.power_bound is None or self.replay_layer_ms is None:
            return None
        return self.power_bound.is_binding(self.replay_layer_ms)

    def energy_ratio(self, rank: int) -> float | None:
        """A rank's measured dynamic energy per layer (its sustained loop, above the profile's static
        power) over the bound's (before any energy factor). The bound counts no energy for the
        collectives, the measured loop holds theirs."""
        r = next((x for x in self.ranks if x.rank == rank), None)
        b = self.power_bound
        if r is None or r.plan is None or b is None or b.dynamic_energy_j <= 0:
            return None
        return r.plan.dynamic_energy_j(b.static_power_w) / (b.dynamic_energy_j / b.energy_factor)

    def lines(self) -> list[str]:
        """One line per rank (its plan reading, else why none; its baselines' timing rounds) and one for the bound."""
        out = []
        for r in self.ranks:
            head = f"power rank {r.rank}" + (f" ({r.gpu})" if r.gpu else "")
            if r.plan is not None:
                ratio = self.energy_ratio(r.rank)
                out.append(f"{head}: {r.plan.describe()}"
                           + (f"; measured/predicted dynamic energy {ratio:.3f}" if ratio is not None else ""))
            else:
                out.append(f"{head}: no reading ({r.note or 'not measured'})")
            if r.baselines:
                out.append(f"{'':>{len(head)}}  baselines' timing rounds: "
                           + "; ".join(f"{k} {v.describe()}" for k, v in r.baselines))
        if self.power_bound is not None and self.replay_layer_ms is not None:
            out.append(f"power bound (per GPU): {self.power_bound.describe(self.replay_layer_ms)}")
        elif self.bound_note:
            out.append(f"power bound: {self.bound_note}")
        return out

    def to_dict(self) -> dict:
        return {"ranks": [r.to_dict() for r in self.ranks],
                "power_bound": None if self.power_bound is None else self.power_bound.to_dict(),
                "replay_layer_ms": self.replay_layer_ms, "bound_note": self.bound_note,
                "predicted_layer_ms": self.predicted_layer_ms, "is_power_bound": self.is_power_bound,
                "is_power_capped": [None if r.plan is None else r.plan.is_power_capped for r in self.ranks],
                "energy_ratio": [self.energy_ratio(r.rank) for r in self.ranks]}

    @classmethod
    def from_dict(cls, d: dict, where: str = "TP power") -> TpPower:
        try:
            return cls(tuple(RankPower.from_dict(r) for r in d["ranks"]),
                       None if d.get("power_bound") is None else PowerBound.from_dict(d["power_bound"]),
                       d.get("replay_layer_ms"), d.get("bound_note", ""))
        except NfsearchError as exc:
            raise NfsearchError(f"{where}: {exc}") from None
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise NfsearchError(f"{where}: not a TP power record ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class LaunchSummary:
    num_launches: int
    stream_keys: tuple[str, ...]
    layouts: tuple[str, ...]                    # "32+100", one build each
    waits: tuple[tuple[str, int], ...]          # (kind, count)
    num_capacity_edges: int

    def __post_init__(self):
        object.__setattr__(self, "stream_keys", tuple(self.stream_keys))
        object.__setattr__(self, "layouts", tuple(self.layouts))
        object.__setattr__(self, "waits", tuple((str(k), int(v)) for k, v in
                                                (self.waits.items() if isinstance(self.waits, dict) else self.waits)))

    def to_dict(self) -> dict:
        return {"num_launches": self.num_launches, "stream_keys": list(self.stream_keys),
                "layouts": list(self.layouts), "waits": dict(self.waits),
                "num_capacity_edges": self.num_capacity_edges}

    @classmethod
    def from_dict(cls, d: dict) -> LaunchSummary:
        return cls(d["num_launches"], tuple(d["stream_keys"]), tuple(d["layouts"]), d["waits"],
                   d["num_capacity_edges"])


@dataclass(frozen=True)
class RunReport:
    gpu: str
    num_sms: int
    date: str
    mode: str                                    # "green" | "grid" | "cpu"
    versions: tuple[tuple[str, str], ...]
    model: str
    model_num_layers: int                        # of the whole model (tokens/s)
    workload: str
    num_tokens: int
    num_layers: int                              # executed (the plan's unrolled layers)
    solver: str
    plan_profile: str
    plan_gpu: str
    launches: LaunchSummary
    correctness: Correctness
    plan: Timing | None = None
    baselines: tuple[Timing, ...] = ()
    baseline_failures: tuple[tuple[str, str], ...] = ()   # (label, one line why)
    predicted_layer_ms: float | None = None
    ceilings: Ceilings | None = None
    bound: Bound | None = None
    notes: tuple[str, ...] = ()
    timeline: Timeline | None = None
    command: str = ""
    plan_path: str = ""
    replay_layer_ms: float | None = None        # the plan's replayed layer time, where a power bound was applied
    power_bound: PowerBound | None = None       # predicted: the profile's power bound of one layer
    power: PowerReading | None = None           # measured: the plan's energy, power, clocks (NVML)

    def __post_init__(self):
        object.__setattr__(self, "versions", _pairs(self.versions, "versions"))
        object.__setattr__(self, "baselines", tuple(self.baselines))
        object.__setattr__(self, "baseline_failures", tuple((str(a), str(b)) for a, b in self.baseline_failures))
        object.__setattr__(self, "notes", tuple(str(n) for n in self.notes))
        _require(self.mode in ("green", "grid", "cpu"), f"run report: mode must be green, grid or cpu, not {self.mode!r}")
        for key in ("num_sms", "model_num_layers", "num_tokens", "num_layers"):
            _require(_is_int(getattr(self, key)) and getattr(self, key) >= 1,
                     f"run report: {key} must be a positive integer, not {getattr(self, key)!r}")
        labels = [b.label for b in self.baselines]
        _require(len(set(labels)) == len(labels) and all(b in BASELINES for b in labels),
                 f"run report: baselines must be distinct names of {BASELINES}, not {labels}")
        _require(self.plan is None or self.plan.label == "plan", "run report: the plan's timing must be labelled plan")
        _require(self.predicted_layer_ms is None or (_is_ms(self.predicted_layer_ms) and self.predicted_layer_ms > 0),
                 f"run report: predicted_layer_ms must be positive, not {self.predicted_layer_ms!r}")
        _require(self.replay_layer_ms is None or (_is_ms(self.replay_layer_ms) and self.replay_layer_ms > 0),
                 f"run report: replay_layer_ms must be positive, not {self.replay_layer_ms!r}")

    # ---- derived numbers
    @property
    def measured_layer_ms(self) -> float | None:
        return None if self.plan is None else self.plan.layer_ms

    @property
    def prediction_error(self) -> float | None:
        """(predicted - measured) / measured: negative = the model was optimistic."""
        m = self.measured_layer_ms
        return None if m is None or self.predicted_layer_ms is None else (self.predicted_layer_ms - m) / m

    def baseline(self, label: str) -> Timing | None:
        return next((b for b in self.baselines if b.label == label), None)

    def speedup(self, label: str) -> float | None:
        """Baseline time / plan time (> 1: the plan is faster)."""
        b, m = self.baseline(label), self.measured_layer_ms
        return None if b is None or m is None else b.layer_ms / m

    @property
    def pct_of_bound(self) -> float | None:
        m = self.measured_layer_ms
        return None if m is None or self.bound is None else self.bound.bound_ms / m

    @property
    def tokens_per_s(self) -> float | None:
        m = self.measured_layer_ms
        return None if m is None else self.num_tokens / (m * 1e-3 * self.model_num_layers)

    @property
    def is_power_bound(self) -> bool | None:
        """Whether the prediction is the power bound (None: no bound)."""
        if self.power_bound is None or self.replay_layer_ms is None:
            return None
        return self.power_bound.is_binding(self.replay_layer_ms)

    @property
    def measured_dynamic_energy_j(self) -> float | None:
        """The sustained loop's energy per layer above the profile's static power."""
        if self.power is None or self.power_bound is None:
            return None
        return self.power.dynamic_energy_j(self.power_bound.static_power_w)

    @property
    def energy_ratio(self) -> float | None:
        """Measured over predicted dynamic energy per layer, before any energy factor (what
        `nfsearch calibrate --energy` fits)."""
        m, b = self.measured_dynamic_energy_j, self.power_bound
        if m is None or b.dynamic_energy_j <= 0:
            return None
        return m / (b.dynamic_energy_j / b.energy_factor)

    def power_lines(self) -> list[str]:
        """What the run says about power: the measured reading and the predicted bound (one line each)."""
        out = []
        if self.power is not None:
            out.append(f"power: {self.power.describe()}")
        if self.power_bound is not None and self.replay_layer_ms is not None:
            out.append(f"power bound: {self.power_bound.describe(self.replay_layer_ms)}"
                       + (f"; measured/predicted dynamic energy {self.energy_ratio:.3f}"
                          if self.energy_ratio is not None else ""))
        return out

    # ---- JSON
    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("versions",):
                v = dict(v)
            elif f.name == "baselines":
                v = {b.label: b.to_dict() for b in v}
            elif f.name == "baseline_failures":
                v = dict(v)
            elif f.name == "notes":
                v = list(v)
            elif f.name == "timeline":
                v = None if v is None else timeline_to_dict(v)
            elif hasattr(v, "to_dict"):
                v = v.to_dict()
            out[f.name] = v
        out["derived"] = {
            "measured_layer_ms": self.measured_layer_ms, "prediction_error": self.prediction_error,
            "pct_of_bound": self.pct_of_bound, "tokens_per_s": self.tokens_per_s,
            "is_power_bound": self.is_power_bound,
            "is_power_capped": None if self.power is None else self.power.is_power_capped,
            "measured_dynamic_energy_j": self.measured_dynamic_energy_j, "energy_ratio": self.energy_ratio,
            **{f"speedup_vs_{b.label.replace('-', '_')}": self.speedup(b.label) for b in self.baselines}}
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = "run report") -> RunReport:
        try:
            known = {f.name for f in fields(cls)}
            unknown = set(d) - known - {"derived"}
            _require(not unknown, f"unknown keys {sorted(unknown)}")
            kw = {k: d[k] for k in known if k in d}
            kw["versions"] = _pairs(d["versions"], "versions")
            kw["launches"] = LaunchSummary.from_dict(d["launches"])
            kw["correctness"] = Correctness.from_dict(d["correctness"])
            kw["plan"] = None if d.get("plan") is None else Timing.from_dict(d["plan"])
            kw["baselines"] = tuple(Timing.from_dict(b) for b in d.get("baselines", {}).values())
            kw["baseline_failures"] = tuple(d.get("baseline_failures", {}).items())
            kw["ceilings"] = None if d.get("ceilings") is None else Ceilings.from_dict(d["ceilings"])
            kw["bound"] = None if d.get("bound") is None else Bound.from_dict(d["bound"])
            kw["notes"] = tuple(d.get("notes", ()))
            kw["timeline"] = None if d.get("timeline") is None else timeline_from_dict(d["timeline"], where)
            kw["power_bound"] = None if d.get("power_bound") is None else PowerBound.from_dict(d["power_bound"])
            kw["power"] = None if d.get("power") is None else PowerReading.from_dict(d["power"])
            return cls(**kw)
        except NfsearchError as exc:
            raise NfsearchError(f"{where}: {exc}") from None
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise NfsearchError(f"{where}: not a run report ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------------------------- table
def format_table(reports) -> str:
    """One line per run: plan, baselines (median, spread), speedups, bound. `reports` are RunReports
    or dicts (a dict with "error" is a failed run; others are RunReport.to_dict output)."""
    head = (f"{'workload':<15}{'mode':<6}{'plan ms':>9}{'+-%':>5}{'pred':>7}{'err':>6}{'bound':>7}{'%bnd':>5}"
            f"{'seq-torch':>10}{'x':>6}{'seq-same':>9}{'x':>6}{'compiled':>9}{'x':>6}")
    lines = [head]
    for r in reports:
        if isinstance(r, dict):
            if "error" in r:
                lines.append(f"{r.get('workload', '?'):<15}FAILED: {str(r['error'])[:100]}")
                continue
            r = RunReport.from_dict(r)
        if r.plan is None:
            lines.append(f"{r.workload:<15}{r.mode:<6} not timed (correct: {r.correctness.passed})")
            continue

        def cell(label, width):
            b = r.baseline(label)
            if b is None:
                fail = dict(r.baseline_failures).get(label)
                return f"{'fail' if fail else '-':>{width}}{'':>6}"
            return f"{b.layer_ms:>{width}.3f}{r.speedup(label):>6.2f}"

        pe, pb = r.prediction_error, r.pct_of_bound
        lines.append(
            f"{r.workload:<15}{r.mode:<6}{r.plan.layer_ms:>9.3f}{r.plan.spread * 100:>5.1f}"
            f"{(r.predicted_layer_ms or float('nan')):>7.3f}"
            f"{(pe * 100 if pe is not None else float('nan')):>5.0f}%"
            f"{(r.bound.bound_ms if r.bound else float('nan')):>7.3f}"
            f"{(pb * 100 if pb is not None else float('nan')):>4.0f}%"
            f"{cell('seq-torch', 10)}{cell('seq-same', 9)}{cell('seq-compiled', 9)}")
        lines += [f"{'':<15}{line}" for line in r.power_lines()]
    return "\n".join(lines)
