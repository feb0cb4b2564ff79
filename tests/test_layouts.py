"""The buildable green-context layouts of a 132-SM device at granularity 8 (H100 SXM), CPU only."""

import pytest

from nfsearch import layouts
from nfsearch.layouts import Layout, LayoutError, buildable_layouts, is_buildable, make_layout, sm_counts

N, G = 132, 8


@pytest.fixture(scope="module")
def all_layouts():
    return buildable_layouts(N, G)


def test_counts_per_build(all_layouts):
    by = {}
    for lay in all_layouts:
        by[lay.build] = by.get(lay.build, 0) + 1
    # whole; a front of 8..128 (16); two fronts of multiples of 8 with a sum of at most 128:
    # sum_{k=1..15} (16 - k) = 120, of which the 8 with equal fronts (8..64) are equal-groups
    assert by == {"whole": 1, "split2": 16, "equal-groups": 8, "nested": 112}
    assert len(all_layouts) == 137


def test_every_layout_sums_to_the_device_and_fronts_are_aligned(all_layouts):
    for lay in all_layouts:
        assert lay.num_sms == N
        assert all(s % G == 0 for s in lay.sizes[:-1]), lay
        assert lay.sizes[-1] > 0
        assert 1 <= lay.num_groups <= 3


def test_no_duplicates(all_layouts):
    sizes = [lay.sizes for lay in all_layouts]
    assert len(sizes) == len(set(sizes))


def test_known_members_and_non_members(all_layouts):
    got = {lay.sizes: lay.build for lay in all_layouts}
    assert got[(132,)] == "whole"
    assert got[(8, 124)] == "split2"
    assert got[(128, 4)] == "split2"
    assert got[(16, 16, 100)] == "equal-groups"       # measured on the H100
    assert got[(64, 64, 4)] == "equal-groups"
    assert got[(72, 24, 36)] == "nested"              # the middle group that failed as a plain split
    assert got[(64, 32, 36)] == "nested"
    for bad in [(12, 120), (120, 12, 0), (132, 0), (136,), (4, 128), (20, 112), (8, 8, 8, 108), (66, 66)]:
        assert bad not in got
    assert (120, 12) in got                           # the remainder may be any size


def test_is_buildable_agrees_with_the_enumeration(all_layouts):
    listed = {lay.sizes for lay in all_layouts}
    assert is_buildable((N,), N, G)
    for a in range(1, N):
        assert is_buildable((a, N - a), N, G) == ((a, N - a) in listed), a
    for a in range(4, N, 4):
        for b in range(4, N - a, 4):
            sizes = (a, b, N - a - b)
            assert is_buildable(sizes, N, G) == (sizes in listed), sizes
    assert not is_buildable((12, 120), N, G)
    assert not is_buildable((16, 16, 100), N, G, max_groups=2)
    assert is_buildable((8, 8, 8, 108), N, G, max_groups=4)


def test_sm_counts():
    counts = sm_counts(N, G)
    # fronts 8..128 and remainders 132 - 8k: every multiple of 4 from 4 to 132
    assert counts == frozenset(range(4, N + 1, 4))
    assert 12 in counts and 36 in counts and 6 not in counts
    assert sm_counts(N, G, max_groups=1) == frozenset({N})
    union = {s for lay in buildable_layouts(N, G) for s in lay.sizes}
    assert union == set(counts)


def test_requests_say_what_to_ask_the_driver():
    assert make_layout((132,), N, G).requests == ()
    assert make_layout((96, 36), N, G).requests == ((1, 96),)
    assert make_layout((16, 16, 100), N, G).requests == ((2, 16),)
    assert make_layout((72, 24, 36), N, G).requests == ((1, 72), (1, 24))


def test_bounds_and_group_at():
    lay = make_layout((72, 24, 36), N, G)
    assert lay.bounds == ((0, 72), (72, 96), (96, 132))
    assert lay.group_at(72, 96) == 1
    with pytest.raises(LayoutError):
        lay.group_at(70, 96)


def test_make_layout_says_why_not():
    with pytest.raises(LayoutError, match="multiples of the granularity 8"):
        make_layout((12, 120), N, G)
    with pytest.raises(LayoutError, match="sum to 130"):
        make_layout((10, 120), N, G)
    with pytest.raises(LayoutError, match="4 groups"):
        make_layout((8, 8, 8, 108), N, G)


def test_layout_checks_its_build():
    with pytest.raises(LayoutError):
        Layout((16, 24, 92), "equal-groups")
    with pytest.raises(LayoutError):
        Layout((96, 36), "nested")
    with pytest.raises(LayoutError):
        Layout((96, 0), "split2")
    with pytest.raises(LayoutError):
        Layout((132,), "magic")


def test_line_layout():
    assert layouts.line_layout([(0, 96), (96, 132)], N, G).sizes == (96, 36)
    assert layouts.line_layout([(0, 64), (96, 132)], N, G).sizes == (64, 32, 36)   # idle [64, 96) is a group
    assert layouts.line_layout([(0, 64), (72, 96), (96, 132)], N, G) is None        # four groups
    assert layouts.line_layout([(0, 64), (60, 96)], N, G) is None                    # overlap
    assert layouts.line_layout([], N, G).sizes == (N,)


def test_other_devices():
    # a 128-SM device at granularity 8: exact halves are a split2, no empty remainder
    lays = {lay.sizes for lay in buildable_layouts(128, 8)}
    assert (64, 64) in lays and (128,) in lays
    assert all(lay[-1] > 0 for lay in lays)
    assert len(buildable_layouts(132, 8, max_groups=2)) == 17
    with pytest.raises(LayoutError):
        buildable_layouts(0, 8)
