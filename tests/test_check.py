"""Golden regression: the committed goldens pass; a worsened or corrupted golden fails readably."""

import json
import shutil
from pathlib import Path

import pytest

from nfsearch.golden import run_check
from nfsearch.errors import NfsearchError

GOLDEN = Path(__file__).parent / "golden"


def _one_case(tmp_path, name="W1"):
    shutil.copy(GOLDEN / f"{name}.plan.json", tmp_path / f"{name}.plan.json")
    (tmp_path / "cases.yaml").write_text(
        "tolerance: 0.02\ncases:\n"
        f"  - {{name: {name}, model: llama-3-8b, workload: {name}, profile: default, plan: {name}.plan.json,"
        " solver: cpsat, time_limit_s: 5, threads: 2, seed: 0}\n")
    return tmp_path / "cases.yaml", tmp_path / f"{name}.plan.json"


def test_goldens_pass():
    result = run_check(GOLDEN / "cases.yaml")
    assert result.ok, result.report()
    assert {c.name for c in result.cases} == {"W1", "W2", "W3", "W4"}


def test_fails_when_golden_is_better_than_achievable(tmp_path):
    cases, plan = _one_case(tmp_path)
    data = json.loads(plan.read_text())
    data["predicted"]["makespan_ms"] *= 0.5
    plan.write_text(json.dumps(data))
    result = run_check(cases)
    assert not result.ok
    assert "slower than the golden" in result.report() and "FAIL W1" in result.report()


def test_fails_when_golden_deps_are_corrupt(tmp_path):
    cases, plan = _one_case(tmp_path)
    data = json.loads(plan.read_text())
    victim = next(o for o in data["nano_ops"] if o["deps"])
    victim["deps"] = victim["deps"] + ["L0.no_such_op#0"]
    plan.write_text(json.dumps(data))
    result = run_check(cases)
    assert not result.ok and "unusable" in result.report()


def test_bad_cases_file(tmp_path):
    with pytest.raises(NfsearchError):
        run_check(tmp_path / "missing.yaml")
    (tmp_path / "c.yaml").write_text("cases: []\n")
    with pytest.raises(NfsearchError):
        run_check(tmp_path / "c.yaml")


@pytest.mark.parametrize("extra,match", [
    ("seed: abc", "seed must be an integer"), ("threads: 2.5", "threads must be an integer"),
    ("time_limit_s: fast", "time_limit_s must be a number"), ("num_layers: true", "num_layers"),
    ("colour: red", "unknown key 'colour'"),
])
def test_bad_case_values_are_one_line_errors(tmp_path, extra, match):
    (tmp_path / "c.yaml").write_text(f"cases:\n  - {{name: W1, model: llama-3-8b, workload: W1, plan: p.json, {extra}}}\n")
    with pytest.raises(NfsearchError, match=match) as err:
        run_check(tmp_path / "c.yaml")
    assert "\n" not in str(err.value)
    (tmp_path / "t.yaml").write_text("tolerance: .nan\ncases:\n  - {name: W1, model: m, workload: W1, plan: p.json}\n")
    with pytest.raises(NfsearchError, match="tolerance"):
        run_check(tmp_path / "t.yaml")
