"""Measured energy per engine bucket: when the GPU ran which bucket, against the board's energy
counter sampled on a thread, split by a non-negative least-squares fit of one mean power per bucket.
Torch-free (numpy), so it runs in CPU tests on made-up schedules.

Timeline. An IterationRecord has launch_s (host clock from the run's start, read just after the launch
call returned) and time_ms (CUDA events around the replay). Launches are asynchronous and run in order
on one stream, so the GPU runs iteration k from start_k = max(launch_k, end_{k-1}) to end_k = start_k +
time_ms_k: back to back while the host is ahead, from its launch where the GPU had gone idle. Errors:
where the GPU was idle, start_k is late by the graph replay call (launch_s is read after it returns:
tens of microseconds); and the copies between two iterations' events (sampled ids back, the next
batch's inputs in: microseconds each) are not counted, so a back-to-back stretch drifts early by that
much per iteration. The drift is bounded: the loop launches k+2 only after reading k, so once it exceeds
one iteration's time the next launch lands after the reconstructed end and re-anchors the timeline.

Windows. The counter (nvmlDeviceGetTotalEnergyConsumption, mJ since the driver loaded, Volta and newer)
is documented without an update period; other tools document 20-100 ms on recent GPUs (about 10 ms seen
on older ones), and on the A100 and H100 the power sensor behind it is reported to see about a quarter of
the time (Yang et al., SC24: 25 ms of each 100 ms), so the energy of a window only a few sensor periods
long depends on what the sensor happened to see. So each window starts and ends at samples where the
counter has just moved and lasts at least MIN_WINDOW_S (several updates and sensor periods; the windows'
energies add up to the run's exactly). A reading is the energy up to the counter's last update, some
lag before the sample: within one sampling period whatever the update period (faster: the lag is below
it; slower: the update fell between this sample and the one before). That lag is fitted with the
powers: the fit is made at LAG_STEPS + 1 lags over [0, one sampling period] (one for all edges) and
the one with the smallest residual kept. Misplaced edges are what dominates the residual otherwise: 25
ms of a 0.25 s window is 10% of it, wrong wherever the bucket mix changes across the edge. Longer windows
would not separate buckets better: every window mixes buckets at the iteration scale, and buckets are
told apart by how the mix drifts over seconds (ramp-up, steady state, drain). Without a counter,
nvmlDeviceGetPowerUsage is used: on Ampere (not GA100) and newer it is the mean of the last second
(POWER_AVERAGE_S), so a reading at t is taken as its power x 1 s over the second before t - lag (the lag
fitted the same way), one reading per MIN_WINDOW_S (the windows overlap).

Fit: runtime.bucket_energy_fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nfsearch.runtime.bucket_energy_fit import Fit, by_column, fit_at
from nfsearch.runtime.bucket_energy_report import BucketEnergy, BucketEnergyReport, Pooled
from nfsearch.runtime.power import SW_POWER_CAP

MIN_WINDOW_S = 0.25
POWER_AVERAGE_S = 1.0      # nvmlDeviceGetPowerUsage's averaging window on Ampere (not GA100) and newer
LAG_STEPS = 8              # the counter's lag is fitted over [0, sampling period] in this many steps
MIN_LAG_SPAN_S = 0.02      # the lag grid spans at least this (samples closer than a counter update)
MIN_FRACTION = 0.01        # buckets listed: at least this share of the run's iterations
IDLE = "idle"
COUNTER = "energy counter"
POWER_ONLY = "power readings (1 s means, no energy counter)"


@dataclass(frozen=True)
class EnergyWindow:
    start_s: float             # run clock
    end_s: float
    energy_j: float


def gpu_intervals(launch_s, time_ms) -> list[tuple[float, float]]:
    """(start, end) of each iteration on the GPU, run clock, in launch order (module doc)."""
    out, end = [], -math.inf
    for t, ms in zip(launch_s, time_ms):
        start = max(t, end)
        end = start + ms / 1e3
        out.append((start, end))
    return out


def counter_windows(times_s, energy_mj, start_s: float, end_s: float, min_window_s: float = MIN_WINDOW_S,
                    lag_s: float = 0.0) -> list[EnergyWindow]:
    """Windows of at least min_window_s between counter moves inside [start_s, end_s], each edge lag_s
    before the sample that saw the move (module doc). times_s: run clock, sorted; energy_mj: the counter
    per sample (None: a lost read)."""
    edges, prev = [], None
    for t, e in zip(times_s, energy_mj):
        if e is None:
            continue
        if prev is not None and e != prev and start_s <= t - lag_s <= end_s:
            edges.append((t - lag_s, e))
        prev = e
    windows, first = [], None
    for edge in edges:
        if first is None:
            first = edge
        elif edge[0] - first[0] >= min_window_s:
            if edge[1] > first[1]:              # a counter that went back (driver reload) gives no window
                windows.append(EnergyWindow(first[0], edge[0], (edge[1] - first[1]) / 1e3))
            first = edge
    return windows


def power_windows(times_s, power_w, start_s: float, end_s: float, average_s: float = POWER_AVERAGE_S,
                  min_window_s: float = MIN_WINDOW_S, lag_s: float = 0.0) -> list[EnergyWindow]:
    """One window of power x average_s per reading, ending lag_s before it; readings min_window_s apart."""
    out, last = [], -math.inf
    for t, p in zip(times_s, power_w):
        end = t - lag_s
        if p is not None and end - average_s >= start_s and end <= end_s and t - last >= min_window_s:
            out.append(EnergyWindow(end - average_s, end, p * average_s))
            last = t
    return out


def best_fit(times_s, samples, run_end_s: float, columns, min_window_s: float = MIN_WINDOW_S) -> tuple[Fit | None, str | None]:
    """The fit with the smallest relative residual over the lag grid (module doc), and the method: the
    energy counter where it moved inside the run, else the power readings; (None, None) without either."""
    gaps = np.diff(np.asarray(times_s, dtype=float))
    period = max(float(np.median(gaps)) if len(gaps) else 0.0, MIN_LAG_SPAN_S)
    counter = [getattr(s, "energy_mj", None) for s in samples]
    power = [s.power_w for s in samples]
    for method in (COUNTER, POWER_ONLY):
        fits = []
        for lag in np.linspace(0.0, period, LAG_STEPS + 1):
            windows = counter_windows(times_s, counter, 0.0, run_end_s, min_window_s, lag) if method == COUNTER \
                else power_windows(times_s, power, 0.0, run_end_s, min_window_s=min_window_s, lag_s=lag)
            if windows:
                f = fit_at(windows, float(lag), columns)
                fits.append((f.rms_j / max(float(f.energy_j.mean()), 1e-12), f))
        if fits:
            return min(fits, key=lambda x: x[0])[1], method
    return None, None


def bucket_energy(iterations, samples, t0_perf: float, run_end_s: float, power_limit_w: float | None,
                  buckets=None, min_window_s: float | None = None,
                  min_fraction: float = MIN_FRACTION) -> BucketEnergyReport:
    """The run's energy split by bucket. iterations: .variant, .bucket (index), .launch_s, .time_ms in
    launch order; samples: NVML samples (.time_s host perf_counter, .power_w, .energy_mj, .sm_clock_mhz,
    .reasons) with t0_perf the run's perf_counter start; buckets: the engine's (named in the report);
    min_window_s None: MIN_WINDOW_S."""
    min_window_s = MIN_WINDOW_S if min_window_s is None else min_window_s
    t = [s.time_s - t0_perf for s in samples]
    labels = sorted({(it.variant, it.bucket) for it in iterations})
    cols = labels + [IDLE]
    code = {lab: j for j, lab in enumerate(labels)}
    columns = by_column(gpu_intervals([it.launch_s for it in iterations], [it.time_ms for it in iterations]),
                        [code[(it.variant, it.bucket)] for it in iterations], len(labels))
    fit, method = best_fit(t, samples, run_end_s, columns, min_window_s) if iterations else (None, None)
    report = BucketEnergyReport(method, power_limit_w, len(fit.windows) if fit else 0, min_window_s)
    if fit is None:
        report.note = ("no NVML readings inside the run" if samples else
                       "no NVML power readings: not a CUDA device, or NVML unavailable")
        fit = Fit(0.0, [], np.zeros((0, len(cols))), np.zeros((0, len(cols)), bool), {}, {}, [], None, 0.0)
    else:
        report.fit(fit.energy_j, fit.spans, fit.rms_j, fit.lag_s)
        if fit.rest:
            report.rest = Pooled([_name(cols[j], buckets) for j in fit.rest], float(fit.occ[:, fit.rest].sum()),
                                 fit.rest_w)
    where = _window_of(fit.windows, t)
    report.idle = Pooled([IDLE], float(fit.occ[:, -1].sum()), fit.power.get(len(labels)), int(fit.owns[:, -1].sum()))
    times_ms = {lab: [] for lab in labels}
    for it in iterations:
        times_ms[(it.variant, it.bucket)].append(it.time_ms)
    for j, lab in enumerate(labels):
        times = times_ms[lab]
        fraction = len(times) / len(iterations)
        if fraction < min_fraction:
            report.num_unlisted += 1
            report.unlisted_fraction += fraction
            continue
        mine = set(np.flatnonzero(fit.owns[:, j]).tolist())
        inside = [s for s, w in zip(samples, where) if w in mine]
        report.add(BucketEnergy.of(lab[0], lab[1], _dims(lab[1], buckets), len(times), fraction,
                                   float(np.mean(times)), len(mine), fit.power.get(j), fit.se.get(j),
                                   power_limit_w, _clock(inside), _capped(inside)))
    return report


def _window_of(windows: list[EnergyWindow], times_s) -> list[int]:
    """The window each time falls in (the latest-starting one where power windows overlap), else -1."""
    if not windows:
        return [-1] * len(times_s)
    starts = np.array([w.start_s for w in windows])
    idx = np.searchsorted(starts, np.asarray(times_s, dtype=float), side="right") - 1
    return [int(i) if i >= 0 and ts <= windows[i].end_s else -1 for i, ts in zip(idx, times_s)]


def _dims(index: int, buckets) -> list[int] | None:
    if buckets is None:
        return None
    b = buckets[index]
    return [b.max_tokens, b.max_decode, b.max_segments, b.max_context]


def _name(label, buckets) -> str:
    if label == IDLE:
        return IDLE
    dims = _dims(label[1], buckets)
    return f"{label[0]} " + ("/".join(map(str, dims)) if dims else f"bucket {label[1]}")


def _clock(samples) -> float | None:
    return float(np.median([s.sm_clock_mhz for s in samples])) if samples else None


def _capped(samples) -> float | None:
    return sum(1 for s in samples if s.reasons & SW_POWER_CAP) / len(samples) if samples else None
