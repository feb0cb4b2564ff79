"""Replay on tiny hand-computed cases (fake profile), with exact expected start/end times.

Interference (published NanoFlow curves): an op of class c on a share R of the SMs, beside an op of
another class, takes max(solo time at its SMs, full-GPU time / P_c(R)), with P_compute(R) = R,
P_memory(0.3) = 0.5, P_other(0.5) = 0.7. Ops co-run as a fluid: each progresses at 1 / (its current
time) and rates change whenever an op starts or ends.
"""

import math
import time

import pytest

from conftest import FAKE_SMS, TINY_MODEL, TINY_WL, fake_profile, fake_time, table_from_points
from nfsearch.search.baselines import sequential_plan
from nfsearch.cost import Interference, Overheads
from nfsearch.plan import PlanGpu, PlannedOp, PlanProfile, Schedule, SolverInfo
from nfsearch.cost import make_problem
from nfsearch.errors import NfsearchError
from nfsearch.simulate import PlanInvalid, check_and_judge, replay, stated_timeline, verify

EXACT = 1e-9

# fake times (ms) over 128 tokens; decode_attn is keyed by context 512, prefill_attn by prompt 128
POINTS = {
    ("decode_attn", 512): {(128, 30): 1.0, (128, 70): 1.0, (128, 100): 1.0},
    ("prefill_attn", 128): {(128, 50): 0.8, (128, 70): 0.75, (128, 100): 0.5},
    ("kqv", 0): {(128, 30): 0.5, (128, 70): 0.25, (128, 100): 0.125},
    ("rope_append", 0): {(128, 30): 0.125, (128, 100): 0.125},
    ("norm1", 0): {(128, 50): 0.35, (128, 100): 0.35},
}
CLASSES = {"decode_attn": "memory", "prefill_attn": "compute", "kqv": "compute", "rope_append": "other",
           "norm1": "other"}


def _cost(event_wait_ms: float = 0.0):
    """The fake table's cost model; cross-stream event waits cost nothing unless asked (the hand
    computations below are of rates alone)."""
    cost = make_problem(TINY_MODEL, TINY_WL, table_from_points(POINTS), num_layers=1).cost
    cost.overheads = Overheads(event_wait_ms, "test")
    return cost


def _schedule(*rows) -> Schedule:
    """rows: (op, stream, sm_count, deps) in issue order; every op over 128 tokens of layer 0."""
    ops = tuple(PlannedOp(id=f"L0.{op}#0", layer=0, op=op, index=0, op_class=CLASSES[op], tokens=(0, 128),
                          stream=stream, order=i, sm_count=sms, impl="fake",
                          deps=tuple(f"L0.{d}#0" for d in deps), start_ms=0.0, end_ms=0.0)
                for i, (op, stream, sms, deps) in enumerate(rows))
    return Schedule(TINY_MODEL, TINY_WL, PlanGpu("Fake GPU", FAKE_SMS, 2),
                    PlanProfile("0" * 16, "fake", "fake"), 1, ops, None, SolverInfo("hand"))


def _times(schedule, event_wait_ms: float = 0.0):
    return {s.op: (s.start_ms, s.end_ms) for s in replay(schedule, _cost(event_wait_ms)).timeline.spans}


def _assert_times(got, want):
    assert set(got) == set(want)
    for op, (start, end) in want.items():
        assert got[op][0] == pytest.approx(start, abs=EXACT), op
        assert got[op][1] == pytest.approx(end, abs=EXACT), op


def test_interference_curves_used():
    i = Interference()
    assert i.speed("compute", 0.7) == pytest.approx(0.7)
    assert i.speed("memory", 0.3) == pytest.approx(0.5)
    assert i.speed("other", 0.5) == pytest.approx(0.7)
    cost = _cost()
    assert cost.stretched_ms("decode_attn", 128, 30, frozenset({"compute"})) == pytest.approx(2.0)
    assert cost.stretched_ms("decode_attn", 128, 30, frozenset({"memory"})) == pytest.approx(1.0)
    assert cost.stretched_ms("prefill_attn", 128, 70, frozenset({"memory"})) == pytest.approx(0.75)


def test_single_op():
    _assert_times(_times(_schedule(("kqv", "s", 70, ()))), {"kqv": (0.0, 0.25)})


def test_memory_op_stretched_beside_compute():
    # decode on 30 SMs: 1.0 solo, 1.0 / P_mem(0.3) = 2.0 beside compute.
    # prefill on 70 SMs: 0.75 solo; 0.5 / P_compute(0.7) = 0.714 < 0.75, so not stretched.
    # 0 .. 0.75: both run; decode does 0.75 / 2.0 = 0.375 of its work.
    # 0.75 ..  : decode alone at 1.0 ms per op: 0.625 left -> ends 1.375.
    got = _times(_schedule(("decode_attn", "mem", 30, ()), ("prefill_attn", "cmp", 70, ())))
    _assert_times(got, {"decode_attn": (0.0, 1.375), "prefill_attn": (0.0, 0.75)})


def test_compute_op_stretched_beside_other():
    # prefill on 50 SMs: 0.8 solo; beside another class 0.5 / P_compute(0.5) = 1.0.
    # norm1 on 50 SMs: 0.35 solo; beside compute 0.35 / P_other(0.5) = 0.5.
    # 0 .. 0.5: both; norm1 ends, prefill did 0.5 / 1.0 = half. Then 0.5 left at 0.8 -> +0.4 = 0.9.
    got = _times(_schedule(("prefill_attn", "cmp", 50, ()), ("norm1", "oth", 50, ())))
    _assert_times(got, {"prefill_attn": (0.0, 0.9), "norm1": (0.0, 0.5)})


def test_same_class_no_stretch():
    got = _times(_schedule(("prefill_attn", "a", 70, ()), ("kqv", "b", 30, ())))
    _assert_times(got, {"prefill_attn": (0.0, 0.75), "kqv": (0.0, 0.5)})


def test_op_waits_for_free_sms():
    # 70 + 70 > 100 SMs: the second waits for the first, though on another stream
    got = _times(_schedule(("prefill_attn", "a", 70, ()), ("decode_attn", "b", 70, ())))
    _assert_times(got, {"prefill_attn": (0.0, 0.75), "decode_attn": (0.75, 1.75)})
    got = _times(_schedule(("decode_attn", "b", 70, ()), ("prefill_attn", "a", 70, ())))
    _assert_times(got, {"decode_attn": (0.0, 1.0), "prefill_attn": (1.0, 1.75)})


def test_stream_order_serialises():
    got = _times(_schedule(("prefill_attn", "a", 30 + 20, ()), ("kqv", "a", 30, ())))
    _assert_times(got, {"prefill_attn": (0.0, 0.8), "kqv": (0.8, 1.3)})


def test_dependencies_and_rate_changes():
    # rope (other, 30 SMs) alone 0 .. 0.125; then prefill (70) and decode (30) both wait on it,
    # start together at 0.125 and run as in test_memory_op_stretched_beside_compute.
    sched = _schedule(("rope_append", "oth", 30, ()), ("prefill_attn", "cmp", 70, ("rope_append",)),
                      ("decode_attn", "mem", 30, ("rope_append",)))
    got = _times(sched)
    _assert_times(got, {"rope_append": (0.0, 0.125), "prefill_attn": (0.125, 0.875),
                        "decode_attn": (0.125, 1.5)})
    assert replay(sched, _cost()).makespan_ms == pytest.approx(1.5, abs=EXACT)


def test_new_op_starting_midway_keeps_stretch():
    # decode (30) beside prefill (70) until 0.75 [0.375 done], then beside kqv (70, 0.25 solo;
    # 0.125 / 0.7 < 0.25 so unstretched) until 1.0 [0.125 more: 0.5 done], then alone: ends 1.5.
    got = _times(_schedule(("decode_attn", "mem", 30, ()), ("prefill_attn", "cmp", 70, ()),
                           ("kqv", "cmp", 70, ())))
    _assert_times(got, {"decode_attn": (0.0, 1.5), "prefill_attn": (0.0, 0.75), "kqv": (0.75, 1.0)})


def test_deadlock_is_plan_invalid():
    # kqv waits on prefill, which is behind kqv on the same stream
    with pytest.raises(PlanInvalid, match="deadlock"):
        replay(_schedule(("kqv", "a", 70, ("prefill_attn",)), ("prefill_attn", "a", 70, ())), _cost())
    with pytest.raises(PlanInvalid, match="deadlock"):
        replay(_schedule(("kqv", "a", 130, ())), _cost())


def test_sequential_plan_is_sum_of_full_gpu_times():
    problem = make_problem(TINY_MODEL, TINY_WL, fake_profile(), num_layers=2)
    sched = sequential_plan(problem)
    layer = problem.layer
    expected = 0.0
    for name in layer.nodes:
        start, end = layer.nodes[name]["token_range"]
        expected += fake_time(layer.nodes[name]["op"].op_class, name, end - start, FAKE_SMS)
    # by hand: 256-token ops 2 * (0.0625 + 0.25 + 0.0625 + 0.125 + 0.0625 + 0.5 + 0.0625 + 0.25)
    #          + decode 1.0 + prefill 0.5 over 128 tokens
    assert expected == pytest.approx(2 * 1.375 + 1.5)
    result = replay(sched, problem.cost)
    assert result.makespan_ms == pytest.approx(2 * expected, abs=EXACT)
    assert result.timeline.layer_time_ms == pytest.approx(expected, abs=EXACT)
    assert sched.predicted.makespan_ms == pytest.approx(2 * expected, abs=EXACT)
    assert sched.predicted.sequential_layer_time_ms == pytest.approx(expected, abs=EXACT)
    spans = sorted(result.timeline.spans, key=lambda s: s.start_ms)
    assert all(a.end_ms == pytest.approx(b.start_ms, abs=EXACT) for a, b in zip(spans, spans[1:]))
    assert all(s.sm_count == FAKE_SMS and s.stream == "main" for s in spans)
    # the plan's stated times are its replay
    stated = stated_timeline(sched).by_id()
    for s in spans:
        assert stated[s.id].start_ms == pytest.approx(s.start_ms) and stated[s.id].end_ms == pytest.approx(s.end_ms)


def test_sequential_plan_real_model_is_sum_of_solo_times_and_gaps():
    from nfsearch.cost import default_profile
    from nfsearch.specs import load_model, load_workload
    model, w = load_model("llama-3-8b"), load_workload("W2")
    problem = make_problem(model, w, default_profile(model, w), num_layers=1)
    total = sum(problem.cost.solo_ms(n, e - s, problem.gpu.num_sms)
                for n, (s, e) in ((n, problem.layer.nodes[n]["token_range"]) for n in problem.layer.nodes))
    # each op after the first starts the (calibrated) launch gap after the one before it
    gaps = (len(problem.layer.nodes) - 1) * problem.cost.launch_gap_ms
    assert problem.cost.launch_gap_ms > 0
    assert replay(sequential_plan(problem), problem.cost).makespan_ms == pytest.approx(total + gaps, rel=1e-9)


# ---- bad profiles and the plan's own profile -------------------------------------------------------

def _cost_from(points, interference=None):
    problem = make_problem(TINY_MODEL, TINY_WL, table_from_points(points), num_layers=1)
    if interference is not None:
        problem.cost.interference = interference
    problem.cost.overheads = Overheads(0.0, "test")
    return problem.cost


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_replay_refuses_non_finite_profile_time(bad):
    """A profile time of inf/NaN once made replay loop forever: now it is refused (by the profile
    loader, or else by replay) with one line, at once."""
    points = {**POINTS, ("kqv", 0): {(128, 30): 0.5, (128, 70): bad, (128, 100): 0.125}}
    began = time.perf_counter()
    with pytest.raises(NfsearchError) as err:
        replay(_schedule(("kqv", "s", 70, ())), _cost_from(points))
    assert "\n" not in str(err.value) and time.perf_counter() - began < 5


class _UnboundedCorun(Interference):
    """An interference model that answers an infinite co-run time: replay must refuse it, not loop."""
    def corun_ms(self, op_class, solo_ms, full_gpu_ms, share):
        return math.inf


def test_replay_refuses_infinite_corun_time():
    cost = _cost_from(POINTS, _UnboundedCorun("unbounded"))
    with pytest.raises(NfsearchError, match="finite and positive") as err:
        replay(_schedule(("decode_attn", "mem", 30, ()), ("prefill_attn", "cmp", 70, ())), cost)
    assert "\n" not in str(err.value)
    # alone (no co-run) the same cost model replays fine
    assert replay(_schedule(("kqv", "s", 70, ())), cost).makespan_ms == pytest.approx(0.25, abs=EXACT)


def test_replay_retires_ops_that_end_together():
    """Two same-class ops on two streams end at the same instant, then a third follows; each step
    retires at least the first op to end, exactly, so replay finishes (a step cap guards it)."""
    points = {**POINTS, ("prefill_attn", 128): {(128, 20): 0.5, (128, 100): 0.125}}
    got = replay(_schedule(("kqv", "a", 30, ()), ("prefill_attn", "b", 20, ()), ("rope_append", "a", 30, ())),
                 _cost_from(points))
    assert sorted((s.op, round(s.start_ms, 9), round(s.end_ms, 9)) for s in got.timeline.spans) == [
        ("kqv", 0.0, 0.5), ("prefill_attn", 0.0, 0.5), ("rope_append", 0.5, 0.625)]


def test_check_and_judge_needs_the_plans_profile_unless_named():
    problem = make_problem(TINY_MODEL, TINY_WL, fake_profile(), num_layers=2)
    schedule = sequential_plan(problem)
    assert check_and_judge(schedule, problem.cost, is_profile_given=False).replay.makespan_ms == pytest.approx(
        schedule.predicted.makespan_ms, abs=1e-6)
    other = make_problem(TINY_MODEL, TINY_WL, fake_profile(sms=(10, 50, 100)), num_layers=2)
    assert other.profile.fingerprint() != schedule.profile.fingerprint
    with pytest.raises(NfsearchError, match="made with profile .* name a profile explicitly") as err:
        check_and_judge(schedule, other.cost, is_profile_given=False)
    assert "\n" not in str(err.value)
    assert check_and_judge(schedule, other.cost, is_profile_given=True).replay.makespan_ms > 0


def test_same_class_side_by_side_capped_at_the_whole_gpu():
    # rope_append (0.125 ms) and norm1 (0.35 ms), class other, take the same time on 30/50 SMs as on
    # all 100: side by side each would use the whole GPU's speed, so together they run at half rate.
    # rope ends at 0.25 (norm1 has done 0.25 / 0.7 of its work); norm1 then alone: ends 0.475, the
    # same as back to back on the whole GPU.
    got = _times(_schedule(("rope_append", "a", 30, ()), ("norm1", "b", 50, ())))
    _assert_times(got, {"rope_append": (0.0, 0.25), "norm1": (0.0, 0.475)})


def test_cross_stream_wait_delays_only_dependants_on_other_streams():
    # kqv (0.25 ms on 70 SMs) on stream a; rope_append after it on stream a starts at once, norm1
    # after it on stream b waits for kqv's event: 0.25 + 0.005
    got = _times(_schedule(("kqv", "a", 70, ()), ("rope_append", "a", 30, ("kqv",)), ("norm1", "b", 50, ("kqv",))),
                 event_wait_ms=0.005)
    assert got["rope_append"][0] == pytest.approx(0.25, abs=EXACT)
    assert got["norm1"][0] == pytest.approx(0.255, abs=EXACT)


def test_default_event_wait_is_labelled_and_profile_overrides_it():
    from nfsearch.cost import DEFAULT_EVENT_WAIT_US, overheads_from_meta
    default = overheads_from_meta({})
    assert default.event_wait_ms == pytest.approx(DEFAULT_EVENT_WAIT_US / 1e3) and "default" in default.source
    measured = overheads_from_meta({"overheads": {"event_wait_us": 3.5}})
    assert measured.event_wait_ms == pytest.approx(0.0035) and measured.source == "measured"
    with pytest.raises(NfsearchError):
        overheads_from_meta({"overheads": {"event_wait_us": "fast"}})
    assert "cross-stream wait" in make_problem(TINY_MODEL, TINY_WL, table_from_points(POINTS), 1).plan_profile().interference


# ---- buildable layouts -----------------------------------------------------------------------------

def _timed(gpu, *rows):
    """rows: (op, stream, sm_count, start, end); a schedule with these stated times (no deps)."""
    ops = tuple(PlannedOp(id=f"L0.{op}#0", layer=0, op=op, index=0, op_class=CLASSES[op], tokens=(0, 128),
                          stream=stream, order=i, sm_count=sms, impl="fake", deps=(), start_ms=start, end_ms=end)
                for i, (op, stream, sms, start, end) in enumerate(rows))
    return Schedule(TINY_MODEL, TINY_WL, gpu, PlanProfile("0" * 16, "fake", "fake"), 1, ops, None, SolverInfo("hand"))


def test_check_layouts_accepts_what_one_layout_gives():
    from nfsearch.simulate import check_layouts
    gpu = PlanGpu("Fake GPU", FAKE_SMS, 2)
    check_layouts(_timed(gpu, ("kqv", "a", 30, 0, 1), ("decode_attn", "b", 70, 0, 1)))
    check_layouts(_timed(gpu, ("kqv", "a", 30, 0, 1), ("decode_attn", "b", 30, 0, 1), ("norm1", "c", 40, 0, 1)))
    # two ops on 30 one after the other beside one on 70: one layout (30, 70)
    check_layouts(_timed(gpu, ("kqv", "a", 30, 0, 1), ("norm1", "a", 30, 1, 2), ("decode_attn", "b", 70, 0, 2)))


def test_check_layouts_rejects_four_groups_and_two_remainders():
    from nfsearch.simulate import check_layouts
    gpu = PlanGpu("Fake GPU", FAKE_SMS, 2)
    # three ops on 30 SMs side by side leave 10 idle: four groups, the executor builds at most three
    with pytest.raises(PlanInvalid, match="no buildable green-context layout"):
        check_layouts(_timed(gpu, ("kqv", "a", 30, 0, 1), ("decode_attn", "b", 30, 0, 1), ("norm1", "c", 30, 0, 1)))
    # on an H100 (132 SMs, granularity 8) 28 and 36 are both remainders (132 - 104, 132 - 96): no layout
    # has both, though they fit in SMs
    h100 = PlanGpu("H100", 132, 8)
    with pytest.raises(PlanInvalid, match=r"\(28, 36\)"):
        check_layouts(_timed(h100, ("kqv", "a", 28, 0, 1), ("decode_attn", "b", 36, 0, 1)))
    check_layouts(_timed(h100, ("kqv", "a", 96, 0, 1), ("decode_attn", "b", 36, 0, 1)))
    # a chain of overlaps is one co-running set: 100 beside 32, then 96 beside the same 32 -> needs
    # 100 and 96 and 32 in one layout (228 SMs): refused
    with pytest.raises(PlanInvalid):
        check_layouts(_timed(h100, ("kqv", "a", 100, 0, 1), ("decode_attn", "b", 32, 0, 2),
                             ("norm1", "a", 96, 1, 2)))


def test_verify_refuses_zero_stated_time_and_unknown_impl():
    from dataclasses import replace as dc_replace
    problem = make_problem(TINY_MODEL, TINY_WL, fake_profile(), num_layers=1)
    plan = sequential_plan(problem)
    verify(plan)
    first = min(plan.nano_ops, key=lambda o: o.order)
    zero = dc_replace(plan, nano_ops=tuple(dc_replace(o, end_ms=o.start_ms) if o is first else o for o in plan.nano_ops))
    with pytest.raises(NfsearchError, match="stated duration"):
        verify(zero)
    with pytest.raises(NfsearchError, match="unknown impl"):
        dc_replace(first, impl="warp-drive")


def test_a_plan_says_how_many_of_its_co_run_estimates_were_measured():
    from pathlib import Path

    from nfsearch import plan as plan_mod
    from nfsearch import profile as profile_mod
    from nfsearch.cost import make_problem
    from nfsearch.search.baselines import sequential_plan
    from nfsearch.simulate import corun_sources, sources_line
    root = Path(__file__).resolve().parent.parent
    # W4 solved on the quick 2x H100 TP profile: its 384-token nano-batches beside the 1280-request
    # decode fell outside every measured pair (it ran 10-14% slower than replayed)
    tp = root / "tests/fixtures/tp"
    s = plan_mod.read(tp / "W4-H100x2-quick.plan.json")
    problem = make_problem(s.model, s.workload, profile_mod.load(tp / "W4-H100x2-quick.parquet"), s.num_layers)
    counts = corun_sources(s, problem.cost)
    assert sum(counts.values()) == 22 and not any(counts[k] for k in ("pair table", "co-run rows"))
    line = sources_line(counts)
    assert line.startswith("co-run estimates: 0 of 22 from measured pairs") and "fewer than half" in line
    # the bundled W2 plan: most of its co-runs are measured pairs; no hint
    w2 = plan_mod.read(root / "tests/fixtures/plans/W2.json")
    problem = make_problem(w2.model, w2.workload, profile_mod.load(root / "profiles/h100-sxm/llama-3-8b.parquet"),
                           w2.num_layers)
    line = sources_line(corun_sources(w2, problem.cost))
    assert line.startswith("co-run estimates: 8 of 12 from measured pairs") and "fewer than half" not in line
    # the search's own lookups do not count, and a plan with no co-run has no line
    assert sources_line(corun_sources(sequential_plan(problem), problem.cost)) == ""
