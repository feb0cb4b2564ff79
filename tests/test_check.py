"""Golden regression: the committed goldens pass; a worsened or corrupted golden fails readably."""

import dataclasses
import importlib
import json
import shutil
from pathlib import Path

import pytest

from nfsearch.golden import run_check, update_goldens
from nfsearch.errors import NfsearchError

GOLDEN = Path(__file__).parent / "golden"


def _one_case(tmp_path, name="W1"):
    shutil.copy(GOLDEN / f"{name}.plan.json", tmp_path / f"{name}.plan.json")
    (tmp_path / "cases.yaml").write_text(
        "tolerance: 0.002\ncases:\n"
        f"  - {{name: {name}, model: llama-3-8b, workload: {name}, profile: default, plan: {name}.plan.json,"
        " solver: cpsat, time_limit_s: 5, threads: 2, seed: 0}\n")
    return tmp_path / "cases.yaml", tmp_path / f"{name}.plan.json"


@pytest.mark.slow
def test_goldens_pass():
    result = run_check(GOLDEN / "cases.yaml")
    assert result.ok, result.report()
    assert {c.name for c in result.cases} == {"W1", "W2", "W3", "W4", "W2-stage2"}


def test_stored_figure_is_not_what_is_compared(tmp_path):
    """The golden is re-scored under today's model: a tampered stored time changes nothing."""
    cases, plan = _one_case(tmp_path)
    untampered = run_check(cases).cases[0].golden_ms
    data = json.loads(plan.read_text())
    data["predicted"]["makespan_ms"] *= 0.5
    plan.write_text(json.dumps(data))
    result = run_check(cases)
    assert result.ok, result.report()
    case = result.cases[0]
    assert case.stored_ms == pytest.approx(data["predicted"]["makespan_ms"], rel=1e-6)
    assert case.golden_ms == pytest.approx(untampered, rel=1e-9) != pytest.approx(case.stored_ms, rel=1e-3)


def _w2_without_margin(tmp_path):
    """The W2 case solved without the margin (min_gain 0): at the power cap, with its nano-batches'
    own energy, its overlapped plan is predicted 1-2% faster than the sequential plan, inside the
    default margin, so the search would write the sequential plan and a worsened search go unseen."""
    cases, plan = _one_case(tmp_path, "W2")
    cases.write_text(cases.read_text().replace("seed: 0}", "seed: 0, min_gain: 0}"))
    return cases, plan


def _worsened_search(monkeypatch):
    """A deliberately worsened solver: the search returns the sequential plan."""
    import nfsearch.search
    from nfsearch.search.baselines import sequential_plan
    monkeypatch.setattr(nfsearch.search, "solve", lambda problem, **_: (sequential_plan(problem), []))


def test_worsened_solver_fails_the_check(tmp_path, monkeypatch):
    cases, _ = _w2_without_margin(tmp_path)
    assert run_check(cases).ok
    _worsened_search(monkeypatch)
    result = run_check(cases)
    assert not result.ok
    assert "FAIL W2" in result.report() and "slower than the re-scored golden" in result.report()
    assert result.cases[0].new_ms > result.cases[0].golden_ms


def _stage2_case(tmp_path):
    """The golden case whose plan is stage 2's own (plan_from: stage2), alone in a cases file."""
    shutil.copy(GOLDEN / "W2-stage2.plan.json", tmp_path / "W2-stage2.plan.json")
    (tmp_path / "cases.yaml").write_text(
        "tolerance: 0.002\ncases:\n  - {name: W2-stage2, model: llama-3-8b, workload: W2, profile: default, "
        "plan: W2-stage2.plan.json, solver: cpsat, time_limit_s: 5, threads: 2, seed: 0, plan_from: stage2}\n")
    return tmp_path / "cases.yaml"


def _crippled_stage2(monkeypatch):
    """Stage 2 forced to an equal 64/68 SM split (the split side of every structure: 64 SMs for the
    overlappers, 68 for their partners), whatever split stage 1 found."""
    solve_mod = importlib.import_module("nfsearch.search.solve")      # (the package's `solve` is the function)
    real = solve_mod.stage2_from

    def crippled(problem, cand, durs, wait=None):
        full = problem.gpu.num_sms
        sms = {g: n if n in (0, full) else 64 if n == cand.memory_sms else full - 64 for g, n in cand.sms.items()}
        return real(problem, dataclasses.replace(cand, memory_sms=64, sms=sms), durs, wait)
    monkeypatch.setattr(solve_mod, "stage2_from", crippled)


def test_the_stage2_golden_comes_from_stage2():
    from nfsearch import plan as plan_io
    golden = plan_io.read(GOLDEN / "W2-stage2.plan.json")
    assert golden.solver.source.startswith("cpsat solution #") and golden.solver.gap is not None
    assert any(o.after for o in golden.nano_ops)          # it carries stage 2's cross-stream order


def test_a_crippled_stage2_fails_the_check(tmp_path, monkeypatch):
    """`nfsearch check` sees stage 2: with stage 2 forced to an equal split, its case fails (the
    search itself would still write a stage-1 incumbent or a baseline, and the other cases pass)."""
    cases = _stage2_case(tmp_path)
    _crippled_stage2(monkeypatch)
    result = run_check(cases)
    assert not result.ok, result.report()
    assert "FAIL W2-stage2" in result.report() and "slower than the re-scored golden" in result.report()
    assert result.cases[0].new_ms > 1.01 * result.cases[0].golden_ms        # (+5% on the model as written)


def test_update_replaces_only_by_a_better_plan(tmp_path, monkeypatch):
    from nfsearch import plan as plan_io
    cases, plan = _w2_without_margin(tmp_path)
    before = plan.read_text()
    with monkeypatch.context() as patch:
        _worsened_search(patch)
        lines = update_goldens(cases)
    assert plan.read_text() == before and "kept" in lines[0]
    # a worse golden (the sequential plan) is replaced by the real search's better plan
    from nfsearch.search.baselines import sequential_plan
    from nfsearch.golden import problem_for, load_cases
    case = load_cases(cases)[0][0]
    plan_io.write(sequential_plan(problem_for(case, tmp_path)), plan)
    lines = update_goldens(cases)
    assert "wrote" in lines[0] and "better than the re-scored golden" in lines[0]
    assert plan_io.read(plan).predicted.makespan_ms < sequential_plan(problem_for(case, tmp_path)).predicted.makespan_ms


def test_a_golden_that_misses_the_margin_scores_as_the_sequential_plan():
    """Under a margin the overlapped W2 golden does not clear, the search writes the sequential plan:
    the golden is scored as that plan, so the check compares like with like."""
    from nfsearch import plan as plan_io
    from nfsearch.golden import load_cases, problem_for, rescore
    from nfsearch.search.baselines import sequential_plan
    from nfsearch.simulate import judge
    case = next(c for c in load_cases(GOLDEN / "cases.yaml")[0] if c["name"] == "W2")
    problem = problem_for(case, GOLDEN)
    golden = plan_io.read(GOLDEN / "W2.plan.json")
    seq_ms = judge(sequential_plan(problem), problem.cost).ranked_makespan_ms
    own_ms = judge(golden, problem.cost).ranked_makespan_ms
    assert own_ms < seq_ms and rescore(golden, problem) == pytest.approx(own_ms)
    assert rescore(golden, problem, min_gain=0.0) == pytest.approx(own_ms)
    assert rescore(golden, problem, min_gain=0.5) == pytest.approx(seq_ms)


@pytest.mark.slow
def test_check_and_update_follow_the_cases_margin(tmp_path):
    cases, plan = _one_case(tmp_path, "W2")
    cases.write_text(cases.read_text().replace("seed: 0}", "seed: 0, min_gain: 0.5}"))
    result = run_check(cases)
    assert result.ok, result.report()
    lines = update_goldens(cases)
    assert "wrote" in lines[0] and "no longer clears the margin" in lines[0], lines
    from nfsearch import plan as plan_io
    assert plan_io.read(plan).solver.source == "sequential baseline"
    assert "kept" in update_goldens(cases)[0]


def test_unreplayable_golden_fails_and_update_says_so(tmp_path):
    cases, plan = _one_case(tmp_path, "W1")
    data = json.loads(plan.read_text())
    # a golden for another workload size: its nano-ops no longer tile today's graph
    for o in data["nano_ops"]:
        if o["op"] == "decode_attn":
            o["tokens"] = [0, 256]
    data["nano_batches"]["decode_attn"] = [[0, 256]]
    plan.write_text(json.dumps(data))
    result = run_check(cases)
    assert not result.ok and "can no longer be replayed" in result.report()
    lines = update_goldens(cases)
    assert "wrote" in lines[0] and "could no longer be replayed" in lines[0]
    assert run_check(cases).ok


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
    ("colour: red", "unknown key 'colour'"), ("min_gain: lots", "min_gain must be a number"),
    ("plan_from: stage3", "plan_from must be one of search, stage2"),
])
def test_bad_case_values_are_one_line_errors(tmp_path, extra, match):
    (tmp_path / "c.yaml").write_text(f"cases:\n  - {{name: W1, model: llama-3-8b, workload: W1, plan: p.json, {extra}}}\n")
    with pytest.raises(NfsearchError, match=match) as err:
        run_check(tmp_path / "c.yaml")
    assert "\n" not in str(err.value)
    (tmp_path / "t.yaml").write_text("tolerance: .nan\ncases:\n  - {name: W1, model: m, workload: W1, plan: p.json}\n")
    with pytest.raises(NfsearchError, match="tolerance"):
        run_check(tmp_path / "t.yaml")
