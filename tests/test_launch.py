"""Plan -> launch list: stream keys, event waits, capacity edges, SM intervals, order (no torch)."""

import itertools

import pytest

from nfsearch.runtime import launch
from nfsearch.roofline import analytic_profile
from nfsearch.search.baselines import equal_split_plan, sequential_plan
from nfsearch.plan import PlanGpu, PlannedOp, PlanProfile, Predicted, Schedule
from nfsearch.cost import make_problem
from nfsearch.specs import ModelSpec, Workload, load_gpu

MODEL = ModelSpec("tiny", 256, 4, 2, 64, 512, 2, 1000)
WORKLOAD = Workload("tiny", 6, 40, (20, 13))
N = 132


def op(name, index, stream, order, sms, start, end, deps=(), cls="compute", layer=0, tokens=(0, 8)):
    return PlannedOp(id=f"L{layer}.{name}#{index}", layer=layer, op=name, index=index, op_class=cls,
                     tokens=tokens, stream=stream, order=order, sm_count=sms, impl="triton", deps=tuple(deps),
                     start_ms=start, end_ms=end)


def schedule(ops, layers=1):
    return Schedule(MODEL, WORKLOAD, PlanGpu("NVIDIA H100 80GB HBM3", N, 8),
                    PlanProfile("0" * 16, "analytic", "test"), layers, tuple(ops), Predicted(1.0, 1.0, 1.0, 1.0))


def problem(workload=WORKLOAD, layers=2):
    return make_problem(MODEL, workload, analytic_profile(MODEL, workload, load_gpu("h100-sxm")), layers,
                        allow_extrapolation=True)


def test_order_and_ids_follow_the_plan():
    s = equal_split_plan(problem(), 2)
    ll = launch.build(s)
    assert [l.id for l in ll.launches] == [o.id for o in sorted(s.nano_ops, key=lambda o: o.order)]
    assert [l.order for l in ll.launches] == sorted(l.order for l in ll.launches)


def test_same_stream_deps_are_implicit_and_cross_stream_deps_wait():
    # a and b take [96, 132) of (96, 36), c [0, 64) of (64, 68): other streams
    ops = [op("a", 0, "x", 0, 36, 0, 1, cls="other"),
           op("b", 0, "x", 1, 36, 1, 2, deps=["L0.a#0"], cls="other"),
           op("c", 0, "y", 2, 64, 2, 3, deps=["L0.b#0"])]
    ll = launch.build(schedule(ops))
    by = ll.by_id()
    assert by["L0.b#0"].waits == ()
    assert by["L0.c#0"].waits == ("L0.b#0",) and by["L0.c#0"].wait_kinds == ("data",)
    assert by["L0.b#0"].record and not by["L0.a#0"].record and not by["L0.c#0"].record


def test_implied_waits_are_pruned():
    # c (stream y) needs a and b of stream x; waiting for b implies a (same stream, earlier)
    ops = [op("a", 0, "x", 0, 36, 0, 1, cls="other"), op("b", 0, "x", 1, 36, 1, 2, cls="other"),
           op("c", 0, "y", 2, 64, 2, 3, deps=["L0.a#0", "L0.b#0"])]
    assert launch.build(schedule(ops)).by_id()["L0.c#0"].waits == ("L0.b#0",)
    # d (stream z) needs b and c; c already waited on b, so d waits on c alone
    ops.append(op("d", 0, "z", 3, 32, 3, 4, deps=["L0.b#0", "L0.c#0"], cls="memory"))
    assert launch.build(schedule(ops)).by_id()["L0.d#0"].waits == ("L0.c#0",)


def test_ops_of_two_plan_streams_on_one_group_share_its_stream_without_waits():
    # predicted one after the other on the same SMs: one stream (issue order keeps the dep)
    ops = [op("a", 0, "x", 0, 64, 0, 1), op("c", 0, "y", 1, 64, 1, 2, deps=["L0.a#0"], cls="other")]
    by = launch.build(schedule(ops)).by_id()
    assert by["L0.a#0"].key == by["L0.c#0"].key == "64+68/g0" and by["L0.c#0"].waits == ()


def test_capacity_edge_between_sequential_ops_that_cannot_share_the_gpu():
    # a (96 SMs) is predicted to end before b (64 SMs) starts; 96 + 64 > 132: b must wait for a
    ops = [op("a", 0, "x", 0, 96, 0, 1), op("b", 0, "y", 1, 64, 1, 2, cls="memory")]
    ll = launch.build(schedule(ops))
    assert ll.by_id()["L0.b#0"].waits == ("L0.a#0",)
    assert ll.by_id()["L0.b#0"].wait_kinds == ("capacity",)
    assert ll.capacity_edges == (("L0.a#0", "L0.b#0"),)


def test_no_capacity_edge_when_both_fit():
    ops = [op("a", 0, "x", 0, 96, 0, 1), op("b", 0, "y", 1, 36, 1, 2, cls="memory")]
    ll = launch.build(schedule(ops))
    assert ll.by_id()["L0.b#0"].waits == () and ll.capacity_edges == ()


def test_capacity_edge_takes_the_latest_predecessor_per_stream():
    ops = [op("a", 0, "x", 0, 96, 0, 1), op("a", 1, "x", 1, 96, 1, 2), op("b", 0, "y", 2, 64, 2, 3, cls="memory")]
    ll = launch.build(schedule(ops))
    assert ll.by_id()["L0.b#0"].waits == ("L0.a#1",)
    assert ll.capacity_edges == (("L0.a#1", "L0.b#0"),)


def test_predicted_overlap_beyond_capacity_is_noted():
    ops = [op("a", 0, "x", 0, 96, 0, 2), op("b", 0, "y", 1, 64, 1, 3, cls="memory")]
    ll = launch.build(schedule(ops))
    assert any("side by side" in n for n in ll.notes)


def test_compute_takes_the_front_and_others_the_back():
    ops = [op("a", 0, "x", 0, 96, 0, 2), op("b", 0, "y", 1, 36, 0, 2, cls="memory")]
    ll = launch.build(schedule(ops))
    a, b = ll.by_id()["L0.a#0"], ll.by_id()["L0.b#0"]
    assert (a.partition.lo, a.partition.hi) == (0, 96) and (a.layout.sizes, a.group) == ((96, 36), 0)
    assert (b.partition.lo, b.partition.hi) == (96, 132) and (b.layout.sizes, b.group) == ((96, 36), 1)
    assert a.layout is b.layout or a.layout == b.layout
    assert a.key == "96+36/g0" and b.key == "96+36/g1"


def test_third_concurrent_op_gets_a_middle_group():
    ops = [op("a", 0, "x", 0, 64, 0, 2), op("b", 0, "y", 1, 36, 0, 2, cls="memory"),
           op("c", 0, "z", 2, 24, 0, 2, cls="other")]
    parts = {l.id: l.partition for l in launch.build(schedule(ops)).launches}
    for p, q in itertools.combinations(parts.values(), 2):
        assert not p.overlaps(q)
    # [72, 96) would leave idle [64, 72): four groups, no buildable layout; c takes the whole gap
    by = launch.build(schedule(ops)).by_id()
    assert {by[i].layout.sizes for i in by} == {(64, 32, 36)}
    assert (by["L0.a#0"].group, by["L0.c#0"].group, by["L0.b#0"].group) == (0, 1, 2)
    assert buildable_layout_of(parts.values()).sizes == (64, 32, 36)


def buildable_layout_of(partitions):
    from nfsearch.layouts import line_layout
    return line_layout([(p.lo, p.hi) for p in partitions], N, 8, launch.MAX_GROUPS)


def test_third_op_that_fits_the_gap_exactly_gets_a_nested_middle_group():
    ops = [op("a", 0, "x", 0, 64, 0, 2), op("b", 0, "y", 1, 36, 0, 2, cls="memory"),
           op("c", 0, "z", 2, 32, 0, 2, cls="other")]
    ll = launch.build(schedule(ops))
    c = ll.by_id()["L0.c#0"].partition
    assert (c.lo, c.hi) == (64, 96)
    assert (ll.by_id()["L0.c#0"].layout.sizes, ll.by_id()["L0.c#0"].group) == ((64, 32, 36), 1)
    assert not ll.notes


def test_no_four_way_layout_a_fourth_corunner_shares():
    ops = [op("a", 0, "x", 0, 32, 0, 2), op("b", 0, "y", 1, 36, 0, 2, cls="memory"),
           op("c", 0, "z", 2, 16, 0, 2, cls="other"), op("d", 0, "w", 3, 16, 0, 2, cls="other")]
    ll = launch.build(schedule(ops))
    by = {l.op: l.partition for l in ll.launches}
    # c alone at [80, 96) would cut (32, 48, 16, 36): four groups; it takes the whole gap instead
    assert (by["c"].lo, by["c"].hi) == (32, 96)
    assert buildable_layout_of([by["a"], by["b"], by["c"]]).sizes == (32, 64, 36)
    assert any(n.startswith("L0.d#0: shares SMs") for n in ll.notes)


def test_partition_rounding_and_whole_gpu():
    ops = [op("a", 0, "x", 0, 12, 0, 1), op("b", 0, "y", 1, 132, 1, 2, deps=["L0.a#0"])]
    by = launch.build(schedule(ops)).by_id()
    # 12 SMs is exact as the remainder of (120, 12); 10 is neither a front nor a remainder: rounded to 16
    assert by["L0.a#0"].sms == 12 and by["L0.a#0"].partition.lo == 120
    ops = [op("a", 0, "x", 0, 10, 0, 1), op("b", 0, "y", 1, 132, 1, 2, deps=["L0.a#0"])]
    ll = launch.build(schedule(ops))
    assert ll.by_id()["L0.a#0"].sms == 16 and ll.by_id()["L0.a#0"].layout.sizes == (16, 116)
    assert any("L0.a#0 10->16" in n for n in ll.notes), ll.notes      # never silently
    by = ll.by_id()
    assert by["L0.b#0"].partition.is_whole and by["L0.b#0"].layout.build == "whole"
    assert by["L0.b#0"].key == "y@all" and by["L0.a#0"].layout.sizes == (16, 116)


def test_stream_wait_when_a_plan_stream_changes_interval():
    # stream x runs a on the back, then b must move (y holds the back when b runs)
    ops = [op("a", 0, "x", 0, 36, 0, 1, cls="other"), op("m", 0, "y", 1, 36, 1, 3, deps=["L0.a#0"], cls="memory"),
           op("b", 0, "x", 2, 36, 1, 2, cls="other")]
    by = launch.build(schedule(ops)).by_id()
    assert by["L0.a#0"].key != by["L0.b#0"].key
    assert by["L0.b#0"].waits == ("L0.a#0",) and by["L0.b#0"].wait_kinds == ("stream",)
    assert not by["L0.b#0"].partition.overlaps(by["L0.m#0"].partition)


@pytest.mark.parametrize("batches", [2, 3])
def test_every_set_of_predicted_corunners_is_a_buildable_layout(batches):
    s = equal_split_plan(problem(), batches)
    ll = launch.build(s)
    assert not any("buildable layout" in n for n in ll.notes)
    for l in ll.launches:
        at = l.start_ms + launch.TOLERANCE_MS
        running = [m.partition for m in ll.launches if m.start_ms <= at < m.end_ms - launch.TOLERANCE_MS]
        if running and not any(p.is_whole for p in running):
            assert buildable_layout_of(running) is not None, [(p.lo, p.hi) for p in running]


@pytest.mark.parametrize("batches", [2, 3])
@pytest.mark.parametrize("workload", [WORKLOAD, Workload("dec", 64, 128), Workload("pre", 0, 1, (32, 48))])
def test_predicted_corunners_get_disjoint_sms(workload, batches):
    s = equal_split_plan(problem(workload), batches)
    ll = launch.build(s)
    for a, b in itertools.combinations(ll.launches, 2):
        co = a.start_ms < b.end_ms - 1e-4 and b.start_ms < a.end_ms - 1e-4
        if co and a.key != b.key and a.sm_count + b.sm_count <= N:
            assert not a.partition.overlaps(b.partition), (a.id, b.id)


def test_every_wait_points_to_an_earlier_launch_and_keeps_all_deps():
    s = equal_split_plan(problem(), 3)
    ll = launch.build(s)
    pos = {l.id: i for i, l in enumerate(ll.launches)}
    by = ll.by_id()
    for l in ll.launches:
        assert all(pos[d] < pos[l.id] for d in l.waits)
        assert all(by[d].record for d in l.waits)
    # every plan dep is covered: same key earlier, or reachable through the waits/key order
    clocks, key_pos, count = {}, {}, {}
    for l in ll.launches:
        c = dict(clocks.get(("key", l.key), {}))
        for d in l.waits:
            for k, p in clocks[d].items():
                c[k] = max(c.get(k, 0), p)
        count[l.key] = count.get(l.key, 0) + 1
        key_pos[l.id] = count[l.key]
        c[l.key] = count[l.key]
        clocks[l.id] = c
        clocks[("key", l.key)] = c
    for o in s.nano_ops:
        for d in o.deps:
            assert clocks[o.id].get(by[d].key, 0) >= key_pos[d], (d, o.id)


def test_sequential_plan_is_one_stream_without_waits():
    ll = launch.build(sequential_plan(problem()))
    assert len(ll.keys) == 1 and all(not l.waits for l in ll.launches)
    seq = launch.sequential_launches(MODEL, WORKLOAD, 2, N, "torch")
    assert [l.op for l in seq.launches][:3] == ["norm1", "kqv", "rope_append"]
    assert len(seq.launches) == 2 * 10 and all(l.partition.is_whole for l in seq.launches)
    assert launch.to_dict(seq)["launches"][0]["key"] == "main@all"


# ---------------------------------------------------------------------------------------------- layouts
def corunning(a, b):
    return (a.stream != b.stream and a.start_ms < b.end_ms - launch.TOLERANCE_MS
            and b.start_ms < a.end_ms - launch.TOLERANCE_MS)


def check_layouts(ll, distinct=True):
    """Every launch: a buildable layout, its partition is its group; co-runners: one layout, and
    (distinct=True) different groups."""
    from nfsearch.layouts import is_buildable
    for l in ll.launches:
        assert is_buildable(l.layout.sizes, ll.num_sms, ll.granularity, launch.MAX_GROUPS), l.layout
        assert (l.partition.lo, l.partition.hi) == l.layout.bounds[l.group]
    for a, b in itertools.combinations(ll.launches, 2):
        if corunning(a, b) and not a.partition.is_whole and not b.partition.is_whole:
            assert a.layout == b.layout, (a.id, a.layout, b.id, b.layout)
            if distinct:
                assert a.group != b.group and a.key != b.key, (a.id, b.id)
                assert not a.partition.overlaps(b.partition)


def test_a_w2_like_plan_runs_its_corunners_on_one_layout():
    # decode attention (32 SMs) beside a chain of front ops of 100 and 92 SMs: placed alone, the 92s
    # would be [0, 96) of layout (96, 36) and the 100s [0, 100) of (100, 32), two builds whose SMs
    # may overlap physically; one layout (100, 32) serves the whole co-running set
    ops = [op("decode_attn", 0, "memory", 0, 32, 0.0, 10.0, cls="memory"),
           op("norm1", 1, "other", 1, 100, 0.0, 1.0, cls="other"),
           op("kqv", 1, "compute", 2, 100, 1.0, 3.0, deps=["L0.norm1#1"]),
           op("rope_append", 1, "other", 3, 92, 3.0, 4.0, deps=["L0.kqv#1"], cls="other"),
           op("ug", 1, "compute", 4, 100, 4.0, 8.0, deps=["L0.rope_append#1"]),
           op("act", 1, "other", 5, 92, 8.0, 9.0, deps=["L0.ug#1"], cls="other"),
           op("o", 0, "compute", 6, 132, 10.0, 11.0, deps=["L0.decode_attn#0", "L0.act#1"])]
    ll = launch.build(schedule(ops))
    check_layouts(ll)
    by = ll.by_id()
    # 100 SMs is a remainder (not a multiple of 8): the layout is (32, 100), not (100, 32)
    assert {by[i].layout.sizes for i in by if i != "L0.o#0"} == {(32, 100)}
    assert by["L0.decode_attn#0"].group == 0 and by["L0.decode_attn#0"].key == "32+100/g0"
    assert all(by[i].group == 1 for i in ("L0.norm1#1", "L0.kqv#1", "L0.rope_append#1", "L0.act#1"))
    # the 92-SM ops run on 100 SMs: said, not silent
    assert any("L0.rope_append#1 92->100" in n for n in ll.notes), ll.notes
    assert by["L0.o#0"].layout.build == "whole" and ll.layouts[0].sizes == (32, 100)
    assert launch.to_dict(ll)["launches"][0]["layout"] == [32, 100]


def test_corunning_is_transitive_one_build_for_a_chain():
    # a co-runs with b, b with c (a and c never overlap): one layout for all three
    ops = [op("a", 0, "x", 0, 64, 0, 2), op("b", 0, "y", 1, 36, 1, 4, cls="memory"),
           op("c", 0, "x", 2, 96, 2, 5)]
    ll = launch.build(schedule(ops))
    check_layouts(ll)
    assert len({l.layout for l in ll.launches}) == 1
    assert ll.by_id()["L0.b#0"].group != ll.by_id()["L0.c#0"].group


def test_separate_corunning_sets_get_their_own_layouts():
    ops = [op("a", 0, "x", 0, 64, 0, 1), op("b", 0, "y", 1, 68, 0, 1, cls="memory"),
           op("c", 0, "x", 2, 100, 2, 3, deps=["L0.a#0", "L0.b#0"]), op("d", 0, "y", 3, 32, 2, 3, cls="memory")]
    ll = launch.build(schedule(ops))
    check_layouts(ll)
    by = ll.by_id()
    assert by["L0.a#0"].layout.sizes == (64, 68) and by["L0.c#0"].layout.sizes == (32, 100)
    assert [x.sizes for x in ll.layouts] == [(64, 68), (32, 100)]


@pytest.mark.parametrize("batches", [2, 3, 4])
@pytest.mark.parametrize("workload", [WORKLOAD, Workload("dec", 64, 128), Workload("pre", 0, 1, (32, 48))])
def test_solved_like_plans_map_every_launch_to_a_buildable_layout(workload, batches):
    check_layouts(launch.build(equal_split_plan(problem(workload), batches)))


@pytest.mark.parametrize("seed", range(40))
def test_random_plans_corunners_share_one_layout(seed):
    import random
    rng = random.Random(seed)
    ops, order = [], 0
    for stream in ("x", "y", "z")[:rng.choice((2, 3))]:
        t = rng.uniform(0, 2)
        for i in range(rng.randint(2, 6)):
            d = rng.uniform(0.2, 3)
            sms = rng.choice((16, 24, 32, 48, 64, 92, 100, 108, 124, 132))
            ops.append(op(f"{stream}op", i, stream, order, sms, round(t, 3), round(t + d, 3),
                          cls=rng.choice(("compute", "memory", "other"))))
            order += 1
            t += d + rng.choice((0, 0, rng.uniform(0, 1)))
    ops.sort(key=lambda o: o.start_ms)
    ops = [PlannedOp(**{**o.__dict__, "order": k}) for k, o in enumerate(ops)]
    ll = launch.build(schedule(ops))
    check_layouts(ll, distinct=False)
    shared = [(a.id, b.id) for a, b in itertools.combinations(ll.launches, 2)
              if corunning(a, b) and not a.partition.is_whole and a.key == b.key]
    if shared:
        assert any("share a group" in n for n in ll.notes)
