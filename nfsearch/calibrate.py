"""Fold measured plan timelines back into a profile: `nfsearch calibrate`.

What it corrects: the co-run STRETCH. The pair table says how much two kernels slow each other on
the two sides of a split, measured pair by pair; a whole plan co-runs nano-ops of many shapes,
several at once, with cross-stream waits in between, and measured W1-W3 runs show the model
optimistic there. A solo nano-op's error is the profile's (its own solo rows), so it is not
folded into the stretch.

How: each (plan, measured timeline) pair is replayed under the profile's UNCALIBRATED cost model
(so calibrating twice from the same runs gives the same factors). A nano-op whose replayed span
shares at least half its time with a nano-op of another stream is CO-RUN; one that shares none is
SOLO; those in between are left out (their time mixes the two). Per op class (of the stretched
op):

    factor = median(measured / predicted over its co-run spans) / median(the same over solo spans)

the solo median of the class, else of all classes, else 1 (so a profile that is slow or fast
everywhere does not pass for interference). A class needs MIN_SPANS co-run spans to get a factor;
factors are clamped to FACTOR_RANGE (a larger one is a broken run, not interference).

Where it goes: the profile's metadata, key "calibration" (`Calibration.to_dict`). The cost model
applies it only when present: a nano-op with partners runs solo x stretch x factor(class) (never
below solo), and the plan's interference label names the calibration. Torch-free.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from nfsearch.errors import NfsearchError
from nfsearch.timeline import Timeline

CALIBRATION_KEY = "calibration"
MIN_SPANS = 2
FACTOR_RANGE = (0.5, 3.0)
CORUN_SHARE = 0.5          # share of a span's time beside another stream's span that makes it co-run
OP_CLASSES = ("compute", "memory", "network", "other")


@dataclass(frozen=True)
class ClassFactor:
    op_class: str
    factor: float
    num_corun_spans: int
    num_solo_spans: int
    corun_ratio: float          # median measured / predicted over co-run spans
    solo_ratio: float           # the solo median it was divided by

    def __post_init__(self):
        if self.op_class not in OP_CLASSES:
            raise NfsearchError(f"calibration: unknown op class {self.op_class!r}")
        lo, hi = FACTOR_RANGE
        for key in ("factor", "corun_ratio", "solo_ratio"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise NfsearchError(f"calibration: {self.op_class} {key} must be a positive number, not {value!r}")
        if not lo <= self.factor <= hi:
            raise NfsearchError(f"calibration: {self.op_class} factor {self.factor:g} outside {lo:g}..{hi:g}")
        for key in ("num_corun_spans", "num_solo_spans"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise NfsearchError(f"calibration: {self.op_class} {key} must be an integer >= 0, not {value!r}")


@dataclass(frozen=True)
class Calibration:
    """Per-op-class correction factors of the co-run stretch, and what they were fitted on."""
    factors: tuple[ClassFactor, ...]
    sources: tuple[str, ...]            # one line per measured run folded in

    def __post_init__(self):
        object.__setattr__(self, "factors", tuple(self.factors))
        object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
        classes = [f.op_class for f in self.factors]
        if len(set(classes)) != len(classes):
            raise NfsearchError("calibration: an op class appears twice")
        if not self.sources:
            raise NfsearchError("calibration: no measured run named")

    def factor(self, op_class: str) -> float:
        """The factor of a class (1 where the runs had too few co-run spans of it)."""
        return next((f.factor for f in self.factors if f.op_class == op_class), 1.0)

    @property
    def label(self) -> str:
        shown = ", ".join(f"{f.op_class} x{f.factor:.3f}" for f in self.factors) or "no class with enough spans"
        return f"calibrated co-run stretch ({shown}; from {len(self.sources)} measured plan run(s))"

    def to_dict(self) -> dict:
        return {"factors": [{"op_class": f.op_class, "factor": f.factor, "num_corun_spans": f.num_corun_spans,
                             "num_solo_spans": f.num_solo_spans, "corun_ratio": f.corun_ratio,
                             "solo_ratio": f.solo_ratio} for f in self.factors],
                "sources": list(self.sources)}

    @classmethod
    def from_dict(cls, d, where: str = "calibration") -> Calibration:
        try:
            return cls(tuple(ClassFactor(**f) for f in d["factors"]), tuple(d["sources"]))
        except NfsearchError as exc:
            raise NfsearchError(f"{where}: {exc}") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise NfsearchError(f"{where}: not a calibration ({type(exc).__name__}: {exc})") from None


def calibration_from_meta(meta: dict) -> Calibration | None:
    """The profile's calibration, or None where it has none."""
    entry = meta.get(CALIBRATION_KEY) if isinstance(meta, dict) else None
    return None if entry is None else Calibration.from_dict(entry, "profile calibration")


def without_calibration(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != CALIBRATION_KEY}


# ------------------------------------------------------------------------------------ fitting
@dataclass(frozen=True)
class SpanRatio:
    id: str
    op_class: str
    is_corun: bool
    predicted_ms: float
    measured_ms: float

    @property
    def ratio(self) -> float:
        return self.measured_ms / self.predicted_ms


def corun_shares(timeline: Timeline) -> dict[str, float]:
    """Per span id: the share of its time during which a span of another stream runs."""
    spans = sorted(timeline.spans, key=lambda s: s.start_ms)
    out = {}
    for s in spans:
        if s.duration_ms <= 0:
            out[s.id] = 0.0
            continue
        cuts = sorted((max(s.start_ms, o.start_ms), min(s.end_ms, o.end_ms)) for o in spans
                      if o.stream != s.stream and o.start_ms < s.end_ms and o.end_ms > s.start_ms)
        covered, reach = 0.0, s.start_ms
        for lo, hi in cuts:            # union of the overlaps
            lo = max(lo, reach)
            if hi > lo:
                covered += hi - lo
                reach = hi
        out[s.id] = covered / s.duration_ms
    return out


def span_ratios(predicted: Timeline, measured: Timeline) -> list[SpanRatio]:
    """Matched spans (by id) of a replayed prediction and a measured run, co-run or solo by the
    prediction's overlaps; partly overlapped spans are left out."""
    got = measured.by_id()
    missing = [s.id for s in predicted.spans if s.id not in got]
    if missing:
        raise NfsearchError(f"measured timeline '{measured.label}' lacks {len(missing)} nano-ops of the plan "
                            f"(first {missing[0]}): is it a run of this plan?")
    shares = corun_shares(predicted)
    out = []
    for s in predicted.spans:
        share, m = shares[s.id], got[s.id]
        if s.duration_ms <= 0 or m.duration_ms <= 0 or 0.0 < share < CORUN_SHARE:
            continue
        out.append(SpanRatio(s.id, s.op_class, share >= CORUN_SHARE, s.duration_ms, m.duration_ms))
    return out


def fit(ratios: list[SpanRatio], sources: list[str]) -> Calibration:
    """Per-class factors (module doc) from the span ratios of every run."""
    solo_all = [r.ratio for r in ratios if not r.is_corun]
    factors = []
    for cls in OP_CLASSES:
        corun = [r.ratio for r in ratios if r.is_corun and r.op_class == cls]
        if len(corun) < MIN_SPANS:
            continue
        solo = [r.ratio for r in ratios if not r.is_corun and r.op_class == cls]
        base = statistics.median(solo) if solo else (statistics.median(solo_all) if solo_all else 1.0)
        raw = statistics.median(corun) / base
        factors.append(ClassFactor(cls, min(max(raw, FACTOR_RANGE[0]), FACTOR_RANGE[1]), len(corun), len(solo),
                                   statistics.median(corun), base))
    return Calibration(tuple(factors), tuple(sources))


def calibrate(profile, runs) -> tuple[object, Calibration, list[SpanRatio]]:
    """Fit a calibration of `profile` (a ProfileTable) from `runs`: (Schedule, measured Timeline,
    source line) triples. Returns (the profile with the calibration in its metadata, the
    calibration, the span ratios it was fitted on). The plans must have been made with this
    profile's measurements (same fingerprint); each is replayed under its uncalibrated model."""
    from nfsearch.cost import make_problem
    from nfsearch.profile import ProfileMiss, ProfileTable
    from nfsearch.simulate import replay, verify

    if not runs:
        raise NfsearchError("calibrate needs at least one measured plan run")
    raw = ProfileTable(profile.rows, without_calibration(profile.meta))
    ratios, sources = [], []
    for schedule, measured, source in runs:
        if schedule.profile.fingerprint != raw.fingerprint():
            raise NfsearchError(f"{source}: plan was made with profile {schedule.profile.fingerprint} "
                                f"({schedule.profile.label}), not {raw.fingerprint()} ({raw.label})")
        if measured.num_layers != schedule.num_layers:
            raise NfsearchError(f"{source}: measured timeline has {measured.num_layers} layers, the plan "
                                f"{schedule.num_layers}")
        verify(schedule)
        try:
            problem = make_problem(schedule.model, schedule.workload, raw, schedule.num_layers)
            predicted = replay(schedule, problem.cost).timeline
        except ProfileMiss as miss:
            raise NfsearchError(f"{source}: the profile cannot time the plan ({miss})") from None
        ratios += span_ratios(predicted, measured)
        sources.append(f"{source}: {schedule.model.name} {schedule.workload.name}, {measured.label}")
    cal = fit(ratios, sources)
    meta = dict(raw.meta)
    meta[CALIBRATION_KEY] = cal.to_dict()
    return ProfileTable(raw.rows, meta), cal, ratios


def format_report(cal: Calibration, ratios: list[SpanRatio]) -> str:
    lines = [f"{'class':<9}{'co-run':>7}{'solo':>6}{'co-run m/p':>12}{'solo m/p':>10}{'factor':>8}"]
    for f in cal.factors:
        lines.append(f"{f.op_class:<9}{f.num_corun_spans:>7}{f.num_solo_spans:>6}{f.corun_ratio:>12.3f}"
                     f"{f.solo_ratio:>10.3f}{f.factor:>8.3f}")
    left = sorted({r.op_class for r in ratios if r.is_corun} - {f.op_class for f in cal.factors})
    if left:
        lines.append(f"no factor (fewer than {MIN_SPANS} co-run spans): {', '.join(left)}")
    lines.append(f"{len(ratios)} spans used ({sum(r.is_corun for r in ratios)} co-run, "
                 f"{sum(not r.is_corun for r in ratios)} solo); m/p = median measured / predicted")
    return "\n".join(lines)
