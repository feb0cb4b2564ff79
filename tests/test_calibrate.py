"""`nfsearch calibrate`: measured plan timelines folded into the profile as per-class and per-op
solo and co-run factors plus the overheads between kernels, applied by the cost model only when the
profile has them, labelled, and carried to another model's profile of the same GPU.

The measured timelines here are made from the W2 plan's own replay with known slowdowns (co-run
compute nano-ops 1.30x, every solo nano-op 1.10x), so the factors the fit must find are known."""

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from nfsearch import calibrate, plan, profile
from nfsearch.calibration import Calibration, ClassFactor, calibration_from_meta, without_calibration
from nfsearch.cli import main
from nfsearch.cost import Partner, make_problem
from nfsearch.errors import NfsearchError
from nfsearch.simulate import replay
from nfsearch.timeline import Timeline, timeline_to_dict

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "tests/fixtures/plans/W2.json"
PROFILE = ROOT / "profiles/h100-sxm/llama-3-8b.parquet"
CORUN_SLOWDOWN, SOLO_SLOWDOWN = 1.30, 1.10


@pytest.fixture(scope="module")
def w2():
    # the bundled profile carries a calibration (and an energy factor): the test starts from its rows without
    s, bundled = plan.read(PLAN), profile.load(PROFILE)
    t = profile.ProfileTable(bundled.rows, {k: v for k, v in without_calibration(bundled.meta).items()
                                            if k != "energy_calibration"})
    assert s.profile.fingerprint == t.fingerprint()
    return s, t, replay(s, make_problem(s.model, s.workload, t, s.num_layers).cost).timeline


def slowed(predicted: Timeline) -> Timeline:
    shares = calibrate.corun_shares(predicted)
    spans = []
    for sp in predicted.spans:
        k = CORUN_SLOWDOWN if (shares[sp.id] >= calibrate.CORUN_SHARE and sp.op_class == "compute") else SOLO_SLOWDOWN
        spans.append(dataclasses.replace(sp, end_ms=sp.start_ms + sp.duration_ms * k))
    return Timeline("measured (made by the test)", tuple(spans), predicted.num_layers)


def test_fit_finds_the_co_run_slowdown_beyond_the_solo_error(w2):
    s, t, predicted = w2
    table, cal, ratios = calibrate.calibrate(t, [(s, slowed(predicted), "test run")])
    assert cal.factor("compute") == pytest.approx(CORUN_SLOWDOWN / SOLO_SLOWDOWN, rel=1e-6)
    assert cal.factor("compute", "ug") == pytest.approx(CORUN_SLOWDOWN / SOLO_SLOWDOWN, rel=1e-6)
    assert cal.solo_factor("compute") == pytest.approx(SOLO_SLOWDOWN, rel=1e-6)
    assert cal.solo_factor("other", "norm1") == pytest.approx(SOLO_SLOWDOWN, rel=1e-6)
    # "other" ops co-run too but were not slowed beyond the solo error: factor 1
    assert cal.factor("other") == pytest.approx(1.0, rel=1e-6)
    assert cal.factor("network") == 1.0 and cal.solo_factor("network") == 1.0     # no spans: no factor
    assert any(r.is_corun for r in ratios) and any(not r.is_corun for r in ratios)
    # the calibrated table keeps the rows and the fingerprint; the calibration is in its metadata
    assert table.fingerprint() == t.fingerprint() and len(table.rows) == len(t.rows)
    assert calibration_from_meta(table.meta) == cal
    # calibrating the calibrated table from the same run gives the same factors (replayed uncalibrated)
    _, again, _ = calibrate.calibrate(table, [(s, slowed(predicted), "test run")])
    assert again.factors == cal.factors


def test_cost_model_applies_the_factor_only_when_present(w2):
    s, t, predicted = w2
    table, cal, _ = calibrate.calibrate(t, [(s, slowed(predicted), "test run")])
    raw = make_problem(s.model, s.workload, t, s.num_layers).cost
    cooked = make_problem(s.model, s.workload, table, s.num_layers).cost
    assert raw.calibration is None and cooked.calibration == cal
    partner = (Partner("decode_attn", 512, 36),)
    before, after = raw.beside_ms("ug", 1024, 96, partner), cooked.beside_ms("ug", 1024, 96, partner)
    both = cal.solo_factor("compute", "ug") * cal.factor("compute", "ug")
    assert after == pytest.approx(before * both, rel=1e-9)
    assert cooked.beside_ms("ug", 1024, 96, ()) == pytest.approx(raw.beside_ms("ug", 1024, 96, ()) * SOLO_SLOWDOWN)
    # norm2 runs norm1's kernel: it takes norm1's factors
    assert cooked.solo_ms("norm2", 512, 132) == pytest.approx(raw.solo_ms("norm2", 512, 132)
                                                            * cal.solo_factor("other", "norm1"))
    assert "calibrated" in cooked.describe_sources() and "fitted from" in cooked.describe_sources()
    assert "calibrated" not in raw.describe_sources()
    # a replay under the calibrated model is slower (every op costs more), never faster
    assert replay(s, cooked).timeline.makespan_ms > predicted.makespan_ms


def test_overheads_are_read_off_the_measured_launches(w2):
    s, t, predicted = w2
    # every launch of the measured run starts 3 us after the latest predecessor the executor
    # orders it after (its stream's previous launch, the events it waits on): gaps and waits of 3
    from nfsearch.runtime.launch import build
    spans, end = {}, {}
    previous = {}
    for launch in build(s).launches:
        preds = [end[d] for d in launch.waits] + ([end[previous[launch.key]]] if launch.key in previous else [])
        start = max(preds, default=0.0) + (0.003 if preds else 0.0)
        old = predicted.by_id()[launch.id]
        spans[launch.id] = dataclasses.replace(old, start_ms=start, end_ms=start + old.duration_ms)
        end[launch.id] = start + old.duration_ms
        previous[launch.key] = launch.id
    measured = Timeline("measured (made by the test)", tuple(spans[x.id] for x in predicted.spans), predicted.num_layers)
    got = calibrate.overhead_samples(s, measured)
    assert len(got.waits_us) >= 5 and len(got.gaps_us) >= 5
    assert all(v == pytest.approx(3.0, abs=1e-6) for v in got.waits_us + got.gaps_us)
    _, cal, _ = calibrate.calibrate(t, [(s, measured, "test run")])
    assert cal.event_wait_us == pytest.approx(3.0) and cal.launch_gap_us == pytest.approx(3.0)
    cost = make_problem(s.model, s.workload, profile.ProfileTable(t.rows, {**t.meta, "calibration": cal.to_dict()}),
                        s.num_layers).cost
    assert cost.event_wait_ms == pytest.approx(0.003) and cost.launch_gap_ms == pytest.approx(0.003)


def test_transfer_carries_the_calibration_to_another_profile_of_the_gpu(w2, tmp_path):
    s, t, predicted = w2
    table, cal, _ = calibrate.calibrate(t, [(s, slowed(predicted), "test run")])
    cal_path = tmp_path / "cal.parquet"
    table.write(cal_path)
    out = tmp_path / "carried.parquet"
    r = CliRunner().invoke(main, ["calibrate", "--profile", str(PROFILE), "--from", str(cal_path), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert calibration_from_meta(profile.load(out).meta) == cal
    other_gpu = profile.ProfileTable(t.rows, {**t.meta, "gpu_name": "NVIDIA A100-SXM4-80GB"})
    with pytest.raises(NfsearchError, match="gpu_name"):
        calibrate.transfer(other_gpu, table)
    with pytest.raises(NfsearchError, match="no calibration"):
        calibrate.transfer(t, t)
    r = CliRunner().invoke(main, ["calibrate", "--profile", str(PROFILE), "-o", str(tmp_path / "x.parquet")])
    assert r.exit_code == 2 and "either --run" in r.output


def test_cli_writes_a_calibrated_profile(w2, tmp_path):
    _, _, predicted = w2
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps(timeline_to_dict(slowed(predicted))))
    out = tmp_path / "cal.parquet"
    r = CliRunner().invoke(main, ["calibrate", "--profile", str(PROFILE), "--run", str(PLAN), str(measured),
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "compute" in r.output and "wrote" in r.output
    cal = calibration_from_meta(profile.load(out).meta)
    assert cal.factor("compute") == pytest.approx(CORUN_SLOWDOWN / SOLO_SLOWDOWN, rel=1e-6)


def test_cli_refuses_a_timeline_of_another_plan_in_one_line(w2, tmp_path):
    _, _, predicted = w2
    short = Timeline("measured elsewhere", predicted.spans[:5], predicted.num_layers)
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps(timeline_to_dict(short)))
    out = tmp_path / "cal.parquet"
    r = CliRunner().invoke(main, ["calibrate", "--profile", str(PROFILE), "--run", str(PLAN), str(measured),
                                  "-o", str(out)])
    assert r.exit_code == 2
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("nfsearch: error:") and "lacks" in lines[0]
    assert not out.exists()


def test_calibration_entries_are_checked():
    with pytest.raises(NfsearchError, match="outside"):
        ClassFactor("compute", 9.0, 3, 1, 9.0, 1.0)
    with pytest.raises(NfsearchError, match="unknown op class"):
        ClassFactor("gpu", 1.1, 3, 1, 1.1, 1.0)
    with pytest.raises(NfsearchError, match="not a calibration"):
        Calibration.from_dict({"factors": [{"op_class": "compute"}], "sources": ["x"]})
    with pytest.raises(NfsearchError, match="no measured run"):
        Calibration((), (), 2.0, 0.5)
    with pytest.raises(NfsearchError, match="event_wait_us"):
        Calibration((), ("x",), -1.0, 0.5)
    with pytest.raises(NfsearchError, match="solo factor"):
        ClassFactor("other", 1.0, 3, 3, 1.0, 0.1, 0.1)


def test_a_class_without_its_own_spans_of_a_kind_takes_no_correction():
    """NoClassData: a class with co-run spans but too few solo ones divides by every class's solo
    median and keeps solo factor 1; a class with too few spans of both gets no entry."""
    SpanRatio = calibrate.SpanRatio
    ratios = [SpanRatio(f"c{i}", "ug", "compute", False, 1.0, 1.2) for i in range(3)]
    ratios += [SpanRatio(f"m{i}", "decode_attn", "memory", True, 1.0, 1.8) for i in range(3)]
    ratios += [SpanRatio("o1", "norm1", "other", False, 1.0, 0.5)]
    cal = calibrate.fit(ratios, ["test"], [], 5.0)
    memory = next(f for f in cal.factors if f.op_class == "memory" and not f.op)
    assert memory.solo_factor == 1.0 and memory.solo_ratio == pytest.approx(1.2)
    assert memory.factor == pytest.approx(1.8 / 1.2)
    assert not [f for f in cal.factors if f.op_class == "other"]
    with pytest.raises(NfsearchError):
        calibrate.NoClassData(0.0)
