"""search.solve: valid plans, never worse than the baselines, deterministic; stage 1 and 2 pieces."""

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfsearch import plan as plan_io
from nfsearch.roofline import analytic_profile
from nfsearch.errors import NfsearchError
from nfsearch.search.baselines import sequential_plan
from nfsearch.cost import make_problem
from nfsearch.search.durations import Durations
from nfsearch.search.baselines import baselines
from nfsearch.search.stage1 import make_frame, structure_family, sweep
from nfsearch.search.stage2 import model_timing, stage2_from
from nfsearch.search import solve
from nfsearch.simulate import replay, verify
from nfsearch.specs import Workload, load_gpu, load_model

MODEL = load_model("llama-3-8b")
GPU = load_gpu("h100-sxm")


def _problem(num_decode=256, prefill=(256,), layers=2):
    w = Workload("t", num_decode, 1024, tuple(prefill))
    return make_problem(MODEL, w, analytic_profile(MODEL, w, GPU), num_layers=layers)


@pytest.fixture(scope="module")
def small():
    return _problem()


@pytest.fixture(scope="module")
def solved(small):
    return solve(small, solver="cpsat", time_limit_s=1.0, threads=2, seed=3)


def test_solve_returns_a_valid_plan_no_worse_than_baselines(small, solved):
    schedule, notes = solved
    verify(schedule)
    ours = schedule.predicted.makespan_ms
    for name, base in baselines(small).items():
        assert ours <= base.predicted.makespan_ms + 1e-9, name
    assert any(k.startswith("equal-split-2") for k in baselines(small))
    assert schedule.solver.name == "cpsat" and notes and all("\n" not in n for n in notes)
    # the replay (independent judge) is never slower than the solver's pessimistic times by much
    assert replay(schedule, small.cost).makespan_ms <= ours * 1.05


def test_same_seed_gives_byte_identical_plan(small, solved):
    again, _ = solve(small, solver="cpsat", time_limit_s=1.0, threads=2, seed=3)
    assert plan_io.to_json(again) == plan_io.to_json(solved[0])


@pytest.mark.parametrize("kwargs,match", [
    ({"time_limit_s": 0}, "time limit"), ({"time_limit_s": -1.0}, "time limit"),
    ({"time_limit_s": float("nan")}, "time limit"), ({"time_limit_s": float("inf")}, "time limit"),
    ({"seed": -1}, "seed"), ({"seed": 2**31}, "seed"), ({"seed": 2**70}, "seed"), ({"seed": 1.5}, "seed"),
    ({"threads": 0}, "threads"), ({"threads": 257}, "threads"), ({"threads": True}, "threads"),
    ({"chunk": 0}, "chunk"), ({"solver": "nope"}, "unknown solver"),
])
def test_bad_arguments_are_one_line_errors(small, kwargs, match):
    began = time.perf_counter()
    with pytest.raises(NfsearchError, match=match) as err:
        solve(small, **{"time_limit_s": 1.0, **kwargs})
    assert "\n" not in str(err.value)
    if "solver" not in kwargs:
        assert time.perf_counter() - began < 1.0          # refused before any search work


def test_solved_plan_states_the_model_bound_apart_from_the_roofline_bound(solved):
    schedule, _ = solved
    data = json.loads(plan_io.to_json(schedule))
    # (the model's bound only where the plan is a stage-2 solution)
    assert "bound_ms" not in data["solver"] and data["solver"].get("model_bound_ms") == schedule.solver.model_bound_ms
    assert data["predicted"]["bound_ms"] == round(schedule.predicted.bound_ms, 6)
    # the plan states the threads of one stage-2 solve (always 1: --threads only runs structures side by side)
    assert schedule.solver.seed == 3 and schedule.solver.threads == 1 and schedule.solver.time_limit_s == 1.0


def test_sweep_incumbent_and_its_hint_are_feasible(small):
    ranked = sweep(small, 128)
    assert ranked and [c.judge_ms for c in ranked] == sorted(c.judge_ms for c in ranked)
    best = ranked[0]
    verify(best.plan)
    assert best.judge_ms == pytest.approx(replay(best.plan, small.cost).makespan_ms)
    # groups share an SM count across layers
    for o in best.plan.nano_ops:
        assert o.sm_count == best.sms[f"{o.op}#{o.index}"]
    data = stage2_from(small, best, Durations(small))
    assert len(data.hint) == len(data.tasks)
    starts = {i: s for i, (s, _) in data.hint.items()}
    dur = {i: dict(t.choices)[data.hint[i][1]] for i, t in enumerate(data.tasks)}
    for i, j in data.edges:
        assert starts[j] >= starts[i] + dur[i]
    for x in set(starts.values()):
        used = sum(data.hint[i][1] for i in starts if starts[i] <= x < starts[i] + dur[i])
        assert used <= 132
    for stream in {t.stream for t in data.tasks}:
        spans = sorted((starts[i], starts[i] + dur[i]) for i, t in enumerate(data.tasks) if t.stream == stream)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_structure_family_cuts_on_chunks(small):
    for s in structure_family(small, 128):
        for op, sizes in s.sizes:
            start, end = small.layer.nodes[op]["token_range"]
            assert sum(sizes) == end - start and all(n % 128 == 0 for n in sizes[:-1])
    frame = make_frame(small, structure_family(small, 128)[0])      # unsplit: decode and prefill attn overlap
    assert frame.group_overlaps["decode_attn#0"] and frame.group_overlaps["prefill_attn#0"]
    assert not frame.group_overlaps["kqv#0"]


def test_model_timing_waits_for_sms_streams_and_inputs():
    # 0 -> 2; 0 and 1 on different streams but 100 + 100 SMs do not fit: 1 waits for 0
    starts = model_timing(3, [(0, 2)], ["a", "b", "a"], [0, 1, 2], [100, 100, 32], [5, 3, 4], 132)
    assert starts == [0, 5, 5]


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_decode=st.sampled_from([0, 128, 256]), prompts=st.lists(st.sampled_from([128, 256]), max_size=2))
def test_every_emitted_plan_verifies(num_decode, prompts):
    if num_decode == 0 and not prompts:
        prompts = [128]
    problem = _problem(num_decode, prompts)
    schedule, _ = solve(problem, solver="cpsat", time_limit_s=0.5, threads=1, seed=0)
    verify(schedule)
    assert schedule.predicted.makespan_ms <= sequential_plan(problem).predicted.makespan_ms + 1e-9


def test_threads_never_change_the_plan(small, solved):
    """--threads runs the top structures' stage-2 solves side by side; each solve is single-threaded
    and stops on deterministic work, so the plan is byte-identical for 1 and 2 threads."""
    one, _ = solve(small, solver="cpsat", time_limit_s=1.0, threads=1, seed=3)
    assert plan_io.to_json(one) == plan_io.to_json(solved[0])


def test_stage2_runs_on_the_top_structures(small, solved):
    from nfsearch.search.solve import TOP_K, WITHIN
    notes = solved[1]
    ranked = sweep(small, 128)
    expected = [c for c in ranked[:TOP_K] if c.judge_ms <= ranked[0].judge_ms * (1 + WITHIN)]
    # each of the top structures twice: with the cross-stream event wait in the model and without
    described = {note.split(" (")[1].split(", split")[0] for note in notes if note.startswith("stage 2 #")}
    assert described == {c.frame.structure.describe() for c in expected}
    assert sum(note.startswith("stage 2 #") for note in notes) == 2 * len(described)


def test_solved_plans_use_only_buildable_layouts(small, solved):
    """Every SM count of the plan is a group size of some buildable layout, and every co-running
    set fits one layout (verify's check_layouts)."""
    from nfsearch.layouts import sm_counts
    from nfsearch.simulate import check_layouts
    schedule = solved[0]
    counts = sm_counts(schedule.gpu.num_sms, schedule.gpu.sm_granularity)
    assert all(o.sm_count in counts for o in schedule.nano_ops)
    check_layouts(schedule)
    for cand in sweep(small, 128):
        check_layouts(cand.plan)


def test_polish_only_keeps_faster_buildable_plans(small):
    from nfsearch.search.polish import polish
    from nfsearch.simulate import check_layouts
    start = sweep(small, 128)[0].plan
    polished, moves = polish(small, start, max_evaluations=60)
    assert polished.predicted.makespan_ms <= start.predicted.makespan_ms
    assert (moves == 0) == (polished is start)
    verify(polished)
    check_layouts(polished)


@pytest.mark.slow
def test_an_overlapped_plan_must_beat_sequential_by_the_margin():
    """min_gain: the overlapped plan the search finds for W2 on the bundled H100 profile without a
    margin is replaced by the sequential plan when the margin exceeds its predicted gain (at the power
    cap, its nano-batches' own energy counted, 1-2%: inside the default margin too)."""
    from nfsearch.cost import default_profile
    from nfsearch.specs import load_workload
    model, workload = load_model("llama-3-8b"), load_workload("W2")
    small = make_problem(model, workload, default_profile(model, workload))
    seq_ms = sequential_plan(small).predicted.makespan_ms
    kept, _ = solve(small, solver="cpsat", time_limit_s=1.0, threads=1, seed=0, min_gain=0.0)
    gain = 1.0 - kept.predicted.makespan_ms / seq_ms
    assert gain > 0.01, "the test needs a problem where overlap is predicted to pay"
    assert kept.solver.source != "sequential baseline"
    fallback, notes = solve(small, solver="cpsat", time_limit_s=1.0, threads=1, seed=0, min_gain=gain + 0.01)
    assert fallback.solver.source == "sequential baseline"
    assert fallback.predicted.makespan_ms == pytest.approx(seq_ms, rel=1e-9)
    assert any(n.startswith("margin:") for n in notes)
    verify(fallback)
    with pytest.raises(NfsearchError, match="min_gain"):
        solve(small, solver="cpsat", time_limit_s=1.0, min_gain=float("nan"))


def test_per_group_structures_beat_every_uniform_one_on_w2():
    """Stage 1 per op group: on the bundled H100 profile, W2's best structure cuts the attention,
    projection and FFN groups differently and replays faster than every uniform structure (measured
    when written: 3.84 ms against 4.18 for 2 layers)."""
    from nfsearch.cost import default_profile
    from nfsearch.graph import OP_GROUPS
    from nfsearch.specs import load_workload
    model, workload = load_model("llama-3-8b"), load_workload("W2")
    problem = make_problem(model, workload, default_profile(model, workload))
    ranked = sweep(problem, 128)
    best_uniform = min(c.judge_ms for c in ranked if c.is_uniform)
    best = ranked[0]
    assert not best.is_uniform and best.judge_ms < 0.97 * best_uniform
    cuts_by_group = {}
    for op, sizes in best.frame.structure.sizes:
        cuts_by_group.setdefault(OP_GROUPS[op], set()).add(len(sizes))
    assert len({frozenset(v) for v in cuts_by_group.values()}) > 1       # the groups are cut differently
    verify(best.plan)


# ---- the plan's solver section, one judge, labelled times, solve as steps ------------------------

def test_a_stage2_plan_states_its_own_solves_gap(small):
    """only_stage2: the plan is stage 2's best solution, and its solver section is that solve's."""
    from nfsearch.search.candidates import GAP_SCOPE
    schedule, _ = solve(small, solver="cpsat", time_limit_s=1.0, threads=2, seed=3, only_stage2=True)
    info = schedule.solver
    assert info.source.startswith("cpsat solution #") and info.status in ("optimal", "feasible")
    assert info.gap is not None and info.model_makespan_ms is not None and info.gap_scope == GAP_SCOPE
    verify(schedule)


def test_the_solver_section_describes_the_written_plan(solved):
    """A plan that is not a stage-2 solution states no stage-2 gap and says what it is."""
    info = solved[0].solver
    is_stage2 = info.source.startswith("cpsat solution #")
    assert (info.gap is None) == (not is_stage2) and (info.model_makespan_ms is None) == (not is_stage2)
    if not is_stage2:
        assert info.status in ("incumbent", "fallback") and info.gap_scope.startswith("none: the plan is")


def test_w4s_sequential_plan_prints_no_stage2_gap(tmp_path):
    """W4 (llama-3-70b, TP=2, analytic profile) writes the sequential plan: it once stated and printed
    the stage-2 model's "gap 1.95%"; now no gap, and where the plan comes from."""
    from click.testing import CliRunner

    from nfsearch.cli import main
    out = tmp_path / "w4.json"
    got = CliRunner().invoke(main, ["solve", "--model", "llama-3-70b", "--workload", "W4", "--time-limit", "2",
                                    "-o", str(out)])
    assert got.exit_code == 0, got.output
    info = plan_io.read(out).solver
    assert info.source == "sequential baseline" and info.status == "fallback"
    assert info.gap is None and info.model_makespan_ms is None and info.model_bound_ms is None
    assert info.structure == "unsplit" and "sequential baseline" in info.gap_scope
    assert "no stage-2 gap (sequential baseline)" in got.output and "stage-2 gap 1" not in got.output


def test_one_judge_for_solve_and_check(small, solved):
    """simulate.judge is THE predicted time: solve's closing note and `nfsearch check` use it; the
    three older ways of making it are gone."""
    import importlib

    from nfsearch import cost, golden, simulate
    from nfsearch.simulate import judge
    schedule, notes = solved
    judged = judge(schedule, small.cost)
    assert f"predicted {judged.layer_ms:.4f} ms per layer" in notes[-1]
    assert golden.rescore(schedule, small) == pytest.approx(judged.ranked_makespan_ms)
    assert judged.makespan_ms == pytest.approx(judged.layer_ms * small.num_layers)
    solve_module = importlib.import_module("nfsearch.search.solve")
    assert not hasattr(simulate.Replay, "layer_time_ms") and not hasattr(cost.CostModel, "predicted_layer_ms")
    assert not hasattr(solve_module, "_judged_layer_ms") and not hasattr(solve_module, "judged_makespan_ms")


def test_every_time_in_the_notes_says_per_layer_or_per_plan(solved):
    import re
    for note in solved[1]:
        if re.search(r"\d ms", note):
            assert re.search(r"per layer|for \d+ layers|per \d+ layers", note), note


def test_solve_is_steps_of_at_most_40_lines():
    import importlib
    import inspect
    for module in ("nfsearch.search.solve", "nfsearch.search.candidates"):
        mod = importlib.import_module(module)
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ == module:
                assert len(inspect.getsource(fn).splitlines()) <= 40, f"{module}.{name}"
