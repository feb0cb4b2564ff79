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

import statistics
from dataclasses import dataclass

from nfsearch.calibration import CALIBRATION_KEY, FACTOR_RANGE, Calibration, ClassFactor, without_calibration
from nfsearch.cost import make_problem
from nfsearch.errors import NfsearchError
from nfsearch.graph import OP_CLASSES
from nfsearch.profile import ProfileMiss, ProfileTable
from nfsearch.simulate import replay, verify
from nfsearch.timeline import Timeline

MIN_SPANS = 2
CORUN_SHARE = 0.5          # share of a span's time beside another stream's span that makes it co-run


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
