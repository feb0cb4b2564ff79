"""Fold measured plan timelines back into a profile: `nfsearch calibrate`.

What it corrects, per op class, and the overheads between kernels:
- the SOLO factor: what a nano-op alone takes inside a replayed plan against what the profiler
  timed it at. The profiler times each kernel between events with its launch gap; a kernel trace
  of a graph replay times the kernel alone, and tiny kernels (norms, RoPE) run at about half their
  profiled time there (on an H100). Applied to every time of the class.
- the CO-RUN factor: the co-run stretch beyond the pair table's. The pair table says how two kernels
  slow each other, measured pair by pair in short bursts; a whole plan co-runs nano-ops of many
  shapes, several at once, for milliseconds.
- the OVERHEADS: a launch waiting on another stream's event starts `event_wait_us` after that op
  ends; one following the previous launch of its stream, `launch_gap_us` after it. Medians over
  every launch whose latest-ending predecessor is of that kind (model-free: read off the measured
  timeline and the plan's dependencies).

How: the overheads first; then each (plan, measured timeline) is replayed under the profile with
those overheads and no factors (so calibrating twice from the same runs gives the same result).
A nano-op whose replayed span shares at least half its time with a nano-op of another stream is
CO-RUN; one that shares none is SOLO; those in between are left out (their time mixes the two):

    solo factor = median(measured / predicted over its solo spans)                 (SOLO_RANGE)
    factor      = median(measured / predicted over its co-run spans) / the solo median  (FACTOR_RANGE)

the solo median of the class, else of all classes, else 1. A class needs MIN_SPANS spans of a kind
to get that factor (else 1).

Where it goes: the profile's metadata, key "calibration" (`Calibration.to_dict`); `transfer` carries
it to another model's profile measured on the same GPU (`calibrate --from`). The cost model applies
it only when present, and the plan's interference label names it. Torch-free.

The ENERGY factor (`calibrate_energy`, `--energy PLAN RUN_JSON`): per run report of `nfsearch run`
with a power reading (runreport.PowerReading, the sustained loop of the plan's graph), the measured
dynamic energy per layer (energy per layer - the profile's static power x the loop's time per layer)
over the profile's predicted dynamic energy of that plan's layer (simulate.power_bound_for: with pair
energy points its overlaps priced too; no factor); the
factor is their median over the power-capped runs, else over all (energy.fit_energy). The op
energies were measured at whatever clock each op's own loop ran at; a plan at the power cap runs
at a lower clock and voltage, where each op costs less energy, so the factor is below 1 there.
Stored under "energy_calibration", apart from the timeline calibration: either may be refitted
without the other.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from nfsearch.calibration import (CALIBRATION_KEY, FACTOR_RANGE, MAX_OVERHEAD_US, SOLO_RANGE, Calibration, ClassFactor,
                                  calibration_from_meta, without_calibration)
from nfsearch.cost import make_problem, overheads_from_meta
from nfsearch.energy import (ENERGY_CALIBRATION_KEY, EnergyCalibration, EnergyRun, energy_calibration_from_meta,
                             fit_energy)
from nfsearch.errors import NfsearchError
from nfsearch.graph import OP_CLASSES
from nfsearch.pair_model import OP_ALIASES
from nfsearch.profile import ProfileMiss, ProfileTable
from nfsearch.runreport import RunReport, TpPower
from nfsearch.runtime.launch import build  # pure Python: the executor's launch list
from nfsearch.simulate import power_bound_for, replay, verify
from nfsearch.timeline import Timeline

MIN_SPANS = 2
CORUN_SHARE = 0.5          # share of a span's time beside another stream's span that makes it co-run
MIN_OVERHEADS = 5          # waits (or gaps) needed to fit one; else 0 (gap) or the profile's (wait)


# ------------------------------------------------------------------------------------ fitting
@dataclass(frozen=True)
class SpanRatio:
    id: str
    op: str                     # the kernel's op (norm2 counts as norm1: one RMSNorm kernel)
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
        out.append(SpanRatio(s.id, OP_ALIASES.get(s.op, s.op), s.op_class, share >= CORUN_SHARE, s.duration_ms,
                             m.duration_ms))
    return out


@dataclass(frozen=True)
class OverheadSamples:
    waits_us: tuple[float, ...]
    gaps_us: tuple[float, ...]


def overhead_samples(schedule, measured: Timeline) -> OverheadSamples:
    """For every launch the executor issues with a predecessor (the previous launch of its CUDA
    stream, and the launches whose events it waits on; runtime.launch builds the same list the
    executor ran): its measured start minus the end of the predecessor that ended last; a GAP if
    that one is of its own stream, else a WAIT. Values outside 0..MAX_OVERHEAD_US are left out."""
    got = measured.by_id()
    previous: dict[str, str] = {}
    waits, gaps = [], []
    for launch in build(schedule).launches:
        preds = [(d, False) for d in launch.waits]
        if launch.key in previous:
            preds.append((previous[launch.key], True))
        previous[launch.key] = launch.id
        if not preds or launch.id not in got or any(d not in got for d, _ in preds):
            continue
        last, is_own_stream = max(preds, key=lambda p: got[p[0]].end_ms)
        value = (got[launch.id].start_ms - got[last].end_ms) * 1e3
        if -1.0 <= value <= MAX_OVERHEAD_US:          # a little below 0: the trace's clock
            (gaps if is_own_stream else waits).append(max(value, 0.0))
    return OverheadSamples(tuple(waits), tuple(gaps))


@dataclass(frozen=True)
class NoClassData:
    """The parent of a class with too few spans of a kind: no correction (co-run and solo factors 1).
    A co-run factor fitted without the class's own solo spans divides its co-run median by
    solo_ratio, every class's solo median (1 without solo spans)."""
    solo_ratio: float
    factor: float = 1.0
    corun_ratio: float = 1.0
    solo_factor: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.solo_ratio) and self.solo_ratio > 0):
            raise NfsearchError(f"calibration: solo_ratio must be a positive number, not {self.solo_ratio!r}")


def fit(ratios: list[SpanRatio], sources: list[str], samples: list[OverheadSamples], default_wait_us: float,
        gpu_name: str = "") -> Calibration:
    """Per-class factors, per-op factors where an op has spans of its own (a kind it has too few
    of takes its class's), and the overheads (module doc), from every run's ratios and samples."""
    solo_all = [r.ratio for r in ratios if not r.is_corun]
    no_class_data = NoClassData(statistics.median(solo_all) if solo_all else 1.0)
    factors = []
    for cls in OP_CLASSES:
        mine = [r for r in ratios if r.op_class == cls]
        of_class = _factor(cls, "", mine, no_class_data)
        if of_class is not None:
            factors.append(of_class)
        for op in sorted({r.op for r in mine}):
            of_op = _factor(cls, op, [r for r in mine if r.op == op], of_class or no_class_data)
            if of_op is not None:
                factors.append(of_op)
    waits = [w for s in samples for w in s.waits_us]
    gaps = [g for s in samples for g in s.gaps_us]
    wait_us = statistics.median(waits) if len(waits) >= MIN_OVERHEADS else default_wait_us
    gap_us = statistics.median(gaps) if len(gaps) >= MIN_OVERHEADS else 0.0
    return Calibration(tuple(factors), tuple(sources), round(wait_us, 3), round(gap_us, 3), len(waits), len(gaps),
                       gpu_name)


def _factor(op_class: str, op: str, ratios: list[SpanRatio],
            parent: ClassFactor | NoClassData) -> ClassFactor | None:
    """The factors of one class (op "") or op from its spans; a kind with fewer than MIN_SPANS spans
    takes `parent`'s (an op's class's, or NoClassData). None with too few of both."""
    corun = [r.ratio for r in ratios if r.is_corun]
    solo = [r.ratio for r in ratios if not r.is_corun]
    if len(corun) < MIN_SPANS and len(solo) < MIN_SPANS:
        return None
    base = statistics.median(solo) if len(solo) >= MIN_SPANS else parent.solo_ratio
    solo_factor = min(max(base, SOLO_RANGE[0]), SOLO_RANGE[1]) if len(solo) >= MIN_SPANS else parent.solo_factor
    if len(corun) >= MIN_SPANS:
        corun_ratio = statistics.median(corun)
        factor = min(max(corun_ratio / base, FACTOR_RANGE[0]), FACTOR_RANGE[1])
    else:
        corun_ratio, factor = parent.corun_ratio, parent.factor
    return ClassFactor(op_class, factor, len(corun), len(solo), corun_ratio, base, solo_factor, op)


def calibrate(profile, runs) -> tuple[object, Calibration, list[SpanRatio]]:
    """Fit a calibration of `profile` (a ProfileTable) from `runs`: (Schedule, measured Timeline,
    source line) triples. Returns (the profile with the calibration in its metadata, the
    calibration, the span ratios it was fitted on). The plans must have been made with this
    profile's measurements (same fingerprint); each is replayed under the fitted overheads and no
    factors."""
    if not runs:
        raise NfsearchError("calibrate needs at least one measured plan run")
    raw = ProfileTable(profile.rows, without_calibration(profile.meta))
    samples, sources = [], []
    for schedule, measured, source in runs:
        if schedule.profile.fingerprint != raw.fingerprint():
            raise NfsearchError(f"{source}: plan was made with profile {schedule.profile.fingerprint} "
                                f"({schedule.profile.label}), not {raw.fingerprint()} ({raw.label})")
        if measured.num_layers != schedule.num_layers:
            raise NfsearchError(f"{source}: measured timeline has {measured.num_layers} layers, the plan "
                                f"{schedule.num_layers}")
        verify(schedule)
        samples.append(overhead_samples(schedule, measured))
        sources.append(f"{source}: {schedule.model.name} {schedule.workload.name}, {measured.label}")
    gpu_name = str(raw.meta.get("gpu_name", ""))
    default_wait_us = overheads_from_meta(raw.meta).event_wait_ms * 1e3
    overheads_only = fit([], sources, samples, default_wait_us, gpu_name)
    timed = ProfileTable(raw.rows, {**raw.meta, CALIBRATION_KEY: overheads_only.to_dict()})
    ratios = []
    for schedule, measured, source in runs:
        try:
            problem = make_problem(schedule.model, schedule.workload, timed, schedule.num_layers)
            predicted = replay(schedule, problem.cost).timeline
        except ProfileMiss as miss:
            raise NfsearchError(f"{source}: the profile cannot time the plan ({miss})") from None
        ratios += span_ratios(predicted, measured)
    cal = fit(ratios, sources, samples, default_wait_us, gpu_name)
    meta = dict(raw.meta)
    meta[CALIBRATION_KEY] = cal.to_dict()
    return ProfileTable(raw.rows, meta), cal, ratios


@dataclass(frozen=True)
class EnergyEvidence:
    """What an energy fit reads of one GPU's run: which plan it ran and that GPU's power reading."""
    model: str
    workload: str
    gpu: str
    power: object | None          # runreport.PowerReading: the plan's sustained loop


def energy_evidence(run: dict, where: str) -> list[tuple[EnergyEvidence, str]]:
    """The energy evidence in a run.json of `nfsearch run`: one GPU's, or under TP every rank's (each GPU
    has its own limit and the bound is per GPU, so each rank is one measurement of the same bound)."""
    if run.get("tp_degree", 1) > 1:
        if run.get("power") is None:
            raise NfsearchError(f"{where}: the TP run report has no power reading (NVML was not available in that run)")
        tp_power = TpPower.from_dict(run["power"], where)
        return [(EnergyEvidence(run.get("model", ""), run.get("workload", ""), r.gpu, r.plan), f"{where} rank {r.rank}")
                for r in tp_power.ranks]
    report = RunReport.from_dict(run, where)
    return [(EnergyEvidence(report.model, report.workload, report.gpu, report.power), where)]


def calibrate_energy(profile, runs) -> tuple[object, EnergyCalibration]:
    """Fit the energy factor of `profile` (a ProfileTable with energy) from `runs`: (Schedule,
    EnergyEvidence, source line) triples, each of `nfsearch run` on that plan with a power reading
    (module doc; `energy_evidence` reads them from a run.json, one per GPU).
    Returns the profile with the factor in its metadata (the rest kept) and the fit."""
    if not runs:
        raise NfsearchError("an energy calibration needs at least one run report")
    if profile.energy is None:
        raise NfsearchError(f"{profile.label} has no energy to calibrate (nfsearch profile --energy-only adds it)")
    raw = ProfileTable(profile.rows, {k: v for k, v in profile.meta.items() if k != ENERGY_CALIBRATION_KEY})
    static_w = raw.energy.static_power_w
    fitted = []
    for schedule, report, source in runs:
        if report.power is None:
            raise NfsearchError(f"{source}: the run report has no power reading (NVML was not available in that run)")
        if (report.model, report.workload) != (schedule.model.name, schedule.workload.name):
            raise NfsearchError(f"{source}: the run report is of {report.model} {report.workload}, the plan of "
                                f"{schedule.model.name} {schedule.workload.name}")
        if report.gpu != raw.meta["gpu_name"]:
            raise NfsearchError(f"{source}: the run was on {report.gpu}, the profile is of {raw.meta['gpu_name']}")
        bound, why = power_bound_for(schedule, raw)
        if bound is None:
            raise NfsearchError(f"{source}: {why}")
        measured = report.power.dynamic_energy_j(static_w)
        if not measured > 0:
            raise NfsearchError(f"{source}: the run's energy per layer ({report.power.energy_per_layer_j:.4g} J over "
                                f"{report.power.layer_ms:.4g} ms) is not above the profile's static power {static_w:.0f} W")
        fitted.append(EnergyRun(source, measured, bound.dynamic_energy_j, report.power.is_power_capped))
    ecal = fit_energy(fitted)
    meta = dict(raw.meta)
    meta[ENERGY_CALIBRATION_KEY] = ecal.to_dict()
    return ProfileTable(raw.rows, meta), ecal


def format_energy_report(ecal: EnergyCalibration) -> str:
    lines = [f"{'energy run':<60}{'capped':>7}{'meas. J':>9}{'pred. J':>9}{'m/p':>7}"]
    for r in ecal.runs:
        lines.append(f"{r.source[-60:]:<60}{'yes' if r.is_power_capped else 'no':>7}{r.measured_j:>9.4f}"
                     f"{r.predicted_j:>9.4f}{r.ratio:>7.3f}")
    lines.append(ecal.label)
    return "\n".join(lines)


def transfer(profile, calibrated) -> tuple[object, Calibration | EnergyCalibration]:
    """`profile` with the calibration of `calibrated` (another model's profile, measured on the same
    GPU with the same SM count): the factors are of kernels and of the GPU, not of one model. Its
    energy factor goes along where it has one (of the GPU's clocks and voltage under the cap); the
    energy points themselves are of the model and stay. Returns the timeline calibration carried (the
    energy one where there is only that)."""
    cal = calibration_from_meta(calibrated.meta)
    ecal = energy_calibration_from_meta(calibrated.meta)
    if cal is None and ecal is None:
        raise NfsearchError(f"{calibrated.label}: has no calibration to carry (run nfsearch calibrate on it first)")
    for key in ("gpu_name", "num_sms"):
        if profile.meta.get(key) != calibrated.meta.get(key):
            raise NfsearchError(f"calibration is of {key} {calibrated.meta.get(key)!r}, the profile's is "
                                f"{profile.meta.get(key)!r}: calibrate from runs on this GPU instead")
    meta = dict(profile.meta)
    if cal is not None:
        meta[CALIBRATION_KEY] = cal.to_dict()
    if ecal is not None:
        meta[ENERGY_CALIBRATION_KEY] = ecal.to_dict()
    return ProfileTable(profile.rows, meta), cal or ecal


def format_report(cal: Calibration, ratios: list[SpanRatio]) -> str:
    lines = [f"{'class / op':<13}{'co-run':>7}{'solo':>6}{'co-run m/p':>12}{'solo m/p':>10}{'solo x':>8}{'co-run x':>10}"]
    for f in cal.factors:
        lines.append(f"{f.op or f.op_class:<13}{f.num_corun_spans:>7}{f.num_solo_spans:>6}{f.corun_ratio:>12.3f}"
                     f"{f.solo_ratio:>10.3f}{f.solo_factor:>8.3f}{f.factor:>10.3f}")
    left = sorted({r.op_class for r in ratios} - {f.op_class for f in cal.factors})
    if left:
        lines.append(f"no factor (fewer than {MIN_SPANS} spans): {', '.join(left)}")
    lines.append(f"cross-stream wait {cal.event_wait_us:.2f} us (median of {cal.num_waits}), launch gap "
                 f"{cal.launch_gap_us:.2f} us (median of {cal.num_gaps})")
    lines.append(f"{len(ratios)} spans used ({sum(r.is_corun for r in ratios)} co-run, "
                 f"{sum(not r.is_corun for r in ratios)} solo); m/p = median measured / predicted")
    return "\n".join(lines)
