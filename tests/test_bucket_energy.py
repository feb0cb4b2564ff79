"""Measured energy per engine bucket (runtime.bucket_energy): the GPU timeline rebuilt from launches and
CUDA-event times, windows on the energy counter's moves, a non-negative fit that recovers known per-bucket
powers from samples made from a known schedule (energy counter and power-only), buckets that never hold a
window reported not separable, the printed lines, and the block in a CPU bench run with a fake NVML.

Schedules and powers here are made up so that the answers are known; they say nothing about a GPU."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest

from nfsearch.runtime import bucket_energy as be
from nfsearch.runtime import bucket_energy_fit as bef
from nfsearch.runtime.bucket_energy_report import format_lines, measured
from nfsearch.runtime.power import NvmlDevice, NvmlSample
from nfsearch.serving.batch import Bucket

LIMIT_W = 700.0
IDLE_W = 90.0


@dataclass
class It:                              # the fields of engine.IterationRecord the module reads
    variant: str
    bucket: int
    launch_s: float
    time_ms: float


# ------------------------------------------------------------------------------------ the timeline
def test_back_to_back_launches_run_one_after_another():
    # three launches while the GPU is busy: each starts where the previous ended
    got = be.gpu_intervals([0.0, 0.001, 0.002], [10.0, 10.0, 5.0])
    assert np.array(got) == pytest.approx(np.array([(0.0, 0.010), (0.010, 0.020), (0.020, 0.025)]))


def test_an_idle_gap_starts_the_next_iteration_at_its_launch():
    got = be.gpu_intervals([0.0, 0.050, 0.051], [10.0, 4.0, 4.0])
    assert np.array(got) == pytest.approx(np.array([(0.0, 0.010), (0.050, 0.054), (0.054, 0.058)]))


def test_occupancy_splits_a_window_between_buckets_and_idle():
    windows = [be.EnergyWindow(0.0, 0.1, 1.0), be.EnergyWindow(0.1, 0.2, 1.0)]
    intervals = [(0.0, 0.06), (0.06, 0.12), (0.15, 0.16)]
    occ = bef.occupancy(windows, bef.by_column(intervals, [0, 1, 0], 2))
    assert occ == pytest.approx(np.array([[0.06, 0.04, 0.0], [0.01, 0.02, 0.07]]))


# ------------------------------------------------------------------------------------ windows and NNLS
def test_counter_windows_sit_on_counter_moves_and_add_up():
    # the counter moves every 3rd sample (50 ms apart): edges 25 ms before each move, >= 0.25 s apart
    times = [0.05 * k for k in range(40)]
    mj = [1000 * (k // 3) for k in range(40)]
    windows = be.counter_windows(times, mj, 0.0, 10.0, min_window_s=0.25, lag_s=0.025)
    assert windows[0].start_s == pytest.approx(0.125) and all(w.end_s - w.start_s >= 0.25 for w in windows)
    assert all(a.end_s == b.start_s for a, b in itertools.pairwise(windows))
    assert sum(w.energy_j for w in windows) == pytest.approx((mj[-1] - mj[3]) / 1e3)   # telescoping


def test_nnls_clamps_a_negative_coefficient_and_matches_lstsq_otherwise():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (30, 3))
    x = np.array([2.0, 0.0, 5.0])
    b = a @ x - 0.5 * a[:, 1]                    # the unconstrained fit wants x1 < 0
    got = bef.nnls(a, b)
    assert got[1] == 0.0 and (got >= 0).all()
    b2 = a @ np.array([1.0, 3.0, 2.0])
    assert bef.nnls(a, b2) == pytest.approx([1.0, 3.0, 2.0], rel=1e-9)


# ------------------------------------------------------------------------------------ synthetic runs
def schedule(phases, seed=0, gap_every=0):
    """Iterations over phases [(seconds, {bucket: weight})]: each iteration's bucket drawn by the phase's
    weights, bucket b taking 5 + 3b ms; an idle gap of 20 ms every `gap_every` iterations."""
    rng, its, t = random.Random(seed), [], 0.1
    for seconds, weights in phases:
        end = t + seconds
        while t < end:
            b = rng.choices(list(weights), list(weights.values()))[0]
            if gap_every and len(its) % gap_every == gap_every - 1:
                t += 0.020
            ms = 5.0 + 3.0 * b
            its.append(It("plan", b, t, ms))
            t += ms / 1e3
    return its, t + 0.1


def samples_of(its, powers_w, end_s, *, period_s=0.05, update_s=0.02, noise_w=0.0, with_counter=True, seed=1):
    """NVML samples of the schedule: the counter (updated every update_s, the energy up to that update),
    and the power reading (the mean of the last second), each with noise; t0_perf = 100."""
    rng = random.Random(seed)
    spans = be.gpu_intervals([i.launch_s for i in its], [i.time_ms for i in its])
    grid = np.arange(0.0, end_s + 1.0, 1e-4)            # true power on a 0.1 ms grid
    power = np.full(len(grid), IDLE_W)
    for (a, b), it in zip(spans, its):
        power[round(a / 1e-4):round(b / 1e-4)] = powers_w[it.bucket]
    power += np.array([rng.gauss(0, noise_w) for _ in range(len(grid) // 100 + 1)]).repeat(100)[:len(grid)]
    energy = np.concatenate([[0.0], np.cumsum(power * 1e-4)])
    out, t = [], period_s / 3
    while t < end_s:
        update = math.floor(t / update_s) * update_s
        mj = int(5e6 + 1e3 * energy[round(update / 1e-4)]) if with_counter else None
        last_s = power[max(0, round((t - 1.0) / 1e-4)):round(t / 1e-4)].mean()
        out.append(NvmlSample(100.0 + t, 1755.0, 0x4 if powers_w.get(0, 0) > 650 else 0, float(last_s), mj))
        t += period_s
    return out


PHASES_2 = [(3.0, {0: 9, 1: 1}), (3.0, {0: 1, 1: 9}), (3.0, {0: 5, 1: 5})]
PHASES_3 = [(2.0, {0: 8, 1: 1, 2: 1}), (2.0, {0: 1, 1: 8, 2: 1}), (2.0, {0: 1, 1: 1, 2: 8}),
            (2.0, {0: 3, 1: 3, 2: 3})]


@pytest.mark.parametrize("phases, powers", [(PHASES_2, {0: 690.0, 1: 480.0}),
                                            (PHASES_3, {0: 690.0, 1: 520.0, 2: 610.0})])
def test_the_counter_fit_recovers_each_buckets_power(phases, powers):
    its, end = schedule(phases, gap_every=50)
    samples = samples_of(its, powers, end, noise_w=30.0)
    r = be.bucket_energy(its, samples, 100.0, end, LIMIT_W)
    assert r.method == be.COUNTER and r.residual_pct < 6.0     # the counter's 20 ms updates: +-10 ms edges
    for b in r.buckets:                          # within 2% of the power the samples were made from
        assert b.power_w == pytest.approx(powers[b.bucket], rel=0.02), b
        assert b.num_windows >= 3
        assert b.energy_j == pytest.approx(b.power_w * b.mean_ms / 1e3)
        assert b.closeness == pytest.approx(LIMIT_W / b.power_w)


def test_a_slow_counter_still_gives_the_powers():
    # the counter moves every 100 ms, sampled every 50 ms: windows still end on its moves
    its, end = schedule(PHASES_2, gap_every=50)
    powers = {0: 690.0, 1: 480.0}
    r = be.bucket_energy(its, samples_of(its, powers, end, update_s=0.1), 100.0, end, LIMIT_W)
    assert [b.power_w for b in r.buckets] == pytest.approx([690.0, 480.0], rel=0.03)


def test_power_readings_alone_are_fitted_and_said():
    its, end = schedule([(4.0, {0: 9, 1: 1}), (4.0, {0: 1, 1: 9}), (4.0, {0: 5, 1: 5})], gap_every=50)
    powers = {0: 690.0, 1: 480.0}
    r = be.bucket_energy(its, samples_of(its, powers, end, with_counter=False, noise_w=30.0), 100.0, end, LIMIT_W)
    assert r.method == be.POWER_ONLY and r.window_energy_j is None
    assert [b.power_w for b in r.buckets] == pytest.approx([690.0, 480.0], rel=0.03)


def test_a_bucket_that_never_holds_a_window_is_not_separable():
    # bucket 2 is 15% of the iterations everywhere: never more than half of any window
    phases = [(3.0, {0: 8, 1: 1, 2: 1.5}), (3.0, {0: 1, 1: 8, 2: 1.5})]
    its, end = schedule(phases, gap_every=50)
    r = be.bucket_energy(its, samples_of(its, {0: 690.0, 1: 480.0, 2: 600.0}, end), 100.0, end, LIMIT_W)
    two = next(b for b in r.buckets if b.bucket == 2)
    assert two.power_w is None and two.energy_j is None and two.num_windows == 0 and two.iteration_fraction > 0.1
    assert r.rest is not None and "plan bucket 2" in r.rest.names
    text = "\n".join(format_lines(r.to_dict()))
    assert "not separable" in text


def test_small_buckets_are_fitted_but_not_listed():
    phases = [(3.0, {0: 9, 1: 1}), (3.0, {0: 1, 1: 9})]
    its, end = schedule(phases)
    its[5].bucket = 3                             # one iteration of its own bucket: < 1%
    r = be.bucket_energy(its, samples_of(its, {0: 690.0, 1: 480.0, 3: 600.0}, end), 100.0, end, LIMIT_W)
    assert {b.bucket for b in r.buckets} == {0, 1} and r.num_unlisted == 1


def test_no_samples_is_a_note():
    its, end = schedule([(1.0, {0: 1})])
    r = be.bucket_energy(its, [], 100.0, end, None)
    assert r.method is None and "no NVML" in r.note and r.buckets[0].power_w is None
    assert format_lines(r.to_dict()) == [f"energy per bucket: none measured ({r.note})"]


# ------------------------------------------------------------------------------------ report lines
def test_report_lines_name_buckets_and_their_floor():
    its, end = schedule(PHASES_2, gap_every=50)
    buckets = [Bucket(64, 16, 8, 256), Bucket(32, 16, 8, 256)]
    r = be.bucket_energy(its, samples_of(its, {0: 690.0, 1: 480.0}, end), 100.0, end, LIMIT_W, buckets).to_dict()
    lines = format_lines(r)
    assert lines[0].startswith("energy per bucket (energy counter,") and "power limit 700 W" in lines[0]
    row = next(line for line in lines if line.strip().startswith("64/16/8/256"))
    b0 = measured(r, [64, 16, 8, 256])
    assert f"{b0['floor_ms']:.2f}" in row and f"{b0['closeness']:.3f}" in row and "100%" in row  # capped share
    assert measured(r, [64, 16, 8, 256], "sequential") is None
    assert any(line.strip().startswith("idle") for line in lines)


# ------------------------------------------------------------------------------------ NVML and bench
class _FakeNvml:
    NVML_CLOCK_SM = 0

    class NVMLError(Exception):
        pass

    def __init__(self, has_counter: bool):
        self.has_counter = has_counter

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.has_counter:
            raise self.NVMLError("Not Supported")
        return 123456

    def nvmlDeviceGetClockInfo(self, handle, which):
        return 1755

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return 0x4

    def nvmlDeviceGetPowerUsage(self, handle):
        return 650_000


@pytest.mark.parametrize("has_counter", [True, False])
def test_a_sample_reads_the_energy_counter_or_none(has_counter):
    s = NvmlDevice(_FakeNvml(has_counter), None, "fake").sample()
    assert (s.energy_mj, s.power_w, s.reasons) == ((123456 if has_counter else None), 650.0, 0x4)


class _FakeBoard:
    """What bench reads of an NvmlDevice: 300 W whenever asked, the counter integrating it."""

    def __init__(self):
        import time
        self.t0, self.clock = time.perf_counter(), time.perf_counter

    def energy_mj(self) -> int:
        return int(300.0 * (self.clock() - self.t0) * 1e3)

    def sample(self) -> NvmlSample:
        now = self.clock()
        return NvmlSample(now, 1500.0, 0, 300.0, int(300.0 * (now - self.t0) * 1e3))

    def power_limit_w(self) -> float:
        return 700.0

    def close(self) -> None:
        pass


def test_bench_reports_energy_per_bucket(monkeypatch, one_torch_thread):
    from conftest import ENGINE_TINY

    from nfsearch.runtime import bench_engine
    monkeypatch.setattr(bench_engine, "_open_nvml", lambda engine: _FakeBoard())
    monkeypatch.setattr(be, "MIN_WINDOW_S", 0.04)          # a CPU run of a few tenths of a second
    opts = bench_engine.BenchOptions(ENGINE_TINY, "const:16:100", 16, dense_batch=64, device="cpu", with_op_trace=False)
    report = bench_engine.run_bench(opts, echo=lambda line: None, progress=False)
    block = report["buckets_energy"]
    assert block["method"] == be.COUNTER and block["num_windows"] >= 1 and block["power_limit_w"] == 700.0
    assert sum(b["iteration_fraction"] for b in block["buckets"]) + block["unlisted_fraction"] == pytest.approx(1.0)
    fitted = [b for b in block["buckets"] if b["power_w"] is not None]
    for b in fitted:                                # the board drew 300 W throughout
        assert b["power_w"] == pytest.approx(300.0, rel=0.05)
    assert "energy per bucket (energy counter" in bench_engine.format_report(report)


def test_bench_on_the_cpu_says_no_energy(one_torch_thread):
    from conftest import ENGINE_TINY

    from nfsearch.runtime import bench_engine
    opts = bench_engine.BenchOptions(ENGINE_TINY, "const:16:4", 8, dense_batch=64, device="cpu", with_op_trace=False)
    report = bench_engine.run_bench(opts, echo=lambda line: None, progress=False)
    assert report["buckets_energy"]["method"] is None
    assert "energy per bucket: none measured" in bench_engine.format_report(report)


def test_the_family_table_puts_measured_j_and_floor_beside_the_predicted():
    from nfsearch.runtime.engine_plans import format_family
    phases = [(3.0, {0: 8, 1: 1, 2: 1.5}), (3.0, {0: 1, 1: 8, 2: 1.5})]
    its, end = schedule(phases, gap_every=50)
    buckets = [Bucket(64, 16, 8, 256), Bucket(32, 16, 8, 256), Bucket(16, 16, 8, 256)]
    energy = be.bucket_energy(its, samples_of(its, {0: 690.0, 1: 480.0, 2: 600.0}, end), 100.0, end, LIMIT_W,
                              buckets).to_dict()
    rows = [{"bucket": [b.max_tokens, b.max_decode, b.max_segments, b.max_context], "predicted_fraction": 0.3,
             "measured_fraction": 0.3, "predicted_ms": 6.0, "sequential_predicted_ms": 6.5, "floor_ms": 5.5,
             "predicted_energy_j": 3.21, "measured_ms": 5.0, "kernels": {}, "is_overlapped": False} for b in buckets]
    report = {"trace": "E1", "num_requests": 10, "predicted_tokens_per_s": 1000.0, "buckets": rows}
    lines = format_family(report, 900.0, energy)
    assert "J meas" in lines[1] and "floor meas" in lines[1] and "ms/floor" in lines[1]
    first = measured(energy, [64, 16, 8, 256])
    row = next(line for line in lines if line.strip().startswith("64/16/8/256"))
    assert "3.210" in row and f"{first['energy_j']:.3f}" in row and f"{first['closeness']:.3f}" in row
    third = next(line for line in lines if line.strip().startswith("16/16/8/256"))
    assert third.split()[-5:] == ["3.210", "n/s", "5.50", "n/s", "n/s"]  # J, floor, ms/floor: never holds a window
    assert any(line.startswith("energy per bucket (energy counter") for line in lines)
    plain = format_family(report, 900.0)                                # no energy block: dashes
    assert next(line for line in plain if line.strip().startswith("64/16/8/256")).split()[-1] == "-"
