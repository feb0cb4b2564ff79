"""`run --timeline` on tensor-parallel plans: every rank traces the same steps in lockstep (a gloo run
on the CPU walks the agreement path: no CUDA on any rank, so every rank stops at the same step and the
run goes on without a timeline), rank 0's timeline becomes measured.json, and `calibrate` folds a TP
plan's measured timeline into factors of every class, "network" included. GPU: a TP=2 trace with one
span per nano-op, the all-reduces included."""

import dataclasses
import json
from pathlib import Path

import pytest

from nfsearch import calibrate
from nfsearch import plan as plan_mod
from nfsearch.cost import make_problem
from nfsearch.roofline import analytic_profile
from nfsearch.search.baselines import equal_split_plan
from nfsearch.simulate import stated_timeline
from nfsearch.specs import ModelSpec, Workload, load_gpu
from nfsearch.timeline import Timeline, timeline_from_dict, timeline_to_dict

torch = pytest.importorskip("torch")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tp"
TINY = ModelSpec("tiny-tp", 64, 4, 2, 16, 128, 2, 1000)
TINY_WL = Workload("tiny-tp2", 6, 40, (20, 13), tp_degree=2)


def tiny_tp_plan(batches: int = 2):
    profile = analytic_profile(TINY, TINY_WL, load_gpu("h100-sxm"))
    problem = make_problem(TINY, TINY_WL, profile, 2, allow_extrapolation=True)
    return equal_split_plan(problem, batches), profile


def stretched(tl: Timeline, factor: float, label: str) -> Timeline:
    spans = tuple(dataclasses.replace(s, start_ms=s.start_ms * factor, end_ms=s.end_ms * factor) for s in tl.spans)
    return Timeline(label, spans, tl.num_layers)


def test_gloo_tp2_timeline_fails_together_and_the_run_goes_on(tmp_path):
    from nfsearch.runtime import tp as tp_mod
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    schedule, _ = tiny_tp_plan(2)
    plan_path, out = tmp_path / "plan.json", tmp_path / "report.json"
    plan_mod.write(schedule, plan_path)
    # the kwargs run_plan hands every spawned rank: timeline=True reaches execute_rank on both
    tp_mod.spawn_ranks(tp_mod._run_worker, 2, "gloo",
                       (str(plan_path), str(out), {"time_on_cpu": True, "iters": 2, "repeats": 1,
                                                   "with_baselines": False, "timeline": True}))
    report = json.loads(out.read_text())
    assert report["correctness"]["passed"] and report["measured_layer_ms"] > 0
    assert "timeline" not in report
    errors = report["trace"]["errors"]
    assert sorted(errors) == ["0", "1"]           # JSON keys: both ranks failed, at the same step
    assert all("needs a CUDA device" in e for e in errors.values())
    assert any(n.startswith("timeline: kernel trace failed on rank(s) [0, 1]") for n in report["notes"])


def test_trace_summary_keeps_rank0_timeline_only_when_every_rank_traced():
    from nfsearch.runtime.tp import trace_summary
    schedule, _ = tiny_tp_plan(2)
    tl = stated_timeline(schedule)
    facts = {"num_replays": 5, "method": "names", "num_skipped": 0}
    ok = [{"trace": {"timeline": timeline_to_dict(tl), "makespan_ms": tl.makespan_ms, "facts": facts}},
          {"trace": {"makespan_ms": tl.makespan_ms + 0.01, "facts": facts}}]
    got, info, note = trace_summary(ok)
    assert timeline_from_dict(got).by_id().keys() == {o.id for o in schedule.nano_ops}
    assert info["rank_skew_ms"] == pytest.approx(0.01) and len(info["per_rank_makespan_ms"]) == 2
    assert "matched by names" in note
    bad = [ok[0], {"trace": {"error": "TraceError: the graph capture failed on this rank (x)"}}]
    got, info, note = trace_summary(bad)
    assert got is None and info == {"errors": {1: bad[1]["trace"]["error"]}}
    assert note.startswith("timeline: kernel trace failed on rank(s) [1]")


def test_calibrate_folds_a_tp_plan_timeline_into_network_factors(tmp_path):
    # the W4 plan solved on the measured 2x H200 TP profile (tests/fixtures/tp)
    from nfsearch.profile import load
    schedule = plan_mod.read(FIXTURES / "W4-H200x2.plan.json")
    profile = load(FIXTURES / "W4-H200x2.parquet")
    stated = stated_timeline(schedule)
    assert {s.op_class for s in stated.spans} >= {"network", "compute"}
    measured = timeline_from_dict(timeline_to_dict(stretched(stated, 1.2, "measured (synthetic)")))
    _, cal, ratios = calibrate.calibrate(profile, [(schedule, measured, "W4 TP=2")])
    network = [r for r in ratios if r.op_class == "network"]
    assert network and all(r.ratio > 1.0 for r in network)
    assert any(f.op_class == "network" and f.op == "" for f in cal.factors)
    # the Gantt of the TP run: the plan's stated timeline beside the measured one
    from nfsearch import report as report_mod
    paths = report_mod.write_all([stated, measured], tmp_path / "timeline", "W4 TP=2 (rank 0)")
    assert all(Path(p).is_file() for p in paths.values())


def test_cli_no_longer_refuses_timeline_for_tp_plans(tmp_path):
    from click.testing import CliRunner

    from nfsearch.cli import main
    schedule, _ = tiny_tp_plan(2)
    plan_path = tmp_path / "plan.json"
    plan_mod.write(schedule, plan_path)
    r = CliRunner().invoke(main, ["run", "--schedule", str(plan_path), "--timeline", "--out", str(tmp_path / "o")])
    assert "not measured for tensor-parallel" not in r.output
    if not torch.cuda.is_available():
        assert r.exit_code == 2 and "needs a CUDA GPU" in r.output


@pytest.mark.gpu
def test_gpu_tp2_timeline_has_one_span_per_nano_op(tmp_path):
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    from nfsearch.runtime import tp as tp_mod
    schedule, _ = tiny_tp_plan(2)
    plan_path = tmp_path / "plan.json"
    plan_mod.write(schedule, plan_path)
    report = tp_mod.run_plan(str(plan_path), timeline=True, impls="torch", iters=3, repeats=1,
                             with_baselines=False, with_ceilings=False)
    assert report["correctness"]["passed"]
    assert "timeline" in report, report["notes"]
    tl = timeline_from_dict(report["timeline"])
    ids = [s.id for s in tl.spans]
    assert sorted(ids) == sorted(o.id for o in schedule.nano_ops) and len(set(ids)) == len(ids)
    assert sum(s.op.startswith("allreduce") for s in tl.spans) == 2 * 2 * 2
    assert all(s.end_ms >= s.start_ms for s in tl.spans) and tl.makespan_ms > 0
    assert len(report["trace"]["per_rank_makespan_ms"]) == 2 and tl.num_layers == schedule.num_layers
