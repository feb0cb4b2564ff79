"""Tensor parallelism on the CPU: shard shapes, the layer's collectives, TP plans that verify, the
analytic network co-run rows, and a two-process gloo run of a TP=2 plan against the TP=1 output."""

from pathlib import Path

import pytest

from nfsearch import plan as plan_mod
from nfsearch.cost import make_problem
from nfsearch.errors import NfsearchError
from nfsearch.graph import build_layer, layer_ops, op_work, split_layers, tp_shard
from nfsearch.roofline import NET_CORUN_FRACTION, analytic_profile, interp, op_time_ms
from nfsearch.search.baselines import equal_split_plan
from nfsearch.simulate import verify
from nfsearch.specs import ModelSpec, Workload, load_gpu, load_model, load_workload

PLANS = Path(__file__).resolve().parent / "fixtures" / "plans"
TINY = ModelSpec("tiny-tp", 64, 4, 2, 16, 128, 2, 1000)
TINY_WL = Workload("tiny-tp2", 6, 40, (20, 13), tp_degree=2)
BATCH = dict(num_decode=64, decode_context=256, prefill_lengths=(128,))


@pytest.mark.parametrize("model_name", ["llama-3-70b", "llama-2-70b"])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_shard_shapes_add_up_to_the_whole_layer(model_name, tp):
    model = load_model(model_name)
    shard = tp_shard(model, tp)
    shapes = shard.weight_shapes()
    H, I = model.hidden_size, model.intermediate_size
    assert shard.num_heads * tp == model.num_heads and shard.num_kv_heads * tp == model.num_kv_heads
    # column-parallel: the whole reduction dim, 1/tp of the columns; row-parallel: the reverse
    assert shapes["wqkv"] == (H, (model.q_size + 2 * model.kv_size) // tp)
    assert shapes["wug"] == (H, 2 * I // tp)
    assert shapes["wo"] == (model.q_size // tp, H) and shapes["wd"] == (I // tp, H)
    assert shard.collectives() == (("allreduce_o", "allreduce_d") if tp > 1 else ())
    ops = {op.name: op for op in layer_ops(model, Workload("b", tp_degree=tp, **BATCH))}
    assert (ops["kqv"].gemm_k, ops["kqv"].gemm_n) == shapes["wqkv"]
    assert (ops["o"].gemm_k, ops["o"].gemm_n) == shapes["wo"]
    assert (ops["d"].gemm_k, ops["d"].gemm_n) == shapes["wd"]


def test_counts_tp_does_not_divide_are_refused():
    with pytest.raises(NfsearchError, match="key/value heads are not divisible by TP=16"):
        layer_ops(load_model("llama-3-70b"), Workload("b", tp_degree=16, **BATCH))
    with pytest.raises(NfsearchError, match="attention heads are not divisible by TP=3"):
        layer_ops(load_model("llama-3-70b"), Workload("b", tp_degree=3, **BATCH))
    odd_ffn = ModelSpec("odd-ffn", 64, 4, 2, 16, 129, 2, 1000)
    with pytest.raises(NfsearchError, match=r"FFN columns \(intermediate_size\) are not divisible by TP=2"):
        build_layer(odd_ffn, Workload("b", tp_degree=2, **BATCH))


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_collectives_follow_the_row_parallel_gemms(tp):
    model = load_model("llama-2-70b")
    wl = Workload("b", tp_degree=tp, **BATCH)
    g = build_layer(model, wl)
    net = [n for n in g if g.nodes[n]["op"].op_class == "network"]
    assert net == ["allreduce_o", "allreduce_d"]
    assert list(g.successors("o")) == ["allreduce_o"] and list(g.successors("allreduce_o")) == ["norm2"]
    assert list(g.predecessors("allreduce_d")) == ["d"] and g.out_degree("allreduce_d") == 0
    work = op_work(g.nodes["allreduce_o"]["op"], model, wl, 2048, 0)
    assert work.flops == 0 and work.net_bytes == pytest.approx(2 * (tp - 1) / tp * 2 * 2048 * model.hidden_size)
    # nano-ops of a collective read only the rows the row-parallel GEMM's nano-ops wrote
    nano = split_layers(g, {"o": (96, 96), "allreduce_o": (64, 128)}, 1, wl)
    ar = sorted(n for n in nano if n.op == "allreduce_o")
    assert [sorted(p.index for p in nano.predecessors(n)) for n in ar] == [[0], [0, 1]]


def test_analytic_network_corun_is_measured_not_the_a100_curve():
    model, wl = load_model("llama-3-70b"), load_workload("W4")
    gpu = load_gpu("h100-sxm")
    profile = analytic_profile(model, wl, gpu)
    problem = make_problem(model, wl, profile, 1)
    op = next(o for o in layer_ops(model, wl) if o.name == "allreduce_o")
    for sms in (8, 16, 24):
        solo = op_time_ms(op, model, wl, gpu, 2048, 0, sms)
        want = max(solo, op_work(op, model, wl, 2048, 0).net_bytes
                   / (gpu.net_bandwidth_gbps * 1e6 * interp(NET_CORUN_FRACTION, sms)) + 0.010)
        got = problem.cost.corun_ms("allreduce_o", 2048, sms, "compute")
        assert got == pytest.approx(want, rel=1e-6)
        full = problem.cost.solo_ms("allreduce_o", 2048, gpu.num_sms)
        a100 = problem.cost.interference.corun_ms("network", solo, full, sms / gpu.num_sms)
        assert got < a100            # the A100 curve would charge the share twice
    assert profile.meta["corun_source"].startswith("analytic")
    assert not analytic_profile(model, Workload("one", **BATCH), gpu).has_corun()   # TP=1 tables unchanged


@pytest.mark.parametrize("name", ["W4", "W5", "W6", "W4-split", "W6-split"])
def test_stored_tp_plans_verify(name):
    schedule = plan_mod.read(PLANS / f"{name}.json")
    verify(schedule)
    assert schedule.workload.tp_degree == {"W4": 2, "W5": 8, "W6": 4}[name.split("-")[0]]
    ops = {o.op for o in schedule.nano_ops}
    assert {"allreduce_o", "allreduce_d"} <= ops
    assert schedule.profile.source == "analytic"


def tiny_tp_plan(batches: int = 2, workload: Workload = TINY_WL):
    problem = make_problem(TINY, workload, analytic_profile(TINY, workload, load_gpu("h100-sxm")), 2,
                           allow_extrapolation=True)
    return equal_split_plan(problem, batches)      # executed, not verified: its four class streams may
                                                    # ask more side-by-side groups than a device builds


def test_tiny_plan_has_split_collectives():
    s = tiny_tp_plan(2)
    ar = [o for o in s.nano_ops if o.op.startswith("allreduce")]
    assert len(ar) == 2 * 2 * 2 and all(o.op_class == "network" for o in ar)
    assert {tuple(o.tokens) for o in ar if o.op == "allreduce_o"} == {(0, 20), (20, 39)}


# ---------------------------------------------------------------------------------------------- gloo
torch = pytest.importorskip("torch")


def _gloo_run(tmp_path, schedule, **kwargs):
    from nfsearch.runtime import tp as tp_mod
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    plan_path, out = tmp_path / "plan.json", tmp_path / "report.json"
    plan_mod.write(schedule, plan_path)
    tp_mod.spawn_ranks(tp_mod._run_worker, schedule.workload.tp_degree, "gloo",
                       (str(plan_path), str(out), kwargs))
    return tp_mod._read_json(str(out))


@pytest.mark.slow
def test_gloo_tp2_plan_matches_tp1_output(tmp_path):
    # ranks draw different weights; rank 0's are broadcast, so the check still runs on one model
    report = _gloo_run(tmp_path, tiny_tp_plan(2), time_on_cpu=True, iters=2, repeats=3, rank_seed_step=1)
    c = report["correctness"]
    assert c["passed"] and len(c["per_rank"]) == 2
    assert c["max_rel_error"] < 1e-4, c
    seen = {(e["layer"], e["buffer"]) for e in report["correctness_per_buffer"]}
    assert {(1, "out"), (0, "mid"), (1, "ug"), (0, "attn")} <= seen
    assert report["env"]["NCCL_NVLS_ENABLE"] == "0"
    # the report the GPU run writes, timed here by the host clock: plan, TP baselines, network term
    assert len(report["plan_run"]["repeat_ms"]) == 3 and report["plan_run"]["how"] == "eager"
    assert set(report["baselines"]) == {"seq_torch", "seq_same"}
    assert report["baselines"]["seq_torch"]["impls"]["allreduce_o"] == "nccl"
    assert report["measured_layer_ms"] > 0 and len(report["per_rank_plan_ms"]) == 2
    assert report["net"]["bus_gbps"] > 0 and report["net"]["world_size"] == 2
    assert report["speedup_vs_seq_torch"] > 0 and report["predicted_layer_ms"] > 0
    assert "bound_ms" not in report          # no ceilings are measured on a CPU


@pytest.mark.slow
def test_gloo_tp2_plan_with_copy_engine_collectives_matches_tp1_output(tmp_path):
    """Network nano-ops with impl "ce" and no SM share (sm_count 0) run through runtime.ce_collectives
    (on gloo: the same receive layout and summation order, rows gathered instead of copied), in the
    plan and in seq-same."""
    import dataclasses
    schedule = tiny_tp_plan(2)
    ops = tuple(dataclasses.replace(o, impl="ce", sm_count=0) if o.op_class == "network" else o
                for o in schedule.nano_ops)
    report = _gloo_run(tmp_path, dataclasses.replace(schedule, nano_ops=ops), time_on_cpu=True, iters=2, repeats=2)
    c = report["correctness"]
    assert c["passed"] and c["max_rel_error"] < 1e-4, c
    assert report["plan_run"]["impls"]["allreduce_o"] == "ce" and report["plan_run"]["impls"]["allreduce_d"] == "ce"
    assert report["baselines"]["seq_same"]["impls"]["allreduce_d"] == "ce"
    assert report["baselines"]["seq_torch"]["impls"]["allreduce_d"] == "nccl"


def test_ce_rows_are_the_network_launches_with_impl_ce():
    import dataclasses
    from nfsearch.runtime import launch as launch_mod
    from nfsearch.runtime.tp import ce_rows
    schedule = tiny_tp_plan(2)
    ops = tuple(dataclasses.replace(o, impl="ce") if o.op == "allreduce_o" else o for o in schedule.nano_ops)
    ll = launch_mod.build(dataclasses.replace(schedule, nano_ops=ops))
    rows = ce_rows([ll], "cuda")
    assert set(rows) == {"allreduce_o"} and set(rows["allreduce_o"]) == {(0, 20), (20, 39)}
    assert ce_rows([launch_mod.build(schedule)], "cuda") == {}


def test_apply_tp_shards_weights_and_caches():
    import dataclasses
    from nfsearch.runtime.collectives import Collectives
    from nfsearch.runtime.model import ModelInstance
    from nfsearch.runtime.tp import TpRank, apply_tp
    full = ModelInstance(TINY, dataclasses.replace(TINY_WL, tp_degree=1), 1, dtype=torch.float32)
    shard = tp_shard(TINY, 2)
    for rank in (0, 1):
        fake_rank = TpRank.__new__(TpRank)             # no process group: only rank and size are read
        fake_rank.rank, fake_rank.world_size, fake_rank.device = rank, 2, torch.device("cpu")
        fake_rank.coll = Collectives.__new__(Collectives)
        m = apply_tp(full, fake_rank, TINY_WL)
        w = m.layers[0]
        assert {k: tuple(getattr(w, k).shape) for k in shard.weight_shapes()} == shard.weight_shapes()
        assert m.kv_cache[0][0].shape[2] == shard.num_kv_heads
        # rank r's O rows are the whole layer's rows of its heads
        assert torch.equal(w.wo, full.layers[0].wo[rank * shard.q_size:(rank + 1) * shard.q_size])
        bufs = m.new_buffers()
        assert bufs[0]["ug"].shape[1] == 2 * shard.intermediate_size and bufs[0]["q"].shape[1] == shard.num_heads


def test_tp_baselines_put_the_collectives_on_their_one_stream():
    from nfsearch.runtime import launch as launch_mod
    from nfsearch.runtime.tp import impls_of, tp_baselines, with_impls
    schedule = with_impls(tiny_tp_plan(2), "fast")
    assert {o.impl for o in schedule.nano_ops if o.op == "ug"} == {"tma"}
    assert {o.impl for o in schedule.nano_ops if o.op == "allreduce_d"} == {"analytic"}   # collectives kept
    ll = launch_mod.build(schedule)
    base = tp_baselines(schedule, ll, 132, "cuda")
    for name, bl in base.items():
        ops = [l.op for l in bl.launches if l.layer == 0]
        assert ops.index("allreduce_o") == ops.index("o") + 1 and ops[-1] == "allreduce_d", (name, ops)
        assert len({l.stream for l in bl.launches}) == 1 and all(l.sms == 132 for l in bl.launches)
    assert impls_of(base["seq_torch"], "cuda")["ug"] == "torch"
    assert impls_of(base["seq_same"], "cuda")["ug"] == "tma"          # the plan's own kernels
    assert impls_of(base["seq_same"], "cuda")["allreduce_o"] == "nccl"
    with pytest.raises(NfsearchError, match="impls must be one of"):
        with_impls(schedule, "cublas")


@pytest.mark.slow
def test_tune_runs_tp_candidates_and_keeps_the_fastest_correct_one(tmp_path):
    """tune's TP path with gloo ranks on the CPU (host-clock timings): every candidate runs through the
    same rank code as `nfsearch run`, checked against the TP=1 reference; the fastest is kept."""
    import dataclasses
    from nfsearch import tune
    from nfsearch.runtime import tp as tp_mod
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")

    def run_plan_on_gloo(plan_path, **kwargs):
        out = tmp_path / "report.json"
        tp_mod.spawn_ranks(tp_mod._run_worker, 2, "gloo",
                           (plan_path, str(out), {**kwargs, "time_on_cpu": True, "repeats": 2}))
        report = tp_mod._read_json(str(out))
        if not report["correctness"]["passed"]:
            raise NfsearchError("output differs from the TP=1 reference")
        return report

    split = tiny_tp_plan(2)
    ce = dataclasses.replace(split, nano_ops=tuple(dataclasses.replace(o, impl="ce", sm_count=0)
                                                   if o.op_class == "network" else o for o in split.nano_ops))
    candidates = [tune.Candidate("nccl", split), tune.Candidate("ce", ce)]
    trials = tune.run_tp_candidates(candidates, run_plan_on_gloo, iters=2, mode="green", use_graph=False)
    assert [t.name for t in trials] == ["nccl", "ce"] and all(t.measured_layer_ms > 0 for t in trials)
    assert set(trials[0].report["baselines"]) == {"seq_torch", "seq_same"}   # timed once, with the first
    assert not trials[1].report.get("baselines")
    result = tune.pick_best(trials)
    assert result.best.measured_layer_ms == min(t.measured_layer_ms for t in trials)
    with pytest.raises(NfsearchError, match="mix tensor-parallel degrees"):
        tune.run_candidates([tune.Candidate("a", split), tune.Candidate("b", plan_mod.read(PLANS / "W2.json"))])


def test_tp_plans_are_timed_against_each_other_on_gloo_ranks():
    """runtime.tp.time_plans with two gloo ranks on the CPU (host-clock timings): one model, each plan
    checked against the TP=1 reference on every rank, then interleaved rounds in lockstep; tune then
    chooses by those times."""
    import dataclasses
    from nfsearch import tune
    from nfsearch.runtime import tp as tp_mod
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    split = tiny_tp_plan(2)
    ce = dataclasses.replace(split, nano_ops=tuple(dataclasses.replace(o, impl="ce", sm_count=0)
                                                   if o.op_class == "network" else o for o in split.nano_ops))
    timings, notes = tp_mod.time_plans({"nccl": split, "ce": ce}, backend="gloo", time_on_cpu=True, iters=2,
                                       repeats=3)
    assert not notes and set(timings) == {"nccl", "ce"}
    assert all(len(t.repeat_layer_ms) == 3 and t.layer_ms > 0 and t.how == "eager" for t in timings.values())
    # tune's TP path: the own runs (faked here) are overruled by the interleaved times
    trials = [tune.Trial("nccl", split, 1.0, {"candidate": "nccl"}), tune.Trial("ce", ce, 9.0, {"candidate": "ce"})]
    got = tune.time_against_each_other(trials, lambda plans: tp_mod.time_plans(
        plans, backend="gloo", time_on_cpu=True, iters=2, repeats=2))
    assert {t.name: t.measured_layer_ms for t in got} == {
        name: t["layer_ms"] for name, t in got[0].interleaved["timings"].items()}
    other = tiny_tp_plan(2, Workload("other", 4, 24, (10,), tp_degree=2))
    with pytest.raises(NfsearchError, match="another model, workload"):
        tp_mod.time_plans({"a": split, "b": other}, backend="gloo", time_on_cpu=True, iters=1, repeats=1)
