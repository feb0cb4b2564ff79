"""The kernel-trace mapping of `run --timeline` (nfsearch.runtime.trace) on synthetic Chrome-trace
events shaped like torch.profiler's: a signature pass (one host range per launch, launch calls and
kernels tied by correlation) and graph replays (kernels carrying their cudaGraphLaunch's correlation),
the replayed kernels timed as the plan states. No GPU: the events are made here."""

import pytest

from nfsearch.errors import NfsearchError

from nfsearch.cost import make_problem
from nfsearch.roofline import analytic_profile
from nfsearch.runtime import launch
from nfsearch.runtime.trace import (
    Expected,
    Kernel,
    TraceError,
    match_kernels,
    replays_from_events,
    signatures_from_events,
    timeline_from_events,
)
from nfsearch.search.baselines import equal_split_plan
from nfsearch.specs import ModelSpec, Workload, load_gpu

MODEL = ModelSpec("tiny", 256, 4, 2, 64, 512, 2, 1000)
WORKLOAD = Workload("tiny", 6, 40, (20, 13))


@pytest.fixture(scope="module")
def plan_and_launches():
    p = make_problem(MODEL, WORKLOAD, analytic_profile(MODEL, WORKLOAD, load_gpu("h100-sxm")), 2,
                     allow_extrapolation=True)
    s = equal_split_plan(p, 2)
    return s, launch.build(s, num_sms=132, granularity=8)


def kernel_names(l):
    # GEMMs run two kernels (e.g. a split-K reduce after the main loop), the rest one
    return [f"{l.op}_main", f"{l.op}_reduce"] if l.op_class == "compute" else [f"{l.op}_kernel"]


def executed_ms(schedule, ll):
    """(start, end) of each launch as the GPU would run them: the plan's durations, a launch starting
    at its stated time or once its stream key's previous launch and its waits are done (launches of
    one key share one CUDA stream and run in issue order)."""
    stated = {o.id: o for o in schedule.nano_ops}
    out, last = {}, {}
    for l in ll.launches:
        o = stated[l.id]
        start = max([o.start_ms, last.get(l.key, 0.0)] + [out[w][1] for w in l.waits])
        out[l.id] = (start, start + o.end_ms - o.start_ms)
        last[l.key] = out[l.id][1]
    return out


def events_for(schedule, ll, replay_scales=(1.0,), rename=None, drop=None):
    """Chrome-trace events of a signature pass and one graph replay per scale (the plan's stated
    times, scaled, as the replayed kernels' times, in microseconds)."""
    ev, corr, t = [], 1000, 0.0
    for l in ll.launches:                      # signature pass: host range, launch call, kernel
        names = kernel_names(l)
        ev.append({"ph": "X", "cat": "user_annotation", "name": f"nf:{l.id}", "ts": t, "dur": 100.0, "tid": 7})
        for j, name in enumerate(names):
            corr += 1
            ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": t + 1 + j, "dur": 0.5,
                       "tid": 7, "args": {"correlation": corr}})
            ev.append({"ph": "X", "cat": "kernel", "name": name, "ts": t + 5 + 10 * j, "dur": 8.0,
                       "args": {"correlation": corr, "stream": 3}})
        t += 200.0
    stated = executed_ms(schedule, ll)
    for r, scale in enumerate(replay_scales):
        corr += 1
        base = t + 1000.0 * (r + 1) + 5000.0 * r
        ev.append({"ph": "X", "cat": "user_annotation", "name": f"nf:replay:{r}", "ts": base - 10, "dur": 4000.0,
                   "tid": 7})
        ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": base - 5, "dur": 2.0, "tid": 7,
                   "args": {"correlation": corr}})
        for l in ll.launches:
            start, end = stated[l.id]
            lo, hi = base + start * 1e3 * scale, base + end * 1e3 * scale
            names = kernel_names(l)
            step = (hi - lo) / len(names)
            for j, name in enumerate(names):
                if drop == (l.id, j):
                    continue
                shown = rename(name) if rename else name
                ev.append({"ph": "X", "cat": "kernel", "name": shown, "ts": lo + j * step, "dur": step,
                           "args": {"correlation": corr, "stream": 20 + l.layout.num_groups}})
    return ev


def test_signatures_follow_the_launch_ranges(plan_and_launches):
    s, ll = plan_and_launches
    ev = events_for(s, ll)
    sig = signatures_from_events(ev, [l.id for l in ll.launches])
    for l in ll.launches:
        assert [k.name for k in sig[l.id]] == kernel_names(l)
    # without launch calls in the trace, the kernel inside a range's window still belongs to it
    bare = [e for e in ev if e.get("cat") != "cuda_runtime"]
    sig2 = signatures_from_events(bare, [l.id for l in ll.launches])
    assert {k: [x.name for x in v] for k, v in sig2.items()} == {k: [x.name for x in v] for k, v in sig.items()}


def test_graph_replay_maps_to_one_span_per_nano_op(plan_and_launches):
    s, ll = plan_and_launches
    tl, facts = timeline_from_events(events_for(s, ll), ll.launches, "measured (test)", ll.num_layers)
    assert len(tl.spans) == len(ll.launches) == len(s.nano_ops)
    assert facts["method"] == "names" and facts["num_skipped"] == 0 and facts["num_replays"] == 1
    want = executed_ms(s, ll)
    first = min(a for a, _ in want.values())
    got = tl.by_id()
    for o in s.nano_ops:
        assert got[o.id].start_ms == pytest.approx(want[o.id][0] - first, abs=1e-9)
        assert got[o.id].end_ms == pytest.approx(want[o.id][1] - first, abs=1e-9)
        assert got[o.id].duration_ms > 0


def test_copies_belong_to_their_nano_op_span(plan_and_launches):
    """A copy-engine all-reduce runs peer copies, then its sum kernel: the copies are records of
    category gpu_memcpy, and the nano-op's span starts with them (here every GEMM's first record is
    made a copy: the spans must still be the stated ones)."""
    s, ll = plan_and_launches
    ev = [dict(e, cat="gpu_memcpy", name="Memcpy PtoP (Device -> Device)") if e.get("cat") == "kernel"
          and e["name"].endswith("_main") else e for e in events_for(s, ll)]
    tl, facts = timeline_from_events(ev, ll.launches, "measured (test)", ll.num_layers)
    assert facts["num_skipped"] == 0 and len(tl.spans) == len(s.nano_ops)
    want, got = executed_ms(s, ll), tl.by_id()
    first = min(a for a, _ in want.values())
    for o in s.nano_ops:
        assert got[o.id].start_ms == pytest.approx(want[o.id][0] - first, abs=1e-9)


def test_the_median_replay_is_kept(plan_and_launches):
    s, ll = plan_and_launches
    tl, facts = timeline_from_events(events_for(s, ll, (1.0, 1.3, 0.9)), ll.launches, "m", ll.num_layers)
    assert facts["num_replays"] == 3
    # makespans 0.9x, 1x, 1.3x the stated one: the median is the stated one
    want = executed_ms(s, ll).values()
    assert tl.makespan_ms == pytest.approx(max(b for _, b in want) - min(a for a, _ in want), rel=1e-6)


def test_renamed_kernels_fall_back_to_structure_and_say_so(plan_and_launches):
    s, ll = plan_and_launches
    tl, facts = timeline_from_events(events_for(s, ll, rename=lambda n: "sm90_" + n), ll.launches, "m",
                                     ll.num_layers)
    assert facts["method"] == "structure"
    assert "structure" in tl.label
    assert len(tl.spans) == len(ll.launches)


def test_a_missing_kernel_is_an_error_not_a_short_span(plan_and_launches):
    s, ll = plan_and_launches
    victim = next(l for l in ll.launches if l.op_class == "compute")
    with pytest.raises(TraceError, match="not found"):
        timeline_from_events(events_for(s, ll, drop=(victim.id, 1)), ll.launches, "m", ll.num_layers)


def test_replays_group_by_graph_launch_else_by_range(plan_and_launches):
    s, ll = plan_and_launches
    ev = events_for(s, ll, (1.0, 1.1))
    groups = replays_from_events(ev)
    n = sum(len(kernel_names(l)) for l in ll.launches)
    assert [len(g) for g in groups] == [n, n]
    # kernels that lost their correlation are grouped by the nf:replay:<i> ranges
    stripped = [dict(e, args={"stream": 1}) if e.get("cat") == "kernel" else e for e in ev
                if e.get("name") != "cudaGraphLaunch"]
    assert [len(g) for g in replays_from_events(stripped)] == [n, n]


def test_greedy_match_respects_stream_order_and_waits():
    # two streams; b1 waits on a1; same kernel names on both streams
    expected = [Expected("a1", "s0", (), ("gemm",)), Expected("b1", "s1", ("a1",), ("gemm",)),
                Expected("a2", "s0", (), ("gemm",))]
    # a1 [0,10], a2 [10,20] on s0; b1 starts at 10 too (after a1) and ends at 30
    kernels = [Kernel("gemm", 0, 10), Kernel("gemm", 10, 20), Kernel("gemm", 10.0, 30)]
    m = match_kernels(kernels, expected)
    assert m.bounds_us("a1") == (0, 10)
    # at equal starts the earlier-issued launch that may run takes the first kernel: b1 (issued before a2)
    assert {m.bounds_us("b1"), m.bounds_us("a2")} == {(10, 20), (10, 30)}
    assert m.num_skipped == 0
    # an extra kernel nobody expects is skipped, not forced onto a launch
    m2 = match_kernels(kernels + [Kernel("memset", 40, 41)], expected)
    assert m2.num_skipped == 1
    with pytest.raises(TraceError):
        Expected("x", "s0", (), ())


def test_only_the_last_replays_are_kept(plan_and_launches):
    """The steady replays come first and are dropped: of scales (2.0, 2.0, 1.0, 1.1, 0.9) only the
    last three count, so the kept median is 1.0 x the executed times, not 2.0."""
    s, ll = plan_and_launches
    want = executed_ms(s, ll).values()
    stated = max(b for _, b in want) - min(a for a, _ in want)
    events = events_for(s, ll, (2.0, 2.0, 1.0, 1.1, 0.9))
    tl, facts = timeline_from_events(events, ll.launches, "m", ll.num_layers, num_kept=3)
    assert facts["num_replays"] == 3
    assert tl.makespan_ms == pytest.approx(stated, rel=1e-6)
    every, _ = timeline_from_events(events, ll.launches, "m", ll.num_layers)
    assert every.makespan_ms == pytest.approx(1.1 * stated, rel=1e-6)
    with pytest.raises(NfsearchError, match="not the 9 kept"):
        timeline_from_events(events, ll.launches, "m", ll.num_layers, num_kept=9)
