"""`nfsearch calibrate`: measured plan timelines folded into the profile as per-op-class co-run
stretch factors, applied by the cost model only when the profile has them, and labelled.

The measured timelines here are made from the W2 plan's own replay with known slowdowns (co-run
compute nano-ops 1.30x, every solo nano-op 1.10x), so the factor the fit must find is known."""

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from nfsearch import calibrate, plan, profile
from nfsearch.calibration import Calibration, ClassFactor, calibration_from_meta
from nfsearch.cli import main
from nfsearch.cost import Partner, make_problem
from nfsearch.errors import NfsearchError
from nfsearch.simulate import replay
from nfsearch.timeline import Timeline, timeline_to_dict

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "benchmarks/plans/W2.json"
PROFILE = ROOT / "profiles/h100-sxm/llama-3-8b.parquet"
CORUN_SLOWDOWN, SOLO_SLOWDOWN = 1.30, 1.10


@pytest.fixture(scope="module")
def w2():
    s, t = plan.read(PLAN), profile.load(PROFILE)
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
    # "other" ops co-run too but were not slowed beyond the solo error: factor 1
    assert cal.factor("other") == pytest.approx(1.0, rel=1e-6)
    assert cal.factor("network") == 1.0                       # no spans: no factor
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
    assert after == pytest.approx(before * cal.factor("compute"), rel=1e-9)
    assert cooked.beside_ms("ug", 1024, 96, ()) == raw.beside_ms("ug", 1024, 96, ())   # solo: untouched
    assert "calibrated co-run stretch" in cooked.describe_sources()
    assert "calibrated" not in raw.describe_sources()
    # a replay under the calibrated model is slower (co-run compute costs more), never faster
    assert replay(s, cooked).timeline.makespan_ms > predicted.makespan_ms


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
        Calibration((), ())
