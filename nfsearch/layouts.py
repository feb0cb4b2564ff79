"""The green-context SM layouts a device can build, for the search and the runtime (no torch).

A layout is an ordered tuple of SM group sizes that sum to the device's SMs. The order is the SM
line 0..N the launch list places intervals on: the first group is [0, s0), the next [s0, s0+s1),
and so on; the LAST group is always the remainder of the split that made the layout.

How the driver splits SMs (CUDA driver API, green contexts; as an H100 with 132 SMs does it)
--------------------------------------------------------------------------------------------
* ``cuDevSmResourceSplitByCount(nbGroups, input, flags, minCount)`` cuts ``nbGroups`` groups of
  the same size (``minCount`` rounded up to the granularity: 8 SMs on Hopper) off an SM resource
  and returns them plus a remainder of the rest. The remainder need not be a multiple of the
  granularity (132 - 16 = 116, 132 - 2 x 16 = 100, 132 - 128 = 4).
* A group or remainder of one split cannot be split again (CUDA error 915,
  INVALID_RESOURCE_CONFIGURATION). The API's own documentation gives the way round: make a green
  context from it, ask that context for its SM resource (``cuGreenCtxGetDevResource``) and split
  that. Each such step is one more split by count of the previous remainder.

Rules that follow (what ``buildable_layouts`` enumerates)
---------------------------------------------------------
Let N be the device's SMs and g its granularity.

1. ``whole``: (N,). The whole GPU, a plain stream, no green context.
2. ``split2``: (a, N - a) with a a multiple of g and 0 < a < N: one split by count.
3. ``equal-groups``: (m, ..., m, N - k*m) with k >= 2 equal groups, m a multiple of g and
   k*m < N: one split asking for k groups at once (measured: k=2, m=16 gives [16, 16] + 100).
4. ``nested``: (a1, ..., a_{k-1}, N - sum) with every a_i a multiple of g and the rest > 0:
   a split by count of the device, then of each remainder's green context in turn. A layout
   whose front groups are all equal is built as ``equal-groups`` instead (one driver call).

So every group but the last is a positive multiple of g, and the last (the remainder) is positive
and whatever is left; layouts have at most ``max_groups`` groups. Splitting a front group's green
context instead of the remainder's gives the same size tuples, so it adds nothing. (12, 120) is
not buildable on 132 SMs at granularity 8 (a front group of 12), but (120, 12) is. Each size tuple
appears once, with the build that asks the driver least (whole < split2 < equal-groups < nested).

Why the rules can be trusted, and where the model stops (an H100, 132 SMs, driver 13.0;
benchmarks/partition_layouts.py checks a GPU): all 137 layouts these rules give for max_groups=3,
and two four-group ones, build; every green context has the SM count asked (driver and a %smid
kernel agree) and the groups of one build are disjoint. Build time: 3.4-4.5 ms for split2, 5.5-8 ms
for equal-groups, 7-11 ms for nested (14 ms for four groups). But the SM line is only a model: the
SMs an interval gets depend on the call that made it. Groups asked together interleave (the front
64 of (64, 64, 4) is SMs 0,1,4,5,...; of (64, 68) and of every nested (64, b, rest) it is 0..63),
and 21 of 153 intervals get different SM sets from different layouts; 1869 of 18915 pairs of
intervals that are disjoint on the line share SMs.
Ops meant to run side by side should take their streams from one build of one layout.

``Layout.requests`` is what to ask the driver, level by level: ((nbGroups, minCount), ...), the
first on the device's SM resource, each later one on the previous level's remainder.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from nfsearch.errors import NfsearchError

BUILDS = ("whole", "split2", "equal-groups", "nested")


class LayoutError(NfsearchError):
    """The SM group sizes asked for are not a layout the device can build."""


@dataclass(frozen=True)
class Layout:
    """Ordered SM group sizes summing to the device's SMs (remainder last) and how they are built."""
    sizes: tuple[int, ...]
    build: str

    def __post_init__(self):
        sizes = tuple(self.sizes)
        object.__setattr__(self, "sizes", sizes)
        if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in sizes):
            raise LayoutError(f"layout sizes must be positive integers, not {sizes!r}")
        if self.build not in BUILDS:
            raise LayoutError(f"layout build must be one of {BUILDS}, not {self.build!r}")
        k = len(sizes)
        if self.build == "whole" and k != 1:
            raise LayoutError(f"a 'whole' layout has one group, not {sizes}")
        if self.build == "split2" and k != 2:
            raise LayoutError(f"a 'split2' layout has two groups, not {sizes}")
        if self.build == "equal-groups" and (k < 3 or len(set(sizes[:-1])) != 1):
            raise LayoutError(f"an 'equal-groups' layout is k >= 2 equal groups plus a remainder, not {sizes}")
        if self.build == "nested" and k < 3:
            raise LayoutError(f"a 'nested' layout has at least three groups, not {sizes}")

    @property
    def num_sms(self) -> int:
        return sum(self.sizes)

    @property
    def num_groups(self) -> int:
        return len(self.sizes)

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        """The [lo, hi) interval of each group on the SM line."""
        out, lo = [], 0
        for s in self.sizes:
            out.append((lo, lo + s))
            lo += s
        return tuple(out)

    @property
    def requests(self) -> tuple[tuple[int, int], ...]:
        """(nbGroups, minCount) per split level: the device first, then each remainder's green context."""
        front = self.sizes[:-1]
        if self.build == "whole":
            return ()
        if self.build == "equal-groups":
            return ((len(front), front[0]),)
        return tuple((1, s) for s in front)

    def group_at(self, lo: int, hi: int) -> int:
        """Index of the group that is exactly [lo, hi); LayoutError if none is."""
        for i, b in enumerate(self.bounds):
            if b == (lo, hi):
                return i
        raise LayoutError(f"[{lo}, {hi}) is not a group of layout {self.sizes}")


def _check_device(num_sms: int, granularity: int, max_groups: int) -> None:
    if num_sms <= 0 or granularity <= 0:
        raise LayoutError(f"a device needs positive SMs and granularity, not {num_sms} and {granularity}")
    if max_groups < 1:
        raise LayoutError(f"max_groups must be at least 1, not {max_groups}")


def _build_of(sizes: tuple[int, ...]) -> str:
    if len(sizes) == 1:
        return "whole"
    if len(sizes) == 2:
        return "split2"
    return "equal-groups" if len(set(sizes[:-1])) == 1 else "nested"


def is_buildable(sizes, num_sms: int, granularity: int, max_groups: int = 3) -> bool:
    """Whether the ordered group sizes are a layout the device can build (see the module rules)."""
    _check_device(num_sms, granularity, max_groups)
    sizes = tuple(sizes)
    if not 1 <= len(sizes) <= max_groups or any(not isinstance(s, int) or s <= 0 for s in sizes):
        return False
    if sum(sizes) != num_sms:
        return False
    return all(s % granularity == 0 for s in sizes[:-1])


def make_layout(sizes, num_sms: int, granularity: int, max_groups: int = 3) -> Layout:
    """The Layout of these ordered sizes, or LayoutError saying which rule they break."""
    sizes = tuple(int(s) for s in sizes)
    if is_buildable(sizes, num_sms, granularity, max_groups):
        return Layout(sizes, _build_of(sizes))
    if not 1 <= len(sizes) <= max_groups:
        why = f"{len(sizes)} groups (at most {max_groups})"
    elif any(s <= 0 for s in sizes):
        why = "a group of no SMs"
    elif sum(sizes) != num_sms:
        why = f"they sum to {sum(sizes)}, not the device's {num_sms} SMs"
    else:
        bad = [s for s in sizes[:-1] if s % granularity]
        why = f"front group(s) {bad} are not multiples of the granularity {granularity} (only the last group, the remainder, may be)"
    raise LayoutError(f"SM layout {sizes} cannot be built: {why}")


def buildable_layouts(num_sms: int, granularity: int, max_groups: int = 3) -> list[Layout]:
    """Every layout the runtime can build on a device of num_sms SMs at this granularity, with at
    most max_groups groups: by number of groups, then by sizes."""
    _check_device(num_sms, granularity, max_groups)
    out = [Layout((num_sms,), "whole")]
    fronts = range(granularity, num_sms, granularity)
    for k in range(2, max_groups + 1):
        for front in product(fronts, repeat=k - 1):
            rest = num_sms - sum(front)
            if rest > 0:
                sizes = (*front, rest)
                out.append(Layout(sizes, _build_of(sizes)))
    return out


def sm_counts(num_sms: int, granularity: int, max_groups: int = 3) -> frozenset[int]:
    """The SM counts any group of any buildable layout can have."""
    _check_device(num_sms, granularity, max_groups)
    if max_groups == 1:
        return frozenset({num_sms})
    fronts = set(range(granularity, num_sms, granularity))
    # the remainder of a layout is N minus a sum of front groups, i.e. N minus a multiple of g;
    # with two groups that multiple is one front group, with more it can be any larger multiple
    return frozenset(fronts | {num_sms - a for a in fronts} | {num_sms})


def line_layout(intervals, num_sms: int, granularity: int, max_groups: int = 3) -> Layout | None:
    """The layout whose groups are cut at every end of these [lo, hi) intervals (idle SMs between
    them count as groups too), or None if that is not buildable or the intervals overlap."""
    spans = sorted((int(lo), int(hi)) for lo, hi in intervals)
    for (_, h0), (l1, _) in zip(spans, spans[1:]):
        if l1 < h0:
            return None
    cuts = sorted({0, num_sms} | {x for span in spans for x in span})
    sizes = tuple(b - a for a, b in zip(cuts, cuts[1:]))
    if not is_buildable(sizes, num_sms, granularity, max_groups):
        return None
    return Layout(sizes, _build_of(sizes))


def corun_components(ops, tolerance_ms: float) -> list[list]:
    """The sets of ops that must share one layout: connected components of "on different streams and
    overlapping in time" (each op has id, stream, start_ms, end_ms). Components come in the order of
    their first op in `ops`, their ops in `ops` order; a lone op is a component of one."""
    parent = {o.id: o.id for o in ops}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_start = sorted(ops, key=lambda o: o.start_ms)
    for i, a in enumerate(by_start):
        for b in by_start[i + 1:]:
            if b.start_ms >= a.end_ms - tolerance_ms:
                break
            if a.stream != b.stream and a.start_ms < b.end_ms - tolerance_ms:
                parent[root(a.id)] = root(b.id)
    comps: dict[str, list] = {}
    for o in ops:
        comps.setdefault(root(o.id), []).append(o)
    return list(comps.values())
