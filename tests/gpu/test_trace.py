"""GPU: `run --timeline` measures the plan as executed: a kernel trace of CUDA-graph replays mapped
back to nano-ops (nfsearch.runtime.trace), one span per nano-op. Skipped without CUDA."""

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from nfsearch.cost import make_problem
from nfsearch.roofline import analytic_profile
from nfsearch.runtime import executor
from nfsearch.search.baselines import equal_split_plan
from nfsearch.specs import ModelSpec, Workload, load_gpu

MODEL = ModelSpec("small", 1024, 8, 2, 128, 2048, 2, 1000)
WORKLOAD = Workload("small mixed", 32, 256, (100, 60))


def test_graph_replay_timeline_of_a_two_layer_plan_has_one_span_per_nano_op():
    p = make_problem(MODEL, WORKLOAD, analytic_profile(MODEL, WORKLOAD, load_gpu("h100-sxm")), 2,
                     allow_extrapolation=True)
    schedule = equal_split_plan(p, 2)
    report = executor.execute(schedule, mode="green", iters=3, repeats=1, timeline=True, with_baselines=False,
                              with_ceilings=False)
    tl = report.timeline
    assert tl is not None
    assert "kernel trace" in tl.label, report.notes          # not the eager fallback
    ids = [s.id for s in tl.spans]
    assert sorted(ids) == sorted(o.id for o in schedule.nano_ops)
    assert len(set(ids)) == len(ids)
    assert all(s.duration_ms > 0 for s in tl.spans)
    # the spans of one replay fit inside the timed plan's layer stack time (a loose sanity bound)
    assert tl.makespan_ms < 10 * report.plan.layer_ms * schedule.num_layers
    print(f"\n{tl.label}: {len(tl.spans)} spans, makespan {tl.makespan_ms:.3f} ms; "
          f"graph-timed {report.plan.layer_ms * schedule.num_layers:.3f} ms; notes: {report.notes}")
