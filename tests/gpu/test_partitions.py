"""GPU checks of the green-context layouts: three-way partitions (equal groups and nested), the SM
counts the driver and a %smid kernel see, and one CUDA graph captured across partition streams.

Skipped without torch, a CUDA GPU or green contexts (cuda.bindings). Needs triton for the %smid
kernel. Imports only nfsearch.layouts and nfsearch.runtime.partitions (no conftest needed).
"""

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from nfsearch.runtime.partitions import (  # noqa: E402 - after the skip marks
    PartitionError, SmPartitions, capture_graph, issue_across, launch_sm_probe, observed_sm_ids)


@pytest.fixture()
def parts():
    try:
        p = SmPartitions(mode="green")
    except PartitionError as exc:
        pytest.skip(f"no green contexts here: {exc}")
    yield p
    p.close()


def _check_groups(parts, layout_sizes):
    groups = parts.build(layout_sizes)
    assert tuple(s for s, _ in groups) == tuple(layout_sizes)
    # the driver's own count for each green context equals the request
    assert tuple(parts.sm_count(st) for _, st in groups) == tuple(layout_sizes)
    seen = [observed_sm_ids(st) for _, st in groups]
    for (sms, _), ids in zip(groups, seen):
        assert len(ids) == sms, f"a kernel on a {sms}-SM group ran on {len(ids)} SMs"
    for i in range(len(seen)):
        for j in range(i + 1, len(seen)):
            assert not seen[i] & seen[j], f"groups {i} and {j} share SMs {sorted(seen[i] & seen[j])}"
    # torch ops on each group's stream compute the right thing
    a = torch.randn(512, 256, device="cuda")
    b = torch.randn(256, 384, device="cuda")
    ref = a @ b
    outs = [torch.empty_like(ref) for _ in groups]
    torch.cuda.synchronize()
    issue_across([(st, (lambda o=o: torch.matmul(a, b, out=o))) for o, (_, st) in zip(outs, groups)])
    torch.cuda.synchronize()
    for o in outs:
        torch.testing.assert_close(o, ref, rtol=1e-3, atol=1e-3)
    return groups, seen


def test_granularity_and_layouts(parts):
    assert parts.granularity >= 1 and parts.num_sms == torch.cuda.get_device_properties(0).multi_processor_count
    lays = parts.layouts()
    assert all(lay.num_sms == parts.num_sms for lay in lays)
    assert any(lay.build == "nested" for lay in lays)


def test_three_way_equal_groups(parts):
    g = parts.granularity
    _check_groups(parts, (2 * g, 2 * g, parts.num_sms - 4 * g))


def test_three_way_nested(parts):
    g, n = parts.granularity, parts.num_sms
    front, middle = (n // 2) // g * g, 3 * g
    _check_groups(parts, (front, middle, n - front - middle))


def test_split_rounds_and_makes_three_way_splits(parts):
    g, n = parts.granularity, parts.num_sms
    got = parts.split((g + 1, g, n))
    assert [s for s, _ in got] == [2 * g, g, n - 3 * g]
    assert parts.split((g + 1, g, n)) is got          # cached


def test_unbuildable_layout_is_refused(parts):
    g, n = parts.granularity, parts.num_sms
    if g == 1:
        pytest.skip("every layout builds at granularity 1")
    with pytest.raises(PartitionError, match="multiples of the granularity"):
        parts.build((g + g // 2, n - g - g // 2))
    with pytest.raises(PartitionError, match="groups"):
        parts.build((g, g, g, n - 3 * g))             # four groups: more than max_groups


def test_graph_across_green_streams_replays_like_eager(parts):
    g, n = parts.granularity, parts.num_sms
    front = (n // 2) // g * g
    groups, seen = _check_groups(parts, (front, 4 * g, n - front - 4 * g))
    xs = [torch.randn(1024, 512, device="cuda") for _ in groups]
    ws = [torch.randn(512, 512, device="cuda") for _ in groups]
    outs = [torch.empty(1024, 512, device="cuda") for _ in groups]
    probes = {}

    def work(i):
        def fn():
            torch.matmul(xs[i], ws[i], out=outs[i])
            outs[i].relu_()
            probes[i] = launch_sm_probe(torch.cuda.current_stream(), num_blocks=2048)
        return fn

    items = [(st, work(i)) for i, (_, st) in enumerate(groups)]
    issue_across(items)                                 # eager warm-up (compiles the probe kernel)
    torch.cuda.synchronize()
    eager = [o.clone() for o in outs]
    graph = capture_graph(items)
    for o in outs:
        o.fill_(float("nan"))
    for p in probes.values():
        p.fill_(-1)
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    for o, e in zip(outs, eager):
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-4)
    # each replayed kernel stayed inside the partition it was captured on
    for i, ids in enumerate(seen):
        replay_ids = set(probes[i].cpu().tolist())
        assert -1 not in replay_ids
        assert replay_ids <= ids, f"group {i} replay ran on SMs {sorted(replay_ids - ids)} outside its partition"
