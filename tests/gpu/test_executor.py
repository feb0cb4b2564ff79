"""GPU: plans run through the executor (one build per co-running layout, event waits, CUDA graph
across green-context streams) compute what the sequential torch reference computes, the groups
of every layout a plan uses are physically disjoint, and the run report has its numbers.
Skipped without CUDA."""

import itertools

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from nfsearch.cost import make_problem
from nfsearch.roofline import analytic_profile
from nfsearch.runreport import RunReport
from nfsearch.search.baselines import equal_split_plan
from nfsearch.specs import ModelSpec, Workload, load_gpu

MODEL = ModelSpec("small", 1024, 8, 2, 128, 2048, 2, 1000)
WORKLOAD = Workload("small mixed", 32, 256, (100, 60))


def plan(layers, batches=2):
    p = make_problem(MODEL, WORKLOAD, analytic_profile(MODEL, WORKLOAD, load_gpu("h100-sxm")), layers,
                     allow_extrapolation=True)
    return equal_split_plan(p, batches)


@pytest.mark.parametrize("mode", ["green", "grid"])
@pytest.mark.parametrize("layers,batches", [(1, 2), (2, 3)])
def test_plan_runs_correctly_and_reports(layers, batches, mode):
    from nfsearch.runtime import executor
    schedule = plan(layers, batches)
    report = executor.execute(schedule, mode=mode, iters=5, repeats=3, timeline=True, with_compiled=False,
                              with_ceilings=layers == 1)
    assert isinstance(report, RunReport)
    assert report.correctness.passed, report.correctness
    assert report.correctness.max_rel_error < 2e-2
    assert report.plan is not None and report.plan.how == "cuda-graph", report.notes
    assert len(report.plan.repeat_layer_ms) == 3 and report.plan.min_layer_ms <= report.measured_layer_ms
    assert {b.label for b in report.baselines} == {"seq-torch", "seq-same"}, report.baseline_failures
    torch_t = report.baseline("seq-torch")
    assert torch_t.how == "cuda-graph" and "WRONG" not in torch_t.note, torch_t.note
    assert report.speedup("seq-same") > 0 and report.tokens_per_s > 0
    if layers == 1:
        assert 0 < report.pct_of_bound and report.ceilings.gemm_tflops > 50
    assert report.timeline is not None and len(report.timeline.spans) == len(schedule.nano_ops)
    assert RunReport.from_dict(report.to_dict()) == report


def test_groups_of_every_layout_a_plan_uses_are_physically_disjoint():
    from nfsearch.runtime import executor, launch
    from nfsearch.runtime.partitions import observed_sm_ids
    schedule = plan(2, 3)
    with executor.ExecContext("cuda", "green") as ctx:
        if ctx.mode != "green":
            pytest.skip("green contexts unavailable")
        ll = launch.build(schedule, num_sms=ctx.num_sms, granularity=ctx.granularity)
        layouts = [x for x in ll.layouts if x.build != "whole"]
        assert layouts, "the plan should run something side by side"
        for layout in layouts:
            groups = ctx.build(layout)
            assert groups is not None, ctx.notes
            seen = [observed_sm_ids(stream) for _sms, stream in groups]
            for (sms, _), ids in zip(groups, seen):
                assert len(ids) == sms, (layout.sizes, sms, len(ids))
            for a, b in itertools.combinations(seen, 2):
                assert not a & b, layout.sizes
        # co-running launches take their streams from those builds: distinct groups, one layout
        for a, b in itertools.combinations(ll.launches, 2):
            co = a.stream != b.stream and a.start_ms < b.end_ms - 1e-4 and b.start_ms < a.end_ms - 1e-4
            if co and not a.partition.is_whole and not b.partition.is_whole:
                assert a.layout == b.layout and ctx.stream_for(a) is not ctx.stream_for(b)


def test_tune_times_the_candidates_against_each_other_and_chooses_by_it():
    from nfsearch import tune
    from nfsearch.search.baselines import sequential_plan
    p = make_problem(MODEL, WORKLOAD, analytic_profile(MODEL, WORKLOAD, load_gpu("h100-sxm")), 2,
                     allow_extrapolation=True)
    candidates = [tune.Candidate("seq", sequential_plan(p)), tune.Candidate("split2", equal_split_plan(p, 2))]
    result = tune.run_candidates(candidates, iters=5, force=True)
    timings = result.best.interleaved["timings"]
    assert set(timings) == {"seq", "split2"} and all(len(t["repeat_layer_ms"]) == tune.INTERLEAVED_REPEATS
                                                     for t in timings.values())
    # the choice went by the interleaved medians, each candidate's own run stays in its report
    assert result.best.measured_layer_ms == min(t["layer_ms"] for t in timings.values())
    assert all(t.report["plan"]["layer_ms"] > 0 for t in result.trials)
    from nfsearch.runreport import format_table
    assert "FAILED" not in format_table([t.report for t in result.trials])
