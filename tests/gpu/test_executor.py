"""GPU: plans run through the executor (SM partitions, event waits, CUDA graph) compute what the
sequential torch reference computes, and the run report has its fields. Skipped without CUDA."""

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from nfsearch.roofline import analytic_profile
from nfsearch.search.baselines import equal_split_plan
from nfsearch.cost import make_problem
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
    report, timeline = executor.execute(schedule, mode=mode, iters=5, timeline=True,
                                        with_ceilings=layers == 1)
    assert report["correctness"]["passed"], report["correctness"]
    assert report["correctness"]["max_rel_error"] < 2e-2
    for key in ("measured_layer_ms", "predicted_layer_ms", "prediction_error", "speedup_vs_seq_torch",
                "speedup_vs_seq_same", "tokens_per_s", "gpu", "launches"):
        assert key in report, key
    assert report["measured_layer_ms"] > 0 and report["baselines"]["seq_torch"]["layer_ms"] > 0
    if layers == 1:
        assert 0 < report["pct_of_bound"] and report["ceilings"]["gemm_tflops"] > 50
    assert timeline is not None and len(timeline.spans) == len(schedule.nano_ops)
