"""The power bound: a profile's energy (per op, board energy per call of a sustained loop; the GPU's
power limit and static power) bounds a layer's time from below by dynamic energy / (limit - static);
the predicted layer time is max(replay, bound); the search's margin judges replays (the bound does not
choose between plans) and says when a plan is power-bound; `calibrate --energy` fits the energy
factor; simulate and run reports say it.

The energies here are made up so that the answers can be worked out by hand; they say nothing about
a real GPU. The GPU test at the end measures a real one."""

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TINY_MODEL, TINY_WL, fake_profile
from nfsearch import calibrate, plan, profile
from nfsearch.cli import main
from nfsearch.cost import make_problem, power_bound_of
from nfsearch.energy import (ENERGY_CALIBRATION_KEY, ENERGY_KEY, EnergyCalibration, EnergyPoint, EnergyRun, PowerBound,
                             ProfileEnergy, energy_calibration_from_meta, fit_energy)
from nfsearch.energy_model import ENERGY_INTERPOLATED, ENERGY_MEASURED, ENERGY_SCALED, EnergyModel
from nfsearch.errors import NfsearchError
from nfsearch.graph import build_layer, op_context
from nfsearch.profile import ProfileTable
from nfsearch.runreport import Correctness, LaunchSummary, PowerReading, RunReport, Timing, format_table
from nfsearch.search import solve
from nfsearch.search.baselines import equal_split_plan, sequential_plan
from nfsearch.simulate import check_and_judge, judge, plan_dynamic_energy_j, power_bound_for, power_line, replay

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "profiles/h100-sxm/llama-3-8b.parquet"
LIMIT_W, STATIC_W = 500.0, 100.0


def layer_energy(model, workload, dynamic_j: dict, static_w: float = STATIC_W, time_ms: float = 0.5,
                 limit_w: float = LIMIT_W) -> ProfileEnergy:
    """One point per op of the layer at its whole token count: `dynamic_j[op]` above static power (0
    for ops not named), each call `time_ms` long."""
    layer = build_layer(model, workload)
    points = []
    for name in layer.nodes:
        lo, hi = layer.nodes[name]["token_range"]
        energy = static_w * time_ms / 1e3 + dynamic_j.get(name, 0.0)
        points.append(EnergyPoint(name, "fake", hi - lo, op_context(layer.nodes[name]["op"], workload), energy,
                                  time_ms, energy / time_ms * 1e3))
    return ProfileEnergy(limit_w, static_w, tuple(points), method="made up by the test")


def bundled_without_energy() -> ProfileTable:
    """The bundled H100 profile as it was before its energy was measured (its rows, no energy)."""
    bundled = profile.load(BUNDLED)
    return ProfileTable(bundled.rows, {k: v for k, v in bundled.meta.items()
                                       if k not in (ENERGY_KEY, "energy_calibration")})


def tiny_with(dynamic_j: dict) -> ProfileTable:
    return fake_profile().with_energy(layer_energy(TINY_MODEL, TINY_WL, dynamic_j))


# ------------------------------------------------------------------------------------ the bound by hand
def test_two_ops_bound_by_hand():
    # kqv 0.3 J and ug 0.5 J above static, every other op nothing above static: 0.8 J / (500 - 100) W = 2 ms
    problem = make_problem(TINY_MODEL, TINY_WL, tiny_with({"kqv": 0.3, "ug": 0.5}), num_layers=2)
    bound = problem.cost.power_bound()
    assert bound.dynamic_energy_j == pytest.approx(0.8)
    assert bound.headroom_w == 400.0 and bound.bound_ms == pytest.approx(2.0)
    assert bound.energy_factor == 1.0
    # a nano-op costs its share of its op: 64 of kqv's 256 tokens = a quarter of 0.3 J
    assert problem.cost.nano_dynamic_j("kqv", 64) == pytest.approx(0.075)
    assert problem.cost.nano_dynamic_j("norm1", 64) == pytest.approx(0.0)
    # every split of the layer has the same energy: the plan's nano-ops sum to the bound's energy
    for s in (sequential_plan(problem), equal_split_plan(problem, 2), equal_split_plan(problem, 4)):
        assert plan_dynamic_energy_j(s, problem.cost) == pytest.approx(0.8)


def test_energy_below_static_counts_nothing_and_the_limit_sets_the_scale():
    # an op whose loop drew less than static power adds 0, not a negative energy
    energy = layer_energy(TINY_MODEL, TINY_WL, {"kqv": 0.4})
    low = dataclasses.replace(energy.points[0], energy_j=energy.points[0].energy_j / 4)
    energy = dataclasses.replace(energy, points=(low,) + energy.points[1:], power_limit_w=300.0)
    bound, _ = power_bound_of(fake_profile().with_energy(energy), TINY_MODEL, TINY_WL)
    assert bound.dynamic_energy_j == pytest.approx(0.4) and bound.bound_ms == pytest.approx(0.4 / 200 * 1e3)


def test_interpolation_in_tokens_scaling_outside_and_at_another_context():
    static = 100.0
    points = (EnergyPoint("kqv", "x", 128, 0, 1.0, 1.0, 1000.0), EnergyPoint("kqv", "x", 512, 0, 4.0, 2.0, 2000.0),
              EnergyPoint("decode_attn", "x", 64, 1024, 0.5, 1.0, 500.0))
    model = EnergyModel(ProfileEnergy(700.0, static, points))
    assert model.op_energy("kqv", 128, 0) == (1.0, 1.0, ENERGY_MEASURED)
    e, t, how = model.op_energy("kqv", 256, 0)        # a third of the way from 128 to 512
    assert (e, t, how) == (pytest.approx(2.0), pytest.approx(4 / 3), ENERGY_INTERPOLATED)
    assert model.op_energy("kqv", 1024, 0) == (pytest.approx(8.0), pytest.approx(4.0), ENERGY_SCALED)
    assert model.op_energy("kqv", 64, 0) == (pytest.approx(0.5), pytest.approx(0.5), ENERGY_SCALED)
    # decode measured at context 1024 only: at 2048 twice the energy and time
    assert model.op_energy("decode_attn", 64, 2048) == (pytest.approx(1.0), pytest.approx(2.0), ENERGY_SCALED)
    # dynamic = energy - static x time: 2 J - 100 W x 4/3 ms
    assert model.dynamic_j("kqv", 256, 0)[0] == pytest.approx(2.0 - 100.0 * (4 / 3) / 1e3)
    # norm2 runs norm1's kernel: measured as norm1 only, it answers for norm2
    alias = EnergyModel(ProfileEnergy(700.0, static, (EnergyPoint("norm1", "x", 128, 0, 0.1, 0.1, 1000.0),)))
    assert alias.op_energy("norm2", 128, 0)[0] == pytest.approx(0.1)
    with pytest.raises(NfsearchError, match="no points for op ug"):
        model.op_energy("ug", 128, 0)


def test_an_op_without_energy_means_no_bound_said_once():
    energy = layer_energy(TINY_MODEL, TINY_WL, {"kqv": 0.3})
    energy = dataclasses.replace(energy, points=tuple(p for p in energy.points if p.op != "ug"))
    problem = make_problem(TINY_MODEL, TINY_WL, fake_profile().with_energy(energy))
    assert problem.cost.power_bound() is None and "no power bound" in problem.cost.power_note
    assert "ug" in problem.cost.power_note


# ------------------------------------------------------------------------------------ max with the makespan
def test_predicted_layer_time_is_the_max_of_replay_and_bound():
    base = make_problem(TINY_MODEL, TINY_WL, fake_profile(), num_layers=2)
    s = equal_split_plan(base, 2)
    replayed = replay(s, base.cost).timeline.layer_time_ms
    headroom = LIMIT_W - STATIC_W
    for factor, is_bound in ((1.5, True), (0.5, False)):
        # the whole layer's dynamic energy put on ug, sized for a bound of factor x the replay
        table = tiny_with({"ug": factor * replayed / 1e3 * headroom})
        problem = make_problem(TINY_MODEL, TINY_WL, table, num_layers=2)
        result = check_and_judge(s, problem.cost, is_profile_given=True)
        assert result.replayed_layer_ms == pytest.approx(replayed)     # the kernels' schedule is not stretched
        assert result.power_bound.bound_ms == pytest.approx(factor * replayed)
        assert result.layer_ms == pytest.approx(max(replayed, factor * replayed))
        assert result.is_power_bound is is_bound
        assert result.makespan_ms == pytest.approx(result.layer_ms * 2)     # per plan: 2 layers
        line = power_line(result, problem.cost)
        assert line.startswith("power-bound" if is_bound else "not power-bound")
    # without energy: the replay, and one line saying why there is no bound
    result = check_and_judge(s, base.cost, is_profile_given=True)
    assert result.power_bound is None and result.layer_ms == pytest.approx(replayed)
    assert power_line(result, base.cost).startswith("no power bound")


@pytest.mark.slow
def test_at_the_cap_each_plans_own_bound_ranks_it_and_is_said():
    free = make_problem(TINY_MODEL, TINY_WL, fake_profile(), num_layers=2)
    overlapped, _ = solve(free, time_limit_s=2.0, min_gain=0.0)
    seq_ms = sequential_plan(free).predicted.makespan_ms
    assert overlapped.predicted.makespan_ms < seq_ms * 0.98, "the fake profile must reward overlap"
    headroom = LIMIT_W - STATIC_W
    # a bound above the sequential plan's layer time: every plan sits at its own bound (its nano-batches'
    # energy at their own sizes), so the search ranks plans by it there, and says the plan is power-bound
    capped = make_problem(TINY_MODEL, TINY_WL, tiny_with({"ug": 1.2 * seq_ms / 2 / 1e3 * headroom}), num_layers=2)
    chosen, notes = solve(capped, time_limit_s=2.0, min_gain=0.0)
    assert chosen.solver.source != "sequential baseline"
    assert (judge(chosen, capped.cost).ranked_makespan_ms
            <= judge(overlapped, capped.cost).ranked_makespan_ms * (1 + 1e-9))
    assert any(n.startswith("power: the plan is power-bound") for n in notes), notes
    # a bound below the overlapped plan: the same plan as without energy
    loose = make_problem(TINY_MODEL, TINY_WL, tiny_with({"ug": 0.5 * overlapped.predicted.layer_time_ms / 1e3 * headroom}),
                         num_layers=2)
    assert solve(loose, time_limit_s=2.0, min_gain=0.0)[0].nano_ops == overlapped.nano_ops


# ------------------------------------------------------------------------------------ profile round trip
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_profile_round_trip_with_and_without_energy(tmp_path, suffix):
    plain = fake_profile()
    with_energy = tiny_with({"kqv": 0.3, "ug": 0.5})
    assert with_energy.fingerprint() == plain.fingerprint()       # energy is metadata
    for table, name in ((plain, "plain"), (with_energy, "energy")):
        path = tmp_path / f"{name}{suffix}"
        table.write(path)
        back = profile.load(path)
        assert back.energy == table.energy and back.fingerprint() == table.fingerprint()
    assert profile.load(tmp_path / f"plain{suffix}").energy is None


def test_old_profiles_load_without_energy_and_keep_their_fingerprint(tmp_path):
    bundled = profile.load(BUNDLED)          # energy measured on the H100 (power_2026-11-27)
    assert bundled.energy is not None and bundled.energy.power_limit_w == 700.0
    old = profile.ProfileTable(bundled.rows, {k: v for k, v in bundled.meta.items()
                                              if k not in (ENERGY_KEY, "energy_calibration")})
    old.write(tmp_path / "old.parquet")
    again = profile.load(tmp_path / "old.parquet")
    assert again.energy is None and again.fingerprint() == bundled.fingerprint()
    assert again.with_energy(layer_energy(TINY_MODEL, TINY_WL, {})).fingerprint() == bundled.fingerprint()
    analytic = profile.load(ROOT / "profiles/h100-sxm/llama-3-8b.analytic.parquet")
    w2 = plan.read(ROOT / "tests/fixtures/plans/W2.json")
    problem = make_problem(w2.model, w2.workload, analytic)
    assert problem.cost.power_bound() is None and "analytic" in problem.cost.power_note


@pytest.mark.parametrize("change, match", [
    (lambda e: {**e, "static_power_w": 600.0}, "not below the power limit"),
    (lambda e: {**e, "power_limit_w": -1}, "power_limit_w"),
    (lambda e: {**e, "watts": 1}, "unknown keys"),
    (lambda e: {**e, "points": e["points"] + e["points"][:1]}, "two points"),
    (lambda e: {**e, "points": [{**e["points"][0], "energy_j": -1.0}]}, "energy_j"),
    (lambda e: {**e, "points": [{**e["points"][0], "num_tokens": 1.5}]}, "num_tokens"),
    (lambda e: {**e, "points": [{k: v for k, v in e["points"][0].items() if k != "time_ms"}]}, "lacks"),
    (lambda e: {**e, "points": []}, "1.."),
    (lambda e: [1, 2], "JSON object"),
])
def test_bad_energy_metadata_is_one_line_at_load(tmp_path, change, match):
    table = tiny_with({"kqv": 0.3})
    meta = {**table.meta, "energy": change(table.meta["energy"])}
    path = tmp_path / "bad.csv"
    path.write_text(profile.CSV_MARK + json.dumps(meta) + "\n" + table.rows.to_csv(index=False))
    with pytest.raises(NfsearchError, match=match):
        profile.load(path)


def test_merged_energy_keeps_points_not_measured_again():
    old = layer_energy(TINY_MODEL, TINY_WL, {"kqv": 0.3})
    newer = ProfileEnergy(450.0, 90.0, (dataclasses.replace(old.points[1], energy_j=9.0),))
    merged = old.merged(newer)
    assert merged.power_limit_w == 450.0 and merged.static_power_w == 90.0
    assert len(merged.points) == len(old.points)
    assert {p.key: p.energy_j for p in merged.points}[old.points[1].key] == 9.0


# ------------------------------------------------------------------------------------ energy calibration
def fake_report(schedule, energy_per_layer_j: float, layer_ms: float, capped: bool, gpu: str) -> RunReport:
    reading = PowerReading(energy_per_layer_j, layer_ms, 690.0 if capped else 450.0, 700.0, 0.5, 40,
                           0.95 if capped else 0.0, 1700.0, 1500.0, 1980.0, (("SW power cap", 0.95),) if capped else (),
                           680.0, 30, 0.9 if capped else 0.0, 1710.0)
    return RunReport(gpu, 132, "2026-11-27T00:00:00", "green", (("torch", "x"),), schedule.model.name, 32,
                     schedule.workload.name, schedule.workload.num_tokens, schedule.num_layers, "cpsat", "p", gpu,
                     LaunchSummary(1, ("a",), ("132",), (("data", 0),), 0), Correctness(True, 0.02, 0.001),
                     plan=Timing("plan", (layer_ms,), 30, "cuda-graph"), predicted_layer_ms=layer_ms * 0.9,
                     power=reading)


@pytest.fixture(scope="module")
def h100_energy():
    """The bundled H100 profile with made-up energies for W1-W3 (each op at 600 W over its table time)."""
    from nfsearch.runtime.measurements import energy_requests
    bundled = bundled_without_energy()
    s = plan.read(ROOT / "tests/fixtures/plans/W2.json")
    requests, notes = energy_requests(s.model, s.workload, bundled)
    assert not notes and {r.op for r in requests} == set(build_layer(s.model, s.workload).nodes)
    points = tuple(EnergyPoint(r.op, r.impl, r.num_tokens, r.context, 0.6 * r.time_ms, r.time_ms, 600.0, 1980.0)
                   for r in requests)
    return bundled.with_energy(ProfileEnergy(700.0, 100.0, points, method="made up by the test"))


def test_energy_factor_fit_from_run_reports(h100_energy, tmp_path):
    runs = []
    for name, ratio, capped in (("W1", 1.10, False), ("W2", 0.90, True), ("W3", 0.80, True)):
        s = plan.read(ROOT / f"tests/fixtures/plans/{name}.json")
        bound, _ = power_bound_for(s, h100_energy)      # the plan's own prediction (its nano-batches)
        layer_ms = 3.0
        # measured dynamic = ratio x predicted: energy per layer = that + static x time
        energy = ratio * bound.dynamic_energy_j + 100.0 * layer_ms / 1e3
        runs.append((s, fake_report(s, energy, layer_ms, capped, h100_energy.meta["gpu_name"]), name))
    table, ecal = calibrate.calibrate_energy(h100_energy, runs)
    # the median over the power-capped runs (0.90, 0.80); the uncapped W1 is kept but not fitted on
    assert ecal.factor == pytest.approx(0.85) and ecal.fitted_on == "power-capped runs"
    assert [r.ratio for r in ecal.runs] == pytest.approx([1.10, 0.90, 0.80])
    assert energy_calibration_from_meta(table.meta) == ecal and table.fingerprint() == h100_energy.fingerprint()
    s = runs[2][0]
    raw, _ = power_bound_of(h100_energy, s.model, s.workload)
    cal, _ = power_bound_of(table, s.model, s.workload)
    assert cal.energy_factor == pytest.approx(0.85)
    assert cal.dynamic_energy_j == pytest.approx(0.85 * raw.dynamic_energy_j)
    # the run report's own ratio is what the fit takes (before any factor)
    report = dataclasses.replace(runs[2][1], power_bound=power_bound_for(s, table)[0], replay_layer_ms=2.5)
    assert report.energy_ratio == pytest.approx(0.80)
    # fitting again on a calibrated profile gives the same factor (the old factor is not compounded)
    assert calibrate.calibrate_energy(table, runs)[1] == ecal
    # no capped run: the median of all
    assert fit_energy([EnergyRun("a", 1.0, 2.0, False), EnergyRun("b", 3.0, 2.0, False)]).factor == pytest.approx(1.0)
    with pytest.raises(NfsearchError, match="no power reading"):
        calibrate.calibrate_energy(h100_energy, [(runs[0][0], dataclasses.replace(runs[0][1], power=None), "x")])
    with pytest.raises(NfsearchError, match="has no energy"):
        calibrate.calibrate_energy(bundled_without_energy(), runs)
    with pytest.raises(NfsearchError, match="is of"):
        calibrate.calibrate_energy(h100_energy, [(runs[0][0], runs[1][1], "mixed")])
    # the CLI: calibrate --energy PLAN RUN_JSON writes the factor into the profile
    h100_energy.write(tmp_path / "e.parquet")
    args = ["calibrate", "--profile", str(tmp_path / "e.parquet"), "-o", str(tmp_path / "cal.parquet")]
    for _, r, name in runs:
        (tmp_path / f"{name}.run.json").write_text(json.dumps(r.to_dict()))
        args += ["--energy", str(ROOT / f"tests/fixtures/plans/{name}.json"), str(tmp_path / f"{name}.run.json")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "energy factor 0.850" in result.output
    assert energy_calibration_from_meta(profile.load(tmp_path / "cal.parquet").meta).factor == pytest.approx(0.85)
    # and --from carries the factor to another profile of the same GPU (the energy points stay behind)
    carried, _ = calibrate.transfer(bundled_without_energy(), table)
    assert energy_calibration_from_meta(carried.meta) == ecal and carried.energy is None


def test_energy_calibration_refuses_what_is_not_one():
    with pytest.raises(NfsearchError, match="factor"):
        EnergyCalibration(50.0, (EnergyRun("a", 1.0, 1.0, True),), "all runs")
    with pytest.raises(NfsearchError, match="no measured run"):
        EnergyCalibration(1.0, (), "all runs")
    with pytest.raises(NfsearchError, match="positive"):
        EnergyRun("a", -1.0, 1.0, True)
    with pytest.raises(NfsearchError, match="not an energy calibration"):
        energy_calibration_from_meta({ENERGY_CALIBRATION_KEY: {"factor": 1.0}})


# ------------------------------------------------------------------------------------ reports
def test_run_report_carries_power_and_the_bound(h100_energy):
    s = plan.read(ROOT / "tests/fixtures/plans/W3.json")
    bound, _ = power_bound_of(h100_energy, s.model, s.workload)
    replayed = s.predicted.layer_time_ms
    r = fake_report(s, 2.2, 3.6, True, "NVIDIA H100 80GB HBM3")
    r = dataclasses.replace(r, predicted_layer_ms=bound.layer_ms(replayed), replay_layer_ms=replayed, power_bound=bound)
    assert r.power.is_power_capped and r.is_power_bound == bound.is_binding(replayed)
    assert r.prediction_error == pytest.approx((max(replayed, bound.bound_ms) - 3.6) / 3.6)
    assert r.measured_dynamic_energy_j == pytest.approx(2.2 - 100.0 * 3.6 / 1e3)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["derived"]["is_power_capped"] is True and d["power"]["is_power_capped"] is True
    assert d["power_bound"]["bound_ms"] == pytest.approx(bound.bound_ms)
    assert RunReport.from_dict(d) == r
    table = format_table([r])
    assert "power-capped (SW power cap in 90% of the timing rounds' samples)" in table
    assert "power bound:" in table and "measured/predicted dynamic energy" in table
    uncapped = dataclasses.replace(r.power, timing_capped_share=0.1)
    assert not uncapped.is_power_capped
    with pytest.raises(NfsearchError, match="static power"):
        PowerBound(1.0, 100.0, 200.0)


def test_cli_simulate_says_whether_the_plan_is_power_bound(h100_energy, tmp_path):
    w3 = ROOT / "tests/fixtures/plans/W3.json"
    h100_energy.write(tmp_path / "e.parquet")
    result = CliRunner().invoke(main, ["simulate", str(w3), "--profile", str(tmp_path / "e.parquet"),
                                       "-o", str(tmp_path / "sim")])
    assert result.exit_code == 0, result.output
    s = plan.read(w3)
    bound, _ = power_bound_for(s, h100_energy)           # the plan's own: its nano-batches' energy
    line = next(line for line in result.stdout.splitlines() if "power bound is" in line)
    assert f"{bound.bound_ms:.3f} ms per layer" in line
    assert "nano-batches +" in line and bound.bound_ms > power_bound_of(h100_energy, s.model, s.workload)[0].bound_ms
    assert line.startswith("power-bound" if bound.bound_ms > s.predicted.layer_time_ms else "not power-bound")
    assert "power bound is" in (tmp_path / "sim.html").read_text()
    # a table without energy: no bound, said in one line
    bundled_without_energy().write(tmp_path / "plain.parquet")
    plain = CliRunner().invoke(main, ["simulate", str(w3), "--profile", str(tmp_path / "plain.parquet"),
                                      "-o", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    said = [line for line in plain.stdout.splitlines() if line.startswith("no power bound")]
    assert said == ["no power bound: the measured profile of NVIDIA H100 80GB HBM3 has no energy "
                    "(nfsearch profile --energy-only PROFILE adds it on the GPU)"]


def test_executor_on_the_cpu_reports_the_bound_of_its_profile():
    torch = pytest.importorskip("torch")   # noqa: F841 - the executor needs torch
    from nfsearch.roofline import analytic_profile
    from nfsearch.runtime import executor
    from nfsearch.specs import ModelSpec, Workload, load_gpu
    model, workload = ModelSpec("tiny", 256, 4, 2, 64, 512, 2, 1000), Workload("tiny", 6, 40, (20, 13))
    table = analytic_profile(model, workload, load_gpu("h100-sxm"))
    problem = make_problem(model, workload, table, 2, allow_extrapolation=True)
    s = sequential_plan(problem)
    replayed = s.predicted.layer_time_ms
    energy = layer_energy(model, workload, {"ug": 3 * replayed / 1e3 * (LIMIT_W - STATIC_W)})
    r = executor.execute(s, device="cpu", time_on_cpu=True, iters=1, repeats=1, with_compiled=False,
                         with_ceilings=False, profile=table.with_energy(energy))
    assert r.power is None                     # no GPU, no NVML reading
    assert r.power_bound.bound_ms == pytest.approx(3 * replayed)
    assert r.replay_layer_ms == pytest.approx(replayed) and r.predicted_layer_ms == pytest.approx(3 * replayed)
    assert r.is_power_bound
    plain = executor.execute(s, device="cpu", time_on_cpu=True, iters=1, repeats=1, with_compiled=False,
                             with_ceilings=False, profile=table)
    assert plain.power_bound is None and plain.predicted_layer_ms == pytest.approx(replayed)
    assert any(n.startswith("power: no power bound") for n in plain.notes)


def test_energy_requests_cover_w1_to_w3_with_the_fastest_impl():
    from nfsearch.runtime.measurements import energy_plan, energy_requests
    bundled = profile.load(BUNDLED)
    s = plan.read(ROOT / "tests/fixtures/plans/W2.json")
    requests, notes = energy_requests(s.model, s.workload, bundled)
    assert not notes
    keys = {(r.op, r.num_tokens, r.context) for r in requests}
    for name in ("W1", "W2", "W3"):
        w = plan.read(ROOT / f"tests/fixtures/plans/{name}.json").workload
        layer = build_layer(s.model, w)
        for op in layer.nodes:
            lo, hi = layer.nodes[op]["token_range"]
            assert (op, hi - lo, op_context(layer.nodes[op]["op"], w)) in keys
    for r in requests:
        assert (r.time_ms, r.impl) == bundled.time_ms(r.op, r.num_tokens, 132, r.context, allow_extrapolation=True)
    p = energy_plan(s.model, s.workload, requests, 132, 8, {"kqv": ("torch",)})
    assert (4096, 0) in p.sizes("kqv") and all(pt.kind == "energy" and pt.sm_count == 132 for pt in p.points)


# ------------------------------------------------------------------------------------ NVML
def test_no_nvml_is_a_note_not_a_crash():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: NVML may answer")
    from nfsearch.runtime import power
    device, note = power.open_device(0)
    assert device is None and note.startswith("no NVML") and "no energy measured" in note


@pytest.mark.gpu
def test_measure_energy_of_a_matmul_loop(nvml_device):
    import torch

    from nfsearch.runtime import power
    device = nvml_device
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    m = power.measure_energy(lambda: torch.matmul(a, b, out=c), device, window_s=0.3)
    limit = device.power_limit_w()
    assert m.energy_j > 0 and m.time_ms > 0 and m.num_calls > 10
    assert 0 < m.power_w <= limit * 1.05 + 20, m.describe()
    assert m.energy_j == pytest.approx(m.power_w * m.time_ms / 1e3)
    assert m.gpu_busy_share > 0.8 and m.samples.num_samples > 5
    static = power.measure_static_power(device, window_s=0.2)
    assert 0 < static.static_power_w < m.power_w <= limit * 1.05 + 20
