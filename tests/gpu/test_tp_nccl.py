"""GPU, two or more: a TP=2 plan whose all-reduces are split into nano-ops on their own stream runs on
two processes (NCCL, multicast off), matches the TP=1 sequential reference on the same weights, and is
timed in one CUDA graph per rank beside seq-torch / seq-same with their collectives. Skipped with
fewer than 2 GPUs."""

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]

from nfsearch import plan as plan_mod
from nfsearch.cost import make_problem
from nfsearch.roofline import analytic_profile
from nfsearch.specs import ModelSpec, Workload, load_gpu

MODEL = ModelSpec("small-tp", 1024, 8, 4, 128, 2048, 2, 1000)
WORKLOAD = Workload("small tp2", 32, 256, (100, 60), tp_degree=2)


def two_stream_plan(problem, compute_sms: int, num_batches: int = 2, chunk: int = 128):
    """Every op split into equal nano-batches; compute ops on one stream of `compute_sms` SMs, the rest
    (decode attention, small ops, the all-reduces) on a second stream with the other SMs."""
    from nfsearch.graph import split_layers
    from nfsearch.plan import SolverInfo
    from nfsearch.search.baselines import equal_sizes
    from nfsearch.search.listsched import list_order, timed
    sizes = {name: equal_sizes(*problem.layer.nodes[name]["token_range"], num_batches, chunk)
             for name in problem.layer.nodes}
    nano = split_layers(problem.layer, sizes, problem.num_layers, problem.workload)
    side = problem.gpu.num_sms - compute_sms
    placement = {n: ("compute", compute_sms) if problem.cost.op_class(n.op) == "compute" else ("side", side)
                 for n in nano.nodes}
    dur = {n: problem.cost.solo_ms(n.op, n.num_tokens, placement[n][1]) for n in nano.nodes}
    order = list_order(nano, dur, lambda n: placement[n][0])
    return timed(problem, nano, placement, order,
                 SolverInfo(f"two-stream-split-{num_batches}", note=f"compute on {compute_sms} SMs, the rest on "
                            f"{side}: made by tests/gpu/test_tp_nccl.py for execution tests"))


def split_plan():
    gpu = load_gpu("h100-sxm")
    problem = make_problem(MODEL, WORKLOAD, analytic_profile(MODEL, WORKLOAD, gpu), 2, allow_extrapolation=True)
    return two_stream_plan(problem, 96, 2, chunk=16)


@pytest.mark.parametrize("impls", ["torch", "fast"])
def test_tp2_split_plan_matches_tp1_and_is_timed(tmp_path, impls):
    from nfsearch.runtime import tp
    schedule = split_plan()
    assert {o.stream for o in schedule.nano_ops if o.op.startswith("allreduce")} == {"side"}
    path, out = tmp_path / "plan.json", tmp_path / "report.json"
    plan_mod.write(schedule, path)
    tp.spawn_ranks(tp._run_worker, 2, "nccl",
                   (str(path), str(out), {"impls": impls, "iters": 5, "repeats": 2, "with_ceilings": False}))
    report = tp._read_json(str(out))
    assert "error" not in report, report.get("error")
    c = report["correctness"]
    assert c["passed"] and len(c["per_rank"]) == 2, c
    assert report["plan_run"]["how"] == "cuda-graph", report["notes"]
    assert report["measured_layer_ms"] > 0 and report["net"]["bus_gbps"] > 0
    assert set(report["baselines"]) == {"seq_torch", "seq_same"}
    assert report["env"]["NCCL_NVLS_ENABLE"] == "0"
    assert len(report["per_rank_plan_ms"]) == 2


def test_tp_plans_are_timed_against_each_other_on_two_gpus():
    # tune's interleaved timing under TP: both ranks capture each plan's graph and time them in the
    # same order (the all-reduces inside pair up), each plan checked against the TP=1 reference first
    from nfsearch.runtime import tp
    from nfsearch.search.baselines import sequential_plan
    split = split_plan()
    problem = make_problem(MODEL, WORKLOAD, analytic_profile(MODEL, WORKLOAD, load_gpu("h100-sxm")), 2,
                           allow_extrapolation=True)
    timings, notes = tp.time_plans({"split": split, "sequential": sequential_plan(problem)}, iters=5, repeats=3)
    assert not notes and set(timings) == {"split", "sequential"}
    assert all(t.how == "cuda-graph" and len(t.repeat_layer_ms) == 3 and t.layer_ms > 0 for t in timings.values())
