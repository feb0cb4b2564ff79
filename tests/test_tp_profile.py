"""`nfsearch profile --tp N`: the network plan, the merge of the shard's table with the collectives'
rows and pairs, what the cost model then reads, the refusal without GPUs, the rank loop across two
gloo processes, and (GPU, >= 2 CUDA GPUs) a tiny --quick TP profile.

Timings here are TEST DATA: hand-made all-reduce times (a 200 GB/s bus plus 10 us) and
measurements.fake_measure's jittered roofline (source "fake"); none is a measurement of a GPU.
"""

import dataclasses
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
    # GEMM or attention on side A, collective on side B, at the pair table's quick sizes and splits
    nets = ("allreduce_o", "allreduce_d")
    assert {(p.op, p.partner_op) for p in pairs} == {(a, n) for a in ("kqv", "o", "ug", "d", "decode_attn")
                                                     for n in nets}
    assert {(p.sm_count, p.partner_sms) for p in pairs} == {(16, 116), (116, 16), (48, 84), (84, 48)}
    # GEMMs from 256 tokens, and decode attention at the quick size and at W4's own batch (pair_sizes)
    assert all(p.co_class == "network" and p.partner_tokens in (256, 2048) for p in pairs)
    assert {(p.num_tokens, p.context) for p in pairs if p.op in ("kqv", "o", "ug", "d")} == {(256, 0), (2048, 0)}
    assert all(p.partner_tokens == p.num_tokens for p in pairs if p.op in ("kqv", "o", "ug", "d"))
    assert {(p.op, p.num_tokens, p.context) for p in pairs if p.op.endswith("attn")} == {
        ("decode_attn", *m.QUICK_PAIR_DECODE[0]), ("decode_attn", W4.num_decode, W4.decode_context)}
    assert plan.grid["pair_attentions"] == ["decode_attn"]
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


def _ce_merged():
    """A merged W4 table with nccl and ce collectives. Hand-made: ce alone at the whole GPU is NCCL's
    time + 20% (the copies and the sum kernel); beside a GEMM on the whole GPU, the GEMM takes 1.03x
    its time alone and the collective 1.0x (the copy engines take no SM)."""
    plan = m.network_plan(LLAMA70, W4, 132, 8, is_quick=True, net_impls=("nccl", "ce"))
    results = _network_results(plan)
    shard = _shard()
    for p in plan.points:
        if p.kind == "solo" and p.impl == "ce":
            results[p.key()] = m.Measurement(1.2 * _allreduce_ms(LLAMA70, W4, p.op, p.num_tokens, 132))
        if p.kind == "pair" and p.partner_sms == 0:
            gemm = shard.time_ms(p.op, p.num_tokens, 132, p.context)[0]     # alone, as in the table
            ce = 1.2 * _allreduce_ms(LLAMA70, W4, p.partner_op, p.partner_tokens, 132)
            results[p.key()] = m.Measurement.of_pair(plan.pair_point(
                p, "tma", "ce", corun_a_ms=1.03 * gemm, corun_b_ms=ce, makespan_ms=max(1.03 * gemm, ce),
                part_a_ms=gemm, part_b_ms=ce, full_a_ms=gemm, full_b_ms=ce))
    run = tpp.NetworkRun(plan, results, {}, "", ["NVIDIA H100 80GB HBM3"] * 2, "nccl", "2.28.9", [16],
                         net_impls=("nccl", "ce"))
    return tpp.merge_tables(shard, tpp.network_table(run, "fake"), run, LLAMA70, W4), plan


def test_the_copy_engine_collective_is_measured_as_it_runs_holding_no_sm_share():
    plan = m.network_plan(LLAMA70, W4, 132, 8, is_quick=True, net_impls=("nccl", "ce"))
    solo = [p for p in plan.points if p.kind == "solo"]
    nccl = {(p.op, p.num_tokens) for p in solo if p.impl == "nccl"}
    # ce alone only on the whole GPU (a plain stream); nccl at every SM count of the grid
    assert {(p.op, p.num_tokens, p.sm_count) for p in solo if p.impl == "ce"} == {(o, t, 132) for o, t in nccl}
    assert len({p.sm_count for p in solo if p.impl == "nccl"}) > 1
    split = [p for p in plan.pair_points() if p.partner_sms > 0]
    no_share = [p for p in plan.pair_points() if p.partner_sms == 0]
    # one no-share point per GEMM x collective family: the GEMM on the whole GPU, the collective beside
    assert {(p.op, p.partner_op) for p in no_share} == {(p.op, p.partner_op) for p in split}
    assert all(p.sm_count == 132 for p in no_share)
    assert split == m.network_plan(LLAMA70, W4, 132, 8, is_quick=True).pair_points()
    assert plan.pair_impls("allreduce_o", 0) == ("ce",) and plan.pair_impls("allreduce_o", 16) == ("nccl",)
    assert tpp.cta_limits(plan, 32) == [16]                     # no CTA limit of 0


def test_a_no_share_collective_costs_its_partner_only_the_measured_stretch(tmp_path):
    from nfsearch.pair_model import SRC_PAIRS, predict_pair
    table, _ = _ce_merged()
    assert table.meta["network"]["impls"] == ["nccl", "ce"]
    net_bytes = 2048 * 8192 * 2             # B_net stays NCCL's, whatever the ce rows say
    assert table.meta["net_bandwidth_gbps"] == pytest.approx(net_bytes / (net_bytes / 200e6 + LATENCY_MS) / 1e6,
                                                             rel=1e-3)
    table.write(tmp_path / "tp.parquet")
    table = load(tmp_path / "tp.parquet")                       # pair points of 0 SMs round-trip
    cost = make_problem(LLAMA70, W4, table, 2).cost
    ar = _allreduce_ms(LLAMA70, W4, "allreduce_o", 2048, 132)
    assert cost.has_no_share("allreduce_o") and not cost.has_no_share("kqv")
    assert cost.impl("allreduce_o", 2048, 0) == "ce" and cost.solo_ms("allreduce_o", 2048, 0) == pytest.approx(1.2 * ar)
    assert cost.impl("allreduce_o", 2048, 16) == "nccl"      # on a share: NCCL's rows
    assert cost.impl("allreduce_o", 2048, 132) == "nccl"     # alone on the whole GPU NCCL is faster here
    # the GEMM on the whole GPU beside it, from the no-share family (not the split pairs): launched
    # together the pair ends as measured, the GEMM at 1.03x its time alone, the collective at 1.0x
    s_gemm, source = cost.stretch("ug", 2048, 132, Partner("allreduce_o", 2048, 0))
    assert source == SRC_PAIRS and s_gemm > 1.0
    s_ce, source = cost.stretch("allreduce_o", 2048, 0, Partner("ug", 2048, 132))
    assert s_ce == pytest.approx(1.0, rel=1e-4) and source == SRC_PAIRS
    gemm = cost.solo_ms("ug", 2048, 132)
    end_gemm, end_ce = predict_pair(s_gemm, s_ce, gemm, 1.2 * ar)
    assert end_gemm == pytest.approx(1.03 * gemm, rel=1e-4) and end_ce == pytest.approx(1.2 * ar, rel=1e-4)
    with pytest.raises(Exception, match="cannot run on 0 SMs"):
        cost.solo_ms("ug", 2048, 0)


def test_the_search_hides_no_share_collectives_under_whole_gpu_gemms(tmp_path):
    from nfsearch import plan as plan_mod
    from nfsearch import search
    from nfsearch.runtime import launch as launch_mod
    from nfsearch.runtime.tp import ce_rows
    from nfsearch.simulate import verify
    table, _ = _ce_merged()
    problem = make_problem(LLAMA70, W4, table, 2)
    schedule, _ = search.solve(problem, time_limit_s=2.0, threads=1, min_gain=0.0)
    plan_mod.write(schedule, tmp_path / "plan.json")
    again = plan_mod.read(tmp_path / "plan.json")
    verify(again)
    nets = [o for o in again.nano_ops if o.op_class == "network"]
    no_share = [o for o in nets if o.sm_count == 0]
    assert no_share and all(o.impl == "ce" for o in no_share)
    # some copy-engine all-reduce runs beside a GEMM that holds every SM
    whole = [o for o in again.nano_ops if o.op_class == "compute" and o.sm_count == 132]
    assert any(a.start_ms < b.end_ms and b.start_ms < a.end_ms for a in no_share for b in whole)
    assert again.predicted.layer_time_ms < again.predicted.sequential_layer_time_ms
    ll = launch_mod.build(again)
    for l in ll.launches:
        if l.sm_count == 0:            # a plain stream of the whole device, in no green-context layout
            assert l.layout.build == "whole" and l.key.endswith("@all") and l.sms == 132
    assert not any("share" in n and "allreduce" in n for n in ll.notes), ll.notes
    assert sum(len(r) for r in ce_rows([ll], "cuda").values()) == len(no_share)

def test_analyze_pairs_tp_reports_the_collective_families(tmp_path):
    table, _ = _merged()
    table.write(tmp_path / "tp.parquet")
    text = pair_table.analyze_pairs(str(tmp_path / "tp.parquet"), str(tmp_path / "pairs.json"), 2)
    assert "collectives x GEMMs" in text and "ug 2048 tok x allreduce_o 2048 tok" in text
    report = pair_table.make_report(pair_table.points_from_meta(table.meta), True)
    # (4 GEMMs x 2 sizes + 2 decode batches x the 2 collective sizes) x 2 collectives
    assert len(report.families) == 24 and report.is_network


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
    assert "bus " in text and "of 24" in text and "run:" not in text
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
    # 4 GEMMs x 2 sizes x 2 collectives: on the 16+116 and 116+16 splits, and on the whole GPU beside ce
    # (no share)
    assert {p.kind for p in plan.points} == {"solo", "pair"} and len(plan.pair_points()) == 48
    assert len([p for p in plan.pair_points() if p.partner_sms == 0]) == 16
    assert all(v.time_ms > 0 for v in run.results.values())
    table = tpp.merge_tables(_shard(TINY, TINY_WL), tpp.network_table(run, "fake"), run, TINY, TINY_WL)
    assert {"allreduce_o", "allreduce_d"} <= set(table.rows["op"])
    assert table.meta["network"]["backend"] == "gloo"
    # nccl alone at every SM count, ce alone on the whole GPU (gloo runs "ce" through the same receive
    # layout and summation order)
    net = table.rows[table.rows["op"] == "allreduce_o"]
    assert set(net["impl"]) == {"nccl", "ce"} and table.meta["network"]["impls"] == ["nccl", "ce"]
    assert set(net[net["impl"] == "ce"]["sm_count"]) == {132} and set(net[net["impl"] == "nccl"]["sm_count"]) == {16, 132}
    points = [p for p in pair_table.points_from_meta(table.meta) if p.b.op_class == "network"]
    assert len(points) == 48 and {p.impl_b for p in points if p.sms_b == 0} == {"ce"}


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
                                   pair_minority_sms=(16,), log=lambda msg: print(msg, file=sys.stderr),
                                   with_energy=True, energy_window_s=0.1)
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
    # the energy (where NVML answers): the shard's ops on GPU 0, then the collectives on both GPUs at once
    from nfsearch.runtime import power
    device, _ = power.open_device(0)
    if device is not None:
        device.close()
        assert got.energy is not None and got.energy.points, "NVML answers, yet the profile has no energy"
        assert {p.op for p in got.energy.points} == {op.name for op in layer_ops(TINY, TINY_WL)}, \
            got.meta["network"]["notes"]
        assert "measured afterwards with every GPU at once" in got.energy.method
        # every pair family at its best split, sustained: the shard's on GPU 0, then the collective
        # ones (an all-reduce beside a GEMM or decode attention) on both GPUs at once
        families = {(p.a.op, p.a.num_tokens, p.b.op, p.b.num_tokens) for p in pair_table.points_from_meta(got.meta)}
        net_families = {f for f in families if f[0].startswith("allreduce") or f[2].startswith("allreduce")}
        assert net_families
        assert {(p.op_a, p.num_tokens_a, p.op_b, p.num_tokens_b) for p in got.energy.pair_points} == families, \
            (got.energy.failures, got.meta["network"]["notes"])
        assert tpp.COLLECTIVE_PAIR_ENERGY_METHOD in got.energy.method
        for p in got.energy.pair_points:
            assert p.energy_j > 0 and p.b2b_energy_j > 0 and p.time_ms > 0
        bound = make_problem(TINY, TINY_WL, got, 1).cost.power_bound()
        assert bound is not None and "counted as no dynamic energy" not in bound.note


def test_a_gemm_that_can_only_run_beside_copy_engine_collectives_keeps_the_whole_gpu():
    """Stage 1's split: ops that may run beside a share-taking op (decode attention, an NCCL
    collective) take the rest of the GPU; beside a copy-engine collective (no share) they keep it all."""
    from nfsearch.search import stage1
    from nfsearch.search.durations import Durations
    table, _ = _ce_merged()
    problem = make_problem(LLAMA70, W4, table, 2)
    halves = ("o", "allreduce_o", "norm2", "ug", "act", "d", "allreduce_d")
    whole = {n: (e - s,) for n, (s, e) in ((n, problem.layer.nodes[n]["token_range"]) for n in problem.layer.nodes)}
    sizes = tuple((n, (1024, 1024) if n in halves else whole[n]) for n in problem.layer.nodes)
    frame = stage1.make_frame(problem, stage1.Structure(sizes))
    cand = stage1.partition_candidate(problem, frame, 32, Durations(problem))
    assert cand.sms["allreduce_o#0"] == 0 and cand.sms["allreduce_d#1"] == 0
    assert cand.sms["d#1"] == 132 and cand.sms["ug#1"] == 132          # beside only collectives of no share


def test_cli_solves_and_simulates_a_plan_with_no_share_collectives(tmp_path):
    """From the CLI: a TP profile with copy-engine rows gives a plan with 0-SM all-reduces that
    simulate accepts; replayed with a table that has no ce rows it is one line, exit 2."""
    table, _ = _ce_merged()
    table.write(tmp_path / "tp.parquet")
    plan_path = tmp_path / "plan.json"
    r = CliRunner().invoke(main, ["solve", "--model", "llama-3-70b", "--workload", "W4", "--profile",
                                  str(tmp_path / "tp.parquet"), "--time-limit", "2", "--min-gain", "0",
                                  "-o", str(plan_path)])
    assert r.exit_code == 0, r.output
    from nfsearch import plan as plan_mod
    assert any(o.sm_count == 0 and o.impl == "ce" for o in plan_mod.read(plan_path).nano_ops)
    r = CliRunner().invoke(main, ["simulate", str(plan_path), "--profile", str(tmp_path / "tp.parquet"),
                                  "-o", str(tmp_path / "sim")])
    assert r.exit_code == 0 and "valid" in r.output, r.output
    nccl_only, _ = _merged()
    nccl_only.write(tmp_path / "nccl.parquet")
    r = CliRunner().invoke(main, ["simulate", str(plan_path), "--profile", str(tmp_path / "nccl.parquet"),
                                  "-o", str(tmp_path / "sim2")])
    assert r.exit_code == 2 and "no rows of a no-SM-share impl (ce) for op allreduce" in r.output
    assert len(r.output.strip().splitlines()) == 1


# ---- the collectives' energy ------------------------------------------------------------------------------

def test_collective_energy_is_asked_at_the_workload_and_512_tokens_with_the_fastest_whole_gpu_impl():
    plan = m.network_plan(LLAMA70, W4, 132, 8, is_quick=True, net_impls=("nccl", "ce"))
    results = _network_results(plan)
    # make ce the faster at 2048 tokens on the whole GPU, nccl at 512
    for p in plan.points:
        if p.kind == "solo" and p.sm_count == 132 and p.impl == "ce":
            results[p.key()] = m.Measurement(0.05 if p.num_tokens == 2048 else 5.0)
    got = tpp.collective_energy_requests(plan, results, W4, 132)
    assert [(t, i) for t, i, _ in got] == [(512, "nccl"), (2048, "ce")]
    assert got[1][2] == 0.05 and got[0][2] == results[next(
        p for p in plan.points if p.kind == "solo" and p.num_tokens == 512 and p.sm_count == 132 and p.impl == "nccl").key()].time_ms
    # a token count the plan's inputs do not cover is not asked for
    small = dataclasses.replace(W4, num_decode=64, prefill_lengths=(8192,))
    assert all(t <= max(x for x, _ in plan.sizes("allreduce_o")) for t, _, _ in
               tpp.collective_energy_requests(plan, results, small, 132))


def test_merged_profile_counts_the_collectives_energy_in_the_per_gpu_bound():
    from test_tp_power import shard_energy

    from nfsearch.cost import power_bound_of
    from nfsearch.energy import EnergyPoint
    plan = m.network_plan(LLAMA70, W4, 132, 8, is_quick=True)
    results = _network_results(plan)
    shard = _shard()
    shard = shard.with_energy(shard_energy(LLAMA70, W4, {"ug": 0.5, "d": 0.3}))
    before, note_before = power_bound_of(shard, LLAMA70, W4)
    assert "counted as no dynamic energy" in note_before
    # 30 mJ per all-reduce of 2048 tokens above static (150 W x 0.2 ms), each op
    points = tuple(EnergyPoint(op, "nccl", 2048, 0, 0.030 + 150.0 * 0.2e-3, 0.2, 300.0) for op in
                   ("allreduce_o", "allreduce_d"))
    run = tpp.NetworkRun(plan, results, {}, "", ["NVIDIA H100 80GB HBM3"] * 2, "nccl", "2.28.9", [16],
                         energy_points=points)
    table = tpp.merge_tables(shard, tpp.network_table(run, "fake"), run, LLAMA70, W4)
    assert {p.op for p in table.energy.points} >= {"allreduce_o", "allreduce_d", "ug"}
    assert "measured afterwards with every GPU at once" in table.energy.method
    after, note = power_bound_of(table, LLAMA70, W4)
    assert after.dynamic_energy_j == pytest.approx(before.dynamic_energy_j + 2 * 0.030)
    assert "counted as no dynamic energy" not in note
    # without shard energy (no NVML on GPU 0) the collectives' points have nowhere to go: no energy
    bare = tpp.merge_tables(_shard(), tpp.network_table(run, "fake"), run, LLAMA70, W4)
    assert bare.energy is None


def test_collective_pair_families_are_each_collective_family_at_the_slowest_ranks_best_split():
    plan = m.network_plan(LLAMA70, W4, 132, 8, is_quick=True)
    rank0 = _network_results(plan)
    # rank 1 is slower on the first collective family's first split: its time counts there
    first = next(p for p in plan.pair_points())
    rank1 = dict(rank0)
    slow = rank0[first.key()]
    rank1[first.key()] = dataclasses.replace(slow, time_ms=slow.time_ms * 10,
                                             pair=dataclasses.replace(slow.pair, makespan_ms=slow.pair.makespan_ms * 10))
    families = tpp.collective_pair_families(plan, [rank0, rank1])
    assert families and all(pair_table.is_network_family(f.a, f.b) for f in families)
    assert len(families) == len({(p.op, p.num_tokens, p.context, p.partner_op, p.partner_tokens)
                                 for p in plan.pair_points()})
    combined = m.combine_ranks([rank0, rank1])
    for f in families:
        splits = [combined[p.key()].pair for p in plan.pair_points() if combined[p.key()].pair.family == (f.a, f.b)]
        assert f.best.makespan_ms == min(s.makespan_ms for s in splits)
    # the same list whatever the order of the ranks (every rank computes it from the gathered results)
    assert [f.name for f in tpp.collective_pair_families(plan, [rank1, rank0])] == [f.name for f in families]


def test_merged_profile_prices_overlap_with_a_collective_by_its_pair_energy():
    from test_tp_power import shard_energy

    from nfsearch.energy import EnergyPoint, PairEnergyPoint
    from nfsearch.timeline import Span
    plan = m.network_plan(LLAMA70, W4, 132, 8, is_quick=True)
    results = _network_results(plan)
    shard = _shard().with_energy(shard_energy(LLAMA70, W4, {"kqv": 0.4, "ug": 0.5}))
    points = tuple(EnergyPoint(op, "nccl", 2048, 0, 0.030 + 150.0 * 0.2e-3, 0.2, 300.0) for op in
                   ("allreduce_o", "allreduce_d"))
    # kqv beside an all-reduce that holds no SM share: 1.25x the dynamic energy of the two back to back
    # (loops of 1 ms each: 1.25 J and 1 J above the shard's static power)
    static_j = shard.energy.static_power_w * 1e-3
    beside = PairEnergyPoint("kqv", 2048, 0, 132, "torch", "allreduce_o", 2048, 0, 0, "ce", static_j + 1.25, 1.0,
                             (static_j + 1.25) * 1e3, static_j + 1.0, 1.0, (static_j + 1.0) * 1e3)
    run = tpp.NetworkRun(plan, results, {}, "", ["NVIDIA H100 80GB HBM3"] * 2, "nccl", "2.28.9", [16],
                         energy_points=points, pair_energy_points=(beside,))
    table = tpp.merge_tables(shard, tpp.network_table(run, "fake"), run, LLAMA70, W4)
    assert beside in table.energy.pair_points and tpp.COLLECTIVE_PAIR_ENERGY_METHOD in table.energy.method
    cost = make_problem(LLAMA70, W4, table).cost
    assert cost.energy.pair_ratio("allreduce_o", 1024, 0, "kqv", 1024, 0) == pytest.approx(1.25)
    assert cost.energy.pair_ratio("allreduce_o", 2048, 0, "ug", 2048, 0) is None      # no point of that family
    # kqv over all 2048 tokens for 1 ms, the all-reduce of o over 2048 tokens for 0.5 ms inside it
    spans = [Span("L0.kqv#0", "kqv", 0, "compute", "s0", 132, 2048, 0.0, 1.0),
             Span("L0.allreduce_o#0", "allreduce_o", 0, "network", "s1", 0, 2048, 0.25, 0.75)]
    extra, num_priced, num_unpriced = cost.overlap_energy_j(spans)
    assert (num_priced, num_unpriced) == (1, 0)
    assert extra == pytest.approx(0.25 * (0.4 * 0.5 + 0.030 * 1.0))
