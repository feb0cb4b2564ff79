"""`nfsearch profile --tp N`: the network plan, the merge of the shard's table with the collectives'
rows and pairs, what the cost model then reads, the refusal without GPUs, the rank loop across two
gloo processes, and (GPU, >= 2 CUDA GPUs) a tiny --quick TP profile.

Timings here are TEST DATA: hand-made all-reduce times (a 200 GB/s bus plus 10 us) and
measurements.fake_measure's jittered roofline (source "fake"); none is a measurement of a GPU.
"""

import sys

import pytest
from click.testing import CliRunner

from nfsearch import pairs as pair_table
from nfsearch.cli import main
from nfsearch.cost import SRC_CURVES, SRC_CURVES_FALLBACK, Partner, make_problem
from nfsearch.graph import layer_ops, op_work
from nfsearch.profile import gpu_from_profile, load
from nfsearch.runtime import measurements as m
from nfsearch.runtime import tp_profile as tpp
from nfsearch.specs import ModelSpec, Workload, load_model, load_workload

LLAMA70 = load_model("llama-3-70b")
W4 = load_workload("W4")
TINY = ModelSpec("tiny-tp", 256, 4, 2, 64, 512, 2, 1000)
TINY_WL = Workload("tiny tp2", 64, 256, (64,), tp_degree=2)
DEVICE = {"gpu_name": "NVIDIA H100 80GB HBM3", "source": "fake"}
BUS_GBPS, LATENCY_MS = 200.0, 0.010          # the hand-made all-reduce: bus bytes / 200 GB/s + 10 us


def _allreduce_ms(model, workload, op, tokens, sms, num_sms=132):
    """Hand-made: full speed from 64 SMs up, half speed on 16 (so the SM count matters)."""
    net = op_work(next(o for o in layer_ops(model, workload) if o.name == op), model, workload, tokens, 0).net_bytes
    return net / (BUS_GBPS * 1e6) * (1.0 if sms >= 64 else 2.0) + LATENCY_MS


def _network_results(plan):
    """Solo rows from the hand-made all-reduce; pair points from fake_measure."""
    fake = m.fake_measure(plan, seed=3)
    out = {}
    for p in plan.points:
        if p.kind == "solo":
            out[p.key()] = m.Measurement(_allreduce_ms(plan.model, plan.workload(), p.op, p.num_tokens, p.sm_count))
        else:
            out[p.key()] = fake(p)
    return out


def _shard(model=LLAMA70, workload=W4):
    plan = m.make_plan(model, workload, 132, 8, is_quick=True)
    results, failures = m.run_plan(plan, None, m.fake_measure(plan))
    return m.assemble_table(plan, results, DEVICE, failures)


def _merged(model=LLAMA70, workload=W4, results=None):
    plan = m.network_plan(model, workload, 132, 8, is_quick=True)
    results = _network_results(plan) if results is None else results
    run = tpp.NetworkRun(plan, results, {}, "", ["NVIDIA H100 80GB HBM3"] * 2, "nccl", "2.28.9", [16])
    return tpp.merge_tables(_shard(model, workload), tpp.network_table(run, "fake"), run, model, workload), plan


# ---- the plan -------------------------------------------------------------------------------------

def test_network_plan_measures_collectives_alone_and_beside_every_gemm():
    plan = m.network_plan(LLAMA70, W4, 132, 8, is_quick=True)
    solo = [p for p in plan.points if p.kind == "solo"]
    pairs = plan.pair_points()
    assert {p.kind for p in plan.points} == {"solo", "pair"}
    assert {(p.op, p.impl) for p in solo} == {("allreduce_o", "nccl"), ("allreduce_d", "nccl")}
    assert {p.sm_count for p in solo} == {16, 64, 132} and {p.num_tokens for p in solo} == {128, 512, 2048}
    # GEMM on side A, collective on side B, at the pair table's quick GEMM size and splits
    assert {(p.op, p.partner_op) for p in pairs} == {(g, n) for g in ("kqv", "o", "ug", "d")
                                                     for n in ("allreduce_o", "allreduce_d")}
    assert {(p.sm_count, p.partner_sms) for p in pairs} == {(16, 116), (116, 16), (48, 84), (84, 48)}
    assert all(p.co_class == "network" and p.num_tokens == p.partner_tokens == 2048 for p in pairs)
    assert plan.pair_impls("allreduce_o") == ("nccl",)
    # the communicators `nfsearch run` would prepare for these SM counts
    assert tpp.cta_limits(plan, 32) == [16]
    assert not m.network_plan(LLAMA70, W4, 132, 8, is_quick=True, with_pairs=False).pair_points()
    with pytest.raises(Exception, match="tensor parallelism"):
        m.network_plan(LLAMA70, load_workload("W2"), 132, 8)


def test_the_estimate_counts_the_network_at_nvlink_speed():
    plan = m.network_plan(LLAMA70, W4, 132, 8, is_quick=True)
    # an all-reduce of 2048 x 8192 bf16 on the whole GPU: ~0.2 ms measured (GPU_FACTS.md)
    assert 0.1 < m.estimate_ms(plan, "allreduce_o", "nccl", 2048, 0, 132) < 0.4
    assert m.estimate_ms(plan, "allreduce_o", "nccl", 2048, 0, 16) > m.estimate_ms(plan, "allreduce_o", "nccl", 2048, 0, 132)
    assert 1.0 < plan.estimate_s() < 30.0


def test_combine_ranks_keeps_the_slowest_rank_and_common_points():
    a, b, c = ("solo", "x", 1), ("solo", "y", 1), ("solo", "z", 1)
    rank0 = {a: m.Measurement(0.20), b: m.Measurement(0.30), c: m.Measurement(0.1)}
    rank1 = {a: m.Measurement(0.25), b: m.Measurement(0.10)}
    got = m.combine_ranks([rank0, rank1])
    assert got == {a: rank1[a], b: rank0[b]}


# ---- the merged table and the cost model ---------------------------------------------------------------

def test_merged_table_has_measured_network_rows_and_bus_bandwidth(tmp_path):
    table, plan = _merged()
    net = table.rows[table.rows["op"].str.startswith("allreduce")]
    assert set(net["impl"]) == {"nccl"} and set(net["co_class"]) == {""}
    assert len(net) == len([p for p in plan.points if p.kind == "solo"])
    # shard rows untouched, collectives added
    assert {"kqv", "decode_attn", "prefill_attn", "ug", "d"} <= set(table.rows["op"])
    meta = table.meta
    assert meta["source"] == "fake" and meta["tp_degree"] == 2 and meta["gpus"] == ["NVIDIA H100 80GB HBM3"] * 2
    assert meta["network"]["nccl"] == "2.28.9" and meta["network"]["cta_limits"] == [16]
    # 2048 x 8192 bf16 at TP=2: 33.5 MB of bus bytes / (bytes / 200 GB/s + 10 us)
    net_bytes = 2048 * 8192 * 2
    assert meta["net_bandwidth_gbps"] == pytest.approx(net_bytes / (net_bytes / 200e6 + LATENCY_MS) / 1e6, rel=1e-3)
    assert gpu_from_profile(table).net_bandwidth_gbps == meta["net_bandwidth_gbps"]
    # one pair table: the shard's pairs and the collective x GEMM pairs
    points = pair_table.points_from_meta(meta)
    net_points = [p for p in points if pair_table.is_network_family(p.a, p.b)]
    assert len(net_points) == len(plan.pair_points()) and len(points) > len(net_points)
    assert {p.impl_b for p in net_points} == {"nccl"}
    table.write(tmp_path / "tp.parquet")
    again = load(tmp_path / "tp.parquet")
    assert again.fingerprint() == table.fingerprint() and again.meta["network"] == meta["network"]


def test_cost_model_reads_network_ops_from_the_measured_rows_and_pairs():
    table, _ = _merged()
    problem = make_problem(LLAMA70, W4, table, 2)
    cost = problem.cost
    assert cost.impl("allreduce_o", 2048, 16) == "nccl"
    assert cost.solo_ms("allreduce_d", 2048, 132) == pytest.approx(
        _allreduce_ms(LLAMA70, W4, "allreduce_d", 2048, 132), rel=1e-9)
    # interpolated between the measured 16 and 64 SMs, not from a curve
    assert _allreduce_ms(LLAMA70, W4, "allreduce_o", 1024, 64) < cost.solo_ms("allreduce_o", 1024, 32) < \
        _allreduce_ms(LLAMA70, W4, "allreduce_o", 1024, 16)
    for net, gemm in (("allreduce_o", "ug"), ("allreduce_d", "kqv")):
        _, source = cost.stretch(net, 2048, 16, Partner(gemm, 2048, 116))
        assert source.startswith("pair table") and source not in (SRC_CURVES, SRC_CURVES_FALLBACK)
        _, source = cost.stretch(gemm, 2048, 116, Partner(net, 2048, 16))
        assert source.startswith("pair table")
    assert problem.gpu.net_bandwidth_gbps == table.meta["net_bandwidth_gbps"]
    assert problem.bound_ms > 0


def test_a_plan_solved_on_the_merged_table_runs_its_collectives_as_nccl(tmp_path):
    from nfsearch import plan as plan_mod
    from nfsearch import search
    table, _ = _merged()
    problem = make_problem(LLAMA70, W4, table, 2)
    schedule, _ = search.solve(problem, time_limit_s=1.0, threads=1)
    nets = [o for o in schedule.nano_ops if o.op.startswith("allreduce")]
    assert nets and {o.impl for o in nets} == {"nccl"}
    assert sum(problem.cost.source_counts[s] for s in (SRC_CURVES, SRC_CURVES_FALLBACK)) == 0
    plan_mod.write(schedule, tmp_path / "plan.json")
    assert plan_mod.read(tmp_path / "plan.json").workload.tp_degree == 2


def test_copy_engine_rows_are_chosen_where_they_are_faster_and_the_plan_carries_them(tmp_path):
    """Hand-made "ce" rows: the copy engines' speed whatever the SM share (150 GB/s of bus bytes +
    15 us), against NCCL at half speed below 64 SMs: the cost model takes ce on small shares and nccl
    on the whole GPU, and a solved plan's network nano-ops carry the impl the executor runs."""
    from nfsearch import plan as plan_mod
    from nfsearch import search
    from nfsearch.runtime import launch as launch_mod
    from nfsearch.runtime.tp import ce_rows
    plan = m.network_plan(LLAMA70, W4, 132, 8, is_quick=True, net_impls=("nccl", "ce"))
    solo = [p for p in plan.points if p.kind == "solo"]
    assert {p.impl for p in solo} == {"nccl", "ce"}
    assert {(p.op, p.num_tokens, p.sm_count) for p in solo if p.impl == "ce"} == \
        {(p.op, p.num_tokens, p.sm_count) for p in solo if p.impl == "nccl"}
    results = _network_results(plan)
    for p in solo:
        if p.impl == "ce":
            net = op_work(next(o for o in layer_ops(LLAMA70, W4) if o.name == p.op), LLAMA70, W4, p.num_tokens,
                          0).net_bytes
            results[p.key()] = m.Measurement(net / 150e6 + 0.015)
    run = tpp.NetworkRun(plan, results, {}, "", ["NVIDIA H100 80GB HBM3"] * 2, "nccl", "2.28.9", [16],
                         net_impls=("nccl", "ce"))
    table = tpp.merge_tables(_shard(), tpp.network_table(run, "fake"), run, LLAMA70, W4)
    assert table.meta["network"]["impls"] == ["nccl", "ce"]
    # B_net stays NCCL's (the roofline's bus bandwidth), whatever the ce rows say
    net_bytes = 2048 * 8192 * 2
    assert table.meta["net_bandwidth_gbps"] == pytest.approx(net_bytes / (net_bytes / 200e6 + LATENCY_MS) / 1e6,
                                                             rel=1e-3)
    problem = make_problem(LLAMA70, W4, table, 2)
    assert problem.cost.impl("allreduce_o", 2048, 16) == "ce"
    assert problem.cost.impl("allreduce_o", 2048, 132) == "nccl"
    schedule, _ = search.solve(problem, time_limit_s=1.0, threads=1)
    plan_mod.write(schedule, tmp_path / "plan.json")
    again = plan_mod.read(tmp_path / "plan.json")
    nets = [o for o in again.nano_ops if o.op.startswith("allreduce")]
    for o in nets:
        assert o.impl == problem.cost.impl(o.op, o.tokens[1] - o.tokens[0], o.sm_count), o
    ll = launch_mod.build(again)
    assert sum(len(r) for r in ce_rows([ll], "cuda").values()) == len([o for o in nets if o.impl == "ce"])


def test_analyze_pairs_tp_reports_the_collective_families(tmp_path):
    table, _ = _merged()
    table.write(tmp_path / "tp.parquet")
    text = pair_table.analyze_pairs(str(tmp_path / "tp.parquet"), str(tmp_path / "pairs.json"), 2)
    assert "collectives x GEMMs" in text and "ug 2048 tok x allreduce_o 2048 tok" in text
    report = pair_table.make_report(pair_table.points_from_meta(table.meta), True)
    assert len(report.families) == 8 and report.is_network


def test_report_of_a_gpu_run_reads_what_each_step_wrote(tmp_path):
    import json
    table, plan = _merged()
    run = tpp.NetworkRun(plan, {}, {}, "", ["NVIDIA H100 80GB HBM3"] * 2, "nccl", "2.28.9", [16])
    table.write(tmp_path / "x.parquet")
    (tmp_path / "x.summary.json").write_text(json.dumps({"network": tpp.network_summary(table, run), "wall_s": 99}))
    pair_table.analyze_pairs(str(tmp_path / "x.parquet"), str(tmp_path / "pairs.json"), 2)
    (tmp_path / "steps.txt").write_text("profile 0 95\nanalyze 0 2\nsolve 0 14\nrun 2 30\n")
    data, text = tpp.report_steps(tmp_path)
    assert [s["step"] for s in data["steps"]] == ["profile", "analyze", "solve", "run"] and data["steps"][3]["rc"] == 2
    assert data["profile_wall_s"] == 99 and data["run"] is None and data["plan_predicted"] is None
    assert "bus " in text and "of 8" in text and "run:" not in text
    assert data["network"]["bus_bandwidth_gbps"] == table.meta["net_bandwidth_gbps"]


def test_merge_refuses_other_gpus_and_an_empty_network_part():
    shard = _shard()
    plan = m.network_plan(LLAMA70, W4, 132, 8, is_quick=True)
    run = tpp.NetworkRun(plan, _network_results(plan), {}, "", ["a", "b"], "nccl", None, [])
    other = m.network_plan(LLAMA70, W4, 114, 2, is_quick=True, with_pairs=False)
    run_other = tpp.NetworkRun(other, _network_results(other), {}, "", ["a", "b"], "nccl", None, [])
    with pytest.raises(Exception, match="not one kind of GPU"):
        tpp.merge_tables(shard, tpp.network_table(run_other, "fake"), run_other, LLAMA70, W4)
    # every solo row failed: only pairs left, no collective rows to merge
    only_pairs = {k: v for k, v in _network_results(plan).items() if k[0] == "pair"}
    with pytest.raises(Exception, match="nothing was measured|no collective"):
        broken = tpp.NetworkRun(plan, only_pairs, {}, "", ["a", "b"], "nccl", None, [])
        tpp.merge_tables(shard, tpp.network_table(broken, "fake"), broken, LLAMA70, W4)
    assert tpp.merge_tables(shard, tpp.network_table(run, "fake"), run, LLAMA70, W4).meta["network"]["nccl"] is None


# ---- the command line ----------------------------------------------------------------------------------

def test_profile_tp_without_enough_gpus_is_one_line(tmp_path):
    with pytest.raises(Exception, match="needs 4 GPUs; this host has 1"):
        tpp.check_gpus(4, 1)
    tpp.check_gpus(2, 2)
    if tpp.count_gpus() >= 2:
        pytest.skip("this host has the GPUs: the refusal cannot be seen here")
    for args, n in ((("--workload", "W4"), 2), (("--model", "llama-3-70b", "--decode", "64", "--tp", "4"), 4)):
        result = CliRunner().invoke(main, ["profile", *args, "--quick", "-o", str(tmp_path / "x.parquet")])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("nfsearch: error:")]
        want = f"nfsearch: error: nfsearch profile --tp {n} needs {n} GPUs; this host has {tpp.count_gpus()}"
        assert errors == [want], result.output
        assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_profile_tp_analytic_still_works(tmp_path):
    result = CliRunner().invoke(main, ["profile", "--analytic", "--workload", "W6", "-o", str(tmp_path / "a.parquet")])
    assert result.exit_code == 0, result.output
    table = load(tmp_path / "a.parquet")
    assert table.is_analytic and table.meta["tp_degree"] == 4 and "allreduce_o" in set(table.rows["op"])


# ---- the rank loop across two processes (gloo) ----------------------------------------------------------

def test_rank_loop_runs_across_two_gloo_processes():
    """Two CPU processes walk the network plan in lockstep with real gloo all-reduces; rank 0 hands
    back every point (timings are host-clock numbers of a CPU: meaningless, the plumbing is the test)."""
    request = tpp.NetworkRequest(TINY, TINY_WL, True, True, m.Settings(1, 3, 2, 3), (16, 132), (16,))
    run = tpp.measure_network(request, "gloo")
    plan = run.plan
    assert run.gpus == ["cpu", "cpu"] and run.backend == "gloo" and not run.failures and not run.stopped
    assert set(run.results) == {p.key() for p in plan.points}
    assert {p.kind for p in plan.points} == {"solo", "pair"} and len(plan.pair_points()) == 16
    assert all(v.time_ms > 0 for v in run.results.values())
    table = tpp.merge_tables(_shard(TINY, TINY_WL), tpp.network_table(run, "fake"), run, TINY, TINY_WL)
    assert {"allreduce_o", "allreduce_d"} <= set(table.rows["op"])
    assert table.meta["network"]["backend"] == "gloo"
    # both collective impls alone at every SM count (gloo runs "ce" through the same receive layout)
    net = table.rows[table.rows["op"] == "allreduce_o"]
    assert set(net["impl"]) == {"nccl", "ce"} and table.meta["network"]["impls"] == ["nccl", "ce"]
    assert set(net[net["impl"] == "ce"]["sm_count"]) == set(net[net["impl"] == "nccl"]["sm_count"])
    assert len([p for p in pair_table.points_from_meta(table.meta) if p.b.op_class == "network"]) == 16


def test_a_request_without_nccl_or_with_an_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="must include nccl"):
        tpp.NetworkRequest(TINY, TINY_WL, net_impls=("ce",))
    with pytest.raises(ValueError, match="must include nccl"):
        tpp.NetworkRequest(TINY, TINY_WL, net_impls=("nccl", "ucx"))


def test_profile_net_impls_is_checked_before_anything_runs(tmp_path):
    r = CliRunner().invoke(main, ["profile", "--model", "llama-3-70b", "--workload", "W4", "--net-impls", "ce",
                                  "-o", str(tmp_path / "x.parquet")])
    assert r.exit_code == 2 and "--net-impls must list nccl" in r.output
    assert not (tmp_path / "x.parquet").exists()


def test_a_failing_rank_fails_the_request_in_one_line():
    # TP=2 on CPU ranks whose planned SM grid has no such count: every rank refuses the plan
    request = tpp.NetworkRequest(TINY, TINY_WL, True, False, m.Settings(1, 3, 2, 3), (20,))
    with pytest.raises(Exception, match="measuring the collectives failed: .*not partition sizes"):
        tpp.measure_network(request, "gloo")


# ---- on the GPU -------------------------------------------------------------------------------------------

def _cuda_gpus() -> int:
    return tpp.count_gpus()


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_gpus() < 2, reason="needs 2 CUDA GPUs")
def test_tiny_quick_tp_profile_on_two_gpus(tmp_path):
    out = tmp_path / "tp.parquet"
    table = tpp.measure_tp_profile(TINY, TINY_WL, 2, is_quick=True, output=str(out), with_pairs=True,
                                   pair_minority_sms=(16,), log=lambda msg: print(msg, file=sys.stderr))
    assert out.is_file() and (tmp_path / "tp.summary.json").is_file()
    assert not m.checkpoint_path(out).exists()
    got = load(out)
    assert got.meta["source"] == "measured" and len(got.meta["gpus"]) == 2 and got.meta["network"]["nccl"]
    net = got.rows[got.rows["op"].str.startswith("allreduce")]
    assert set(net["impl"]) == set(got.meta["network"]["impls"]) and (net["time_ms"] > 0).all()
    assert "nccl" in set(net["impl"])
    assert got.meta["net_bandwidth_gbps"] > 1.0
    points = [p for p in pair_table.points_from_meta(got.meta) if pair_table.is_network_family(p.a, p.b)]
    assert points and all(p.makespan_ms > 0 for p in points)
    assert table.fingerprint() == got.fingerprint()
