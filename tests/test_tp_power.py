"""The power bound under tensor parallelism: a TP profile's energy is of one GPU's shard (the
collectives are not measured on one GPU and count as no dynamic energy), so the bound is per GPU;
simulate and the TP run report apply it as on one GPU (predicted = max(replay, bound)); the TP run
report carries every rank's power readings and reads them back.

The energies and readings here are MADE UP so that the answers can be worked out by hand; they say
nothing about a GPU. The timing rows are those of the measured 2x H200 W4 profile kept under
tests/fixtures/tp (real, used only as the table the bound is put on). The GPU tests at
the end measure real GPUs."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from nfsearch import plan as plan_mod
from nfsearch.cli import main
from nfsearch.cost import make_problem, power_bound_of
from nfsearch.energy import EnergyPoint, PowerBound, ProfileEnergy
from nfsearch.errors import NfsearchError
from nfsearch.graph import build_layer, op_context
from nfsearch.profile import load
from nfsearch.runreport import PowerReading, RankPower, TimingPower, TpPower
from nfsearch.simulate import check_and_judge, plan_dynamic_energy_j, power_line
from nfsearch.specs import load_workload

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests/fixtures/tp"
W4_PROFILE = FIXTURES / "W4-H200x2.parquet"
W4_PLAN = FIXTURES / "W4-H200x2.plan.json"
LIMIT_W, STATIC_W = 700.0, 150.0
NETWORK = ("allreduce_o", "allreduce_d")


def shard_energy(model, workload, dynamic_j: dict, time_ms: float = 0.5) -> ProfileEnergy:
    """One point per op of the TP layer but its collectives (as profiler.add_energy measures a shard),
    each `dynamic_j[op]` above static power (0 for ops not named)."""
    layer = build_layer(model, workload)
    points = []
    for name in layer.nodes:
        op = layer.nodes[name]["op"]
        if op.op_class == "network":
            continue
        lo, hi = layer.nodes[name]["token_range"]
        energy = STATIC_W * time_ms / 1e3 + dynamic_j.get(name, 0.0)
        points.append(EnergyPoint(name, "fake", hi - lo, op_context(op, workload), energy, time_ms,
                                  energy / time_ms * 1e3))
    return ProfileEnergy(LIMIT_W, STATIC_W, tuple(points), method="made up by the test (a TP=2 shard)")


@pytest.fixture(scope="module")
def w4():
    schedule = plan_mod.read(W4_PLAN)
    return schedule, load(W4_PROFILE)


def plan_j(schedule, profile) -> float:
    """The plan's own dynamic energy per layer per GPU: each nano-op at its own size (its split's cost)."""
    return plan_dynamic_energy_j(schedule, make_problem(schedule.model, schedule.workload, profile,
                                                        schedule.num_layers).cost)


def with_bound_ms(schedule, table, bound_ms: float, ops=("kqv", "ug", "d")):
    """The table with made-up shard energy whose bound is `bound_ms` per layer, spread over `ops`."""
    total_j = bound_ms / 1e3 * (LIMIT_W - STATIC_W)
    energy = shard_energy(schedule.model, schedule.workload, {op: total_j / len(ops) for op in ops})
    return table.with_energy(energy), total_j


# ------------------------------------------------------------------------------------ the bound, per GPU
def test_a_tp_profile_with_shard_energy_bounds_the_w4_plan_per_gpu(w4):
    schedule, table = w4
    assert schedule.workload.tp_degree == 2 and {o.op for o in schedule.nano_ops} >= set(NETWORK)
    replayed = schedule.predicted.layer_time_ms
    for factor, is_bound in ((1.2, True), (0.7, False)):
        profile, total_j = with_bound_ms(schedule, table, factor * replayed)
        bound, note = power_bound_of(profile, schedule.model, schedule.workload)
        # the shard's dynamic energy over one GPU's headroom; the collectives add nothing
        assert bound.dynamic_energy_j == pytest.approx(total_j)
        assert bound.bound_ms == pytest.approx(factor * replayed)
        assert note.startswith("per GPU: the TP=2 shard's ops")
        assert "collectives allreduce_o, allreduce_d counted as no dynamic energy" in note
        problem = make_problem(schedule.model, schedule.workload, profile, schedule.num_layers)
        assert all(problem.cost.nano_dynamic_j(op, 512) == 0.0 for op in NETWORK)
        # the plan's bound is its own: the shard's plus what its nano-batches cost at their sizes
        spans = check_and_judge(schedule, problem.cost, is_profile_given=True).replay.timeline.spans
        split_j = problem.cost.split_energy_j(spans) / schedule.num_layers
        assert plan_dynamic_energy_j(schedule, problem.cost) == pytest.approx(total_j + split_j)
        own_ms = (total_j + split_j) / (LIMIT_W - STATIC_W) * 1e3
        result = check_and_judge(schedule, problem.cost, is_profile_given=True)
        assert result.power_bound.bound_ms == pytest.approx(own_ms)
        assert result.layer_ms == pytest.approx(max(result.replayed_layer_ms, own_ms))
        assert result.is_power_bound is (own_ms > result.replayed_layer_ms) is is_bound
        assert power_line(result, problem.cost).startswith("power-bound" if is_bound else "not power-bound")


def test_measured_collective_energy_counts_and_a_missing_shard_op_means_no_bound(w4):
    schedule, table = w4
    energy = shard_energy(schedule.model, schedule.workload, {"ug": 1.0})
    # a profile that did measure a collective's energy (on every GPU, say): it counts like any op
    ar = EnergyPoint("allreduce_o", "nccl", 2048, 0, STATIC_W * 0.5e-3 + 0.25, 0.5, 650.0)
    with_ar = dataclasses.replace(energy, points=energy.points + (ar,))
    bound, note = power_bound_of(table.with_energy(with_ar), schedule.model, schedule.workload)
    assert bound.dynamic_energy_j == pytest.approx(1.25)
    assert "allreduce_o" not in note and "allreduce_d counted as no dynamic energy" in note
    # a shard op without energy is still a miss, said in one line
    no_ug = dataclasses.replace(energy, points=tuple(p for p in energy.points if p.op != "ug"))
    bound, note = power_bound_of(table.with_energy(no_ug), schedule.model, schedule.workload)
    assert bound is None and note.startswith("no power bound") and "ug" in note


def test_cli_simulate_and_solve_say_the_tp_bound(w4, tmp_path):
    schedule, table = w4
    profile, _ = with_bound_ms(schedule, table, 1.5 * schedule.predicted.layer_time_ms)
    path = tmp_path / "w4.energy.parquet"
    profile.write(path)
    r = CliRunner().invoke(main, ["simulate", str(W4_PLAN), "--profile", str(path), "-o", str(tmp_path / "sim")])
    assert r.exit_code == 0, r.output
    assert "power-bound: the power bound is" in r.output
    r = CliRunner().invoke(main, ["solve", "--model", "llama-3-70b", "--workload", "W4", "--profile", str(path),
                                  "--layers", "2", "--time-limit", "2", "-o", str(tmp_path / "plan.json")])
    assert r.exit_code == 0, r.output
    assert "power-bound" in r.output, r.output


# ------------------------------------------------------------------------------------ what is measured
def test_energy_requests_of_a_tp_workload_are_the_shards_ops_without_collectives(w4):
    from nfsearch.runtime.measurements import energy_plan, energy_requests
    schedule, table = w4
    requests, notes = energy_requests(schedule.model, schedule.workload, table)
    assert not notes
    assert not {r.op for r in requests} & set(NETWORK)
    keys = {(r.op, r.num_tokens, r.context) for r in requests}
    # W1-W3's batches at TP=2 and W4's own: every non-network op at its whole token count
    for wl in [dataclasses.replace(load_workload(n), tp_degree=2) for n in ("W1", "W2", "W3")] + [schedule.workload]:
        layer = build_layer(schedule.model, wl)
        for op in layer.nodes:
            if layer.nodes[op]["op"].op_class == "network":
                continue
            lo, hi = layer.nodes[op]["token_range"]
            assert (op, hi - lo, op_context(layer.nodes[op]["op"], wl)) in keys
    for r in requests:
        assert (r.time_ms, r.impl) == table.time_ms(r.op, r.num_tokens, table.info.num_sms, r.context,
                                                    allow_extrapolation=True)
    # the points are measured at the shard's shapes (graph.tp_shard), as the table's kernel rows
    p = energy_plan(schedule.model, schedule.workload, requests, 132, 8, {"ug": ("torch",)})
    assert p.tp_degree == 2
    assert p.ops["ug"].gemm_n == schedule.model.intermediate_size and p.ops["d"].gemm_k == schedule.model.intermediate_size // 2


def test_energy_only_refuses_a_workload_of_another_tp_degree(w4):
    pytest.importorskip("torch")
    from nfsearch.runtime.profiler import add_energy
    schedule, table = w4
    with pytest.raises(NfsearchError, match="TP=2 shard, the workload W2 mixed2048 is TP=1"):
        add_energy(schedule.model, load_workload("W2"), table, log=lambda m: None)


# ------------------------------------------------------------------------------------ the TP run report
def reading(energy_per_layer_j: float, capped: float, power_w: float = 690.0) -> PowerReading:
    return PowerReading(energy_per_layer_j=energy_per_layer_j, layer_ms=3.0, power_w=power_w, power_limit_w=LIMIT_W,
                        window_s=0.52, num_samples=50, capped_share=capped, sm_clock_mhz=1650.0,
                        min_sm_clock_mhz=1500.0, max_sm_clock_mhz=1980.0, reasons={"SW power cap": capped},
                        timing_power_w=power_w - 10, timing_num_samples=40, timing_capped_share=capped,
                        timing_sm_clock_mhz=1700.0, timing_reasons={"SW power cap": capped})


def tp_power(replayed: float = 3.0, bound_j: float = 1.9) -> TpPower:
    bound = PowerBound(bound_j, LIMIT_W, STATIC_W, 1.0, "per GPU: made up")
    timing = TimingPower(640.0, 30, 0.25, 1800.0, {"SW power cap": 0.25})
    ranks = (RankPower(0, "GPU A", reading(2.0, 0.9), {"seq_torch": timing, "seq_same": timing}),
             RankPower(1, "GPU A", None, {}, "NVML: no energy counter"))
    return TpPower(ranks, bound, replayed)


def test_tp_power_round_trips_and_applies_the_bound_as_on_one_gpu():
    p = tp_power()
    d = json.loads(json.dumps(p.to_dict()))
    assert TpPower.from_dict(d) == p
    # 1.9 J / 550 W = 3.4545 ms over a 3.0 ms replay: power-bound, predicted the bound
    assert p.power_bound.bound_ms == pytest.approx(1.9 / 550 * 1e3)
    assert p.predicted_layer_ms == pytest.approx(1.9 / 550 * 1e3) and p.is_power_bound
    assert d["is_power_capped"] == [True, None]
    # rank 0: 2.0 J per layer - 150 W x 3 ms = 1.55 J dynamic, over the bound's 1.9
    assert p.energy_ratio(0) == pytest.approx(1.55 / 1.9) and p.energy_ratio(1) is None
    lines = p.lines()
    assert lines[0].startswith("power rank 0 (GPU A): power-capped") and "measured/predicted dynamic energy 0.816" in lines[0]
    assert "seq_same not power-capped" in lines[1] and "seq_torch" in lines[1]
    assert lines[2] == "power rank 1 (GPU A): no reading (NVML: no energy counter)"
    assert lines[-1].startswith("power bound (per GPU): power-bound")
    loose = tp_power(replayed=4.0)
    assert loose.predicted_layer_ms == 4.0 and loose.is_power_bound is False
    none = TpPower(p.ranks, None, 3.0, "no power bound: no profile given")
    assert none.predicted_layer_ms == 3.0 and none.is_power_bound is None
    assert none.lines()[-1] == "power bound: no power bound: no profile given"


def test_tp_power_refuses_what_is_not_one():
    with pytest.raises(NfsearchError, match="ranks must be distinct and in order"):
        TpPower((RankPower(1, "x"), RankPower(0, "x")))
    with pytest.raises(NfsearchError, match="capped_share must be in 0..1"):
        TimingPower(600.0, 3, 1.5)
    with pytest.raises(NfsearchError, match="TP power: not a TP power record"):
        TpPower.from_dict({"power_bound": None})


def test_report_power_fields_put_the_bound_into_the_prediction():
    pytest.importorskip("torch")
    from nfsearch.runtime.tp import power_fields, power_lines
    p = tp_power()
    parts = [{"power": r.to_dict()} for r in p.ranks]
    got = power_fields(parts, 3.0, p.power_bound, "")
    assert got["predicted_layer_ms"] == pytest.approx(p.power_bound.bound_ms) and got["replay_layer_ms"] == 3.0
    assert got["is_power_bound"] and TpPower.from_dict(got["power"]) == p
    assert power_lines({"power": got["power"]}) == p.lines() and power_lines({}) == []
    plain = power_fields(parts, 3.0, None, "no power bound: no profile given")
    assert plain["predicted_layer_ms"] == 3.0 and plain["is_power_bound"] is None and plain["power_bound_ms"] is None


def test_gloo_tp2_run_report_has_per_rank_power_and_the_bound(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from test_tp import tiny_tp_plan

    from nfsearch.runtime import tp as tp_mod
    plan_path, out = tmp_path / "plan.json", tmp_path / "report.json"
    plan_mod.write(tiny_tp_plan(2), plan_path)
    replayed = plan_mod.read(plan_path).predicted.layer_time_ms       # as written (rounded)
    bound = PowerBound(2 * replayed / 1e3 * (LIMIT_W - STATIC_W), LIMIT_W, STATIC_W, 1.0, "per GPU: made up")
    tp_mod.spawn_ranks(tp_mod._run_worker, 2, "gloo",
                       (str(plan_path), str(out), {"time_on_cpu": True, "iters": 2, "repeats": 1,
                                                   "with_baselines": False, "power_bound": bound}))
    report = json.loads(out.read_text())
    assert report["correctness"]["passed"] and report["measured_layer_ms"] > 0
    p = TpPower.from_dict(report["power"])
    assert [r.rank for r in p.ranks] == [0, 1] and all(r.plan is None and "CPU" in r.note for r in p.ranks)
    assert p.power_bound == bound and report["replay_layer_ms"] == pytest.approx(replayed)
    assert report["predicted_layer_ms"] == pytest.approx(2 * replayed) and report["is_power_bound"]
    m = report["measured_layer_ms"]
    assert report["prediction_error"] == pytest.approx((2 * replayed - m) / m)
    assert tp_mod.power_lines(report)[-1].startswith("power bound (per GPU): power-bound")


def test_run_plan_takes_the_bound_from_the_profile(w4, monkeypatch):
    pytest.importorskip("torch")
    from nfsearch.runtime import tp as tp_mod
    schedule, table = w4
    profile, total_j = with_bound_ms(schedule, table, 2.0)
    got = {}

    def spawn(fn, n, backend, args):                  # what the ranks would be handed
        got["n"], got["kwargs"] = n, args[2]
        raise RuntimeError("not started: the test only reads the arguments")
    monkeypatch.setattr(tp_mod, "spawn_ranks", spawn)
    monkeypatch.setattr(tp_mod.torch.cuda, "device_count", lambda: 2)
    with pytest.raises(NfsearchError, match="not started"):
        tp_mod.run_plan(str(W4_PLAN), profile=profile, iters=3)
    assert got["n"] == 2 and "profile" not in got["kwargs"] and got["kwargs"]["iters"] == 3
    assert got["kwargs"]["power_bound"].dynamic_energy_j == pytest.approx(plan_j(schedule, profile))
    with pytest.raises(NfsearchError):
        tp_mod.run_plan(str(W4_PLAN))
    assert got["kwargs"]["power_bound"] is None and got["kwargs"]["power_note"].startswith("no power bound: no profile")


# ------------------------------------------------------------------------------------ lockstep
def test_lockstep_chunks_cover_warmup_window_and_slack():
    pytest.importorskip("torch")
    from nfsearch.runtime import power
    per_chunk, num_chunks = power.lockstep_chunks(7.0, window_s=0.5, warmup_s=0.2, chunk_ms=5.0, slack_s=0.4)
    assert per_chunk == 1 and num_chunks == power.DEPTH + math.ceil(1100 / 7.0)
    per_chunk, num_chunks = power.lockstep_chunks(0.1, window_s=0.5, warmup_s=0.2, chunk_ms=5.0, slack_s=0.4)
    assert per_chunk == 50 and num_chunks == power.DEPTH + 220
    assert per_chunk * num_chunks * 0.1 >= 1100
    with pytest.raises(ValueError):
        power.lockstep_chunks(0.0)


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_lockstep_measure_energy_issues_exactly_the_fixed_calls(nvml_device):
    import torch

    from nfsearch.runtime import power
    device = nvml_device
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    calls = []

    def fn():
        calls.append(1)
        torch.matmul(a, a, out=c)
    per_chunk, num_chunks = power.lockstep_chunks(0.2, window_s=0.3)
    m = power.measure_energy(fn, device, window_s=0.3, calls_per_chunk=per_chunk, num_chunks=num_chunks)
    assert len(calls) == 1 + 3 + per_chunk * num_chunks
    assert m.energy_j > 0 and m.gpu_busy_share > 0.8 and m.samples.num_samples > 5


@pytest.mark.gpu
def test_gpu_tp2_run_records_every_ranks_power(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    from test_tp import tiny_tp_plan

    from nfsearch.runtime import power
    from nfsearch.runtime import tp as tp_mod
    device, note = power.open_device(0)
    if device is None:
        pytest.skip(note)
    device.close()
    schedule = tiny_tp_plan(2)
    path = tmp_path / "plan.json"
    plan_mod.write(schedule, path)
    report = tp_mod.run_plan(str(path), impls="torch", iters=5, repeats=2, with_ceilings=False)
    p = TpPower.from_dict(report["power"])
    assert [r.rank for r in p.ranks] == [0, 1]
    for r in p.ranks:
        assert r.plan is not None, r.note
        assert r.plan.energy_per_layer_j > 0 and 0 < r.plan.power_w <= r.plan.power_limit_w * 1.05 + 20
        assert r.plan.timing_num_samples > 0 and {k for k, _ in r.baselines} == {"seq_torch", "seq_same"}
    assert report["predicted_layer_ms"] == pytest.approx(report["replay_layer_ms"])      # no profile, no bound
    assert any(n.startswith("power: no power bound") for n in report["notes"])


def test_energy_factor_fits_on_every_rank_of_a_tp_run(w4):
    """calibrate --energy on a TP run.json: each GPU is one measurement of the same per-GPU bound."""
    from nfsearch.calibrate import calibrate_energy, energy_evidence
    schedule, table = w4
    table, _ = with_bound_ms(schedule, table, 3.0)          # 1.65 J dynamic per layer per GPU
    total_j = plan_j(schedule, table)                       # the plan's own (its nano-batches)
    gpu = table.meta["gpu_name"]
    # dynamic = energy - static x 3 ms = energy - 0.45 J: rank 0 at 1.0x the bound's, rank 1 at 1.1x
    ranks = (RankPower(0, gpu, reading(total_j + 0.45, 0.9)), RankPower(1, gpu, reading(1.1 * total_j + 0.45, 0.9)))
    run = {"tp_degree": 2, "model": schedule.model.name, "workload": schedule.workload.name,
           "power": TpPower(ranks, None, 3.0).to_dict()}
    evidence = energy_evidence(run, "run.json")
    assert [source for _, source in evidence] == ["run.json rank 0", "run.json rank 1"]
    _, ecal = calibrate_energy(table, [(schedule, e, source) for e, source in evidence])
    assert [round(r.ratio, 6) for r in ecal.runs] == [1.0, 1.1]
    assert ecal.factor == pytest.approx(1.05)
    with pytest.raises(NfsearchError, match="no power reading"):
        energy_evidence({**run, "power": None}, "run.json")


def test_tp_report_line_says_when_baselines_were_not_timed_with_this_candidate():
    """tune times the baselines with its first candidate only: the others' lines say so (not 0.000 x0.000)."""
    from nfsearch.runtime.tp import format_line
    tuned = json.loads((FIXTURES / "W4-H200x2.tune.json").read_text())
    first, later = tuned["candidates"][0], tuned["candidates"][2]
    assert "seq-torch 3.829 (x1.108)" in format_line(first) and "seq-same 3.487 (x1.009)" in format_line(first)
    line = format_line(later)
    assert "seq-torch not timed here" in line and "seq-same not timed here" in line and "x0.000" not in line
    assert "layer 3.509 ms" in line
