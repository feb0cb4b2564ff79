"""Plan -> launch list: what the executor issues, in what order, on which stream, after which events.

Pure Python (no torch): the executor only walks the list this module makes. For every nano-op of a
Schedule, in issue order (stated start time, then plan order: ``issue_order``), a Launch says: the
op, impl and token range; the plan stream and the stream key it is issued on; the SM interval it
runs on; and the nano-ops (on other streams) whose completion events it waits on.

Four kinds of ordering edges
----------------------------
* data: the plan's deps (data dependencies only).
* order: the plan's `after` (plan v2): nano-ops of other streams the search ordered this one after,
  though it reads nothing of theirs (stage 2 holds a small op back so that a whole-GPU op goes
  first). Honoured like data: without the wait the small op would take its SMs as soon as its
  inputs are ready.
* capacity: the plan's deps do not stop two nano-ops of different streams from running side by side.
  When the plan predicts A (issued earlier, other stream) to END before B STARTS and
  A.sm_count + B.sm_count > the GPU's SMs, they cannot share the GPU, so B also waits on A. Only the
  latest such A per stream is kept (earlier ones on that stream are implied by stream order).
* stream: consecutive nano-ops of one plan stream that land on different SM intervals are issued on
  different stream keys (see below); the later one waits on the earlier one, which keeps the plan
  stream's order.
Redundant waits are pruned with vector clocks over the stream keys: a wait is dropped when the
waiting stream already knows (through earlier waits or its own order) that the op is done.

SM intervals, then one layout per co-running set
------------------------------------------------
Placement works on the SM line 0..N: nano-op by nano-op in issue order, against the ops already
placed, each op gets an interval [lo, hi):
  an interval of exactly the asked width comes first: a multiple of the granularity anywhere aligned,
  any other width only as the remainder [N - w, N) (100 SMs is [32, 132), the remainder of (32, 100));
  among those, and then among widths rounded up to the granularity, compute ops take the lowest free
  interval (front: a GEMM of 96 SMs gets [0, 96)) and other classes the highest (back: decode
  attention of 36 SMs gets [96, 132)).
"Free" means disjoint from the intervals of ops (on other streams) predicted to overlap it in time,
and buildable together: at every instant the op runs, the intervals of the ops running then, cut
at their ends (idle SMs between them count as groups), must form a layout of
``layouts.buildable_layouts`` with at most MAX_GROUPS groups. A free interval that is not
buildable together is used only when none is (noted). If no interval of the asked width is free
(rounding, fragmentation), the op gets the widest free aligned gap (noted), else it shares SMs
(noted). Widths round up to the granularity (a front of 12 SMs is 16).

The SM line is only a model of what the driver hands out: the same interval gets DIFFERENT physical
SMs from different splits (on an H100, nfsearch/layouts.py: 1869 of 18915 pairs of
line-disjoint intervals from different layouts shared SMs). Only the groups of ONE build of ONE
layout are known to be disjoint. So the intervals are then turned into (layout, group) pairs:

* Co-running sets: two launches on different plan streams predicted to overlap in time co-run.
  A launch runs on one stream, so everything linked by co-running (the connected components of
  that relation) must take its streams from ONE build: each component gets ONE buildable layout.
* The layout of a component is chosen among those cut at its intervals' ends (at most MAX_GROUPS
  groups, buildable); each launch takes the group its interval overlaps most. Chosen: the fewest
  co-running pairs in one group (normally none), then the least SM-count change weighted by
  predicted duration. A launch whose group is not the width it asked is noted (never silent); two
  co-runners left in one group share its stream and run one after the other (noted).
* Launches of the whole GPU (or alone, predicted beside nothing, asking for every SM) run on a
  plain stream: layout (N,) "whole", group 0. So do launches of no SM share (sm_count 0: a
  copy-engine collective, whose copies take no SM and whose small sum kernel runs wherever SMs are
  free); they hold no interval, so the ops beside them are placed as if they were not there.
Launches of different components never co-run (by prediction), so they may reuse a build: builds
are cached per layout, and the stream key of a launch is its (layout, group): ``100+32/g1``.
The launch's ``sms`` (its group's width) is what an SM-bounded kernel is told to use.

Sequential baselines (``sequential_launches``) are whole ops on one stream and the whole GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from nfsearch.errors import NfsearchError
from nfsearch.graph import build_layer
from nfsearch.layouts import Layout, is_buildable, line_layout, make_layout
from nfsearch.layouts import corun_components as layout_components  # (launch.py's own takes placements)
from nfsearch.runreport import WAIT_KINDS

TOLERANCE_MS = 1e-4
COMPUTE_CLASSES = ("compute",)
MAX_GROUPS = 3          # green-context groups side by side (a nested three-way layout at most)


@dataclass(frozen=True)
class Partition:
    """An SM interval [lo, hi) of the SM line of a GPU with num_sms SMs."""
    lo: int
    hi: int
    num_sms: int

    @property
    def sms(self) -> int:
        return self.hi - self.lo

    @property
    def is_whole(self) -> bool:
        return self.lo == 0 and self.hi == self.num_sms

    @property
    def label(self) -> str:
        return "all" if self.is_whole else f"sm{self.lo}-{self.hi}"

    def overlaps(self, other: Partition) -> bool:
        return self.lo < other.hi and other.lo < self.hi


@dataclass(frozen=True)
class Launch:
    id: str
    layer: int
    op: str
    index: int
    op_class: str
    impl: str
    tokens: tuple[int, int]
    stream: str                      # the plan's stream
    key: str                         # stream key it is issued on: plan stream + SM interval
    order: int
    sm_count: int                    # asked by the plan
    partition: Partition             # the bounds of its group in the layout
    waits: tuple[str, ...]           # ids whose completion events this launch waits on
    wait_kinds: tuple[str, ...]      # "data" | "order" | "capacity" | "stream", one per wait
    record: bool                     # some later launch waits on this one's event
    layout: Layout                   # the layout of its co-running set, built once per layout
    group: int                       # its group in that layout (its stream comes from this group)
    start_ms: float = 0.0
    end_ms: float = 0.0

    def __post_init__(self):
        if not 0 <= self.group < self.layout.num_groups:
            raise ValueError(f"launch {self.id}: group {self.group} is not a group of layout {self.layout.sizes}")
        lo, hi = self.layout.bounds[self.group]
        if (self.partition.lo, self.partition.hi) != (lo, hi):
            raise ValueError(f"launch {self.id}: partition [{self.partition.lo}, {self.partition.hi}) is not group "
                             f"{self.group} [{lo}, {hi}) of layout {self.layout.sizes}")

    @property
    def sms(self) -> int:
        return self.partition.sms

    @property
    def num_tokens(self) -> int:
        return self.tokens[1] - self.tokens[0]


@dataclass(frozen=True)
class LaunchList:
    launches: tuple[Launch, ...]
    num_sms: int
    granularity: int
    num_layers: int
    notes: tuple[str, ...] = ()
    capacity_edges: tuple[tuple[str, str], ...] = ()     # (earlier, later)

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(l.key for l in self.launches))

    def by_id(self) -> dict[str, Launch]:
        return {l.id: l for l in self.launches}

    @property
    def layouts(self) -> list[Layout]:
        """The distinct layouts the launches use (one build each), in first-use order."""
        return list(dict.fromkeys(l.layout for l in self.launches))

    def summary(self) -> dict:
        waits = [k for l in self.launches for k in l.wait_kinds]
        return {"launches": len(self.launches), "stream_keys": self.keys,
                "partitions": sorted({l.partition.label for l in self.launches}),
                "layouts": [layout_label(x) for x in self.layouts],
                "waits": {k: waits.count(k) for k in WAIT_KINDS},
                "capacity_edges": len(self.capacity_edges), "notes": list(self.notes)}


def layout_label(layout: Layout) -> str:
    return "+".join(str(s) for s in layout.sizes)


# ---------------------------------------------------------------------------------------------- build
def build(schedule, num_sms: int | None = None, granularity: int | None = None,
          impl_map: dict[str, str] | None = None) -> LaunchList:
    """The launch list of a Schedule (plan order), for a GPU of num_sms SMs (default: the plan's)."""
    n = int(num_sms or schedule.gpu.num_sms)
    g = int(granularity or schedule.gpu.sm_granularity)
    ops = issue_order(schedule.nano_ops)
    if not ops:
        raise NfsearchError("plan has no nano-ops")
    notes: list[str] = []
    rank = {o.id: i for i, o in enumerate(ops)}

    cap = _capacity_edges(ops, n, notes)
    placed = _place(ops, n, g, notes)
    groups = assign_layouts(ops, placed, n, g, notes)
    parts = {i: Partition(*lay.bounds[grp], n) for i, (lay, grp) in groups.items()}
    keys = {o.id: (f"{o.stream}@all" if groups[o.id][0].build == "whole"
                   else f"{layout_label(groups[o.id][0])}/g{groups[o.id][1]}") for o in ops}

    needs: dict[str, list[tuple[str, str]]] = {}
    last_on_stream: dict[str, str] = {}
    for o in ops:
        wanted = ([(d, "data") for d in o.deps] + [(a, "order") for a in o.after]
                  + [(a, "capacity") for a in cap.get(o.id, ())])
        prev = last_on_stream.get(o.stream)
        if prev is not None and keys[prev] != keys[o.id]:
            wanted.append((prev, "stream"))
        last_on_stream[o.stream] = o.id
        needs[o.id] = [(d, kind) for d, kind in wanted if keys[d] != keys[o.id]]

    waits = prune_waits(ops, keys, needs, rank)
    recorded = {d for ws in waits.values() for d, _ in ws}
    mapped = impl_map or {}
    launches = tuple(
        Launch(id=o.id, layer=o.layer, op=o.op, index=o.index, op_class=o.op_class,
               impl=mapped.get(o.impl, o.impl), tokens=tuple(o.tokens), stream=o.stream, key=keys[o.id],
               order=rank[o.id], sm_count=o.sm_count, partition=parts[o.id],
               waits=tuple(d for d, _ in waits[o.id]), wait_kinds=tuple(k for _, k in waits[o.id]),
               record=o.id in recorded, layout=groups[o.id][0], group=groups[o.id][1],
               start_ms=o.start_ms, end_ms=o.end_ms)
        for o in ops)
    edges = tuple((a, b) for b, As in cap.items() for a in As)
    return LaunchList(launches, n, g, schedule.num_layers, tuple(notes), edges)


def issue_order(nano_ops) -> list:
    """The nano-ops in the order they are issued: by stated start time, then plan order.

    Plan streams that share an SM group share one CUDA stream (their key), and a CUDA stream runs
    its kernels in issue order, so issuing by plan order would let a later-planned op take the
    group first: in a Mistral-7B W2 plan on an H100, decode attention issued before a RoPE nano-op
    planned 0.02 ms ahead of it takes the 32-SM group for 0.95 ms, and the prefill attention waiting
    on that RoPE slips by as much. Start order is a topological order of the
    plan (dependencies end before their dependants start; one plan stream runs in order)."""
    return sorted(nano_ops, key=lambda o: (o.start_ms, o.order))


def sequential_launches(model, workload, num_layers: int, num_sms: int, impl_of, stream: str = "main"
                        ) -> LaunchList:
    """Whole ops, one stream, the whole GPU, in the layer's data-flow order (baselines).

    impl_of: a str (every op) or a dict op -> impl.
    """
    layer = build_layer(model, workload)
    names = list(layer.nodes)          # inserted in the layer's data-flow order (ops.layer_ops)
    whole = Partition(0, num_sms, num_sms)
    whole_layout = Layout((num_sms,), "whole")
    out, order = [], 0
    for l in range(num_layers):
        for name in names:
            op = layer.nodes[name]["op"]
            impl = impl_of if isinstance(impl_of, str) else impl_of[name]
            out.append(Launch(id=f"L{l}.{name}#0", layer=l, op=name, index=0, op_class=op.op_class, impl=impl,
                              tokens=tuple(layer.nodes[name]["token_range"]), stream=stream,
                              key=f"{stream}@all", order=order, sm_count=num_sms, partition=whole,
                              waits=(), wait_kinds=(), record=False, layout=whole_layout, group=0))
            order += 1
    return LaunchList(tuple(out), num_sms, 1, num_layers)


# ---------------------------------------------------------------------------------------------- edges
def _capacity_edges(ops, n: int, notes: list[str]) -> dict[str, tuple[str, ...]]:
    """For each op, the latest op per other stream predicted to end before it starts whose SMs
    together with its own exceed n."""
    edges: dict[str, tuple[str, ...]] = {}
    seen: list = []
    warned = 0
    for b in ops:
        latest: dict[str, object] = {}
        for a in seen:
            if a.stream == b.stream or a.sm_count + b.sm_count <= n:
                continue
            if a.end_ms <= b.start_ms + TOLERANCE_MS:
                if a.stream not in latest or latest[a.stream].order < a.order:
                    latest[a.stream] = a
            elif a.start_ms < b.end_ms - TOLERANCE_MS and warned < 5:
                warned += 1
                notes.append(f"plan predicts {a.id} ({a.sm_count} SMs) and {b.id} ({b.sm_count} SMs) "
                             f"side by side on {n} SMs")
        if latest:
            edges[b.id] = tuple(sorted(x.id for x in latest.values()))
        seen.append(b)
    return edges


def prune_waits(ops, keys, needs, rank) -> dict[str, list[tuple[str, str]]]:
    """Drop waits implied by earlier waits (vector clocks over stream keys). ops: in issue order (each
    with an .id); keys: id -> the stream it is issued on; needs: id -> [(earlier id, kind)] on other
    streams; rank: id -> issue position. Also the engine's overlapped buckets (runtime.overlap_program)."""
    clocks: dict[str, dict[str, int]] = {}
    key_clock: dict[str, dict[str, int]] = {}
    pos_in_key: dict[str, int] = {}
    count: dict[str, int] = {}
    out: dict[str, list[tuple[str, str]]] = {}
    for o in ops:
        k = keys[o.id]
        clock = dict(key_clock.get(k, {}))
        kept = []
        # latest-issued first: later ops carry more knowledge, so more of the rest get pruned
        for d, kind in sorted(needs[o.id], key=lambda dk: -rank[dk[0]]):
            if clock.get(keys[d], 0) >= pos_in_key[d]:
                continue
            kept.append((d, kind))
            for s, p in clocks[d].items():
                if clock.get(s, 0) < p:
                    clock[s] = p
        count[k] = count.get(k, 0) + 1
        pos_in_key[o.id] = count[k]
        clock[k] = count[k]
        clocks[o.id] = clock
        key_clock[k] = clock
        out[o.id] = sorted(kept, key=lambda dk: rank[dk[0]])
    return out


# ---------------------------------------------------------------------------------------------- placement
def _place(ops, n: int, g: int, notes: list[str]) -> dict[str, Partition]:
    """SM interval per op: the first free one on its side, free of ops predicted to overlap it in time."""
    parts: dict[str, Partition] = {}
    placed: list = []
    for o in ops:
        if o.sm_count >= n or o.sm_count == 0:
            parts[o.id] = Partition(0, n, n)
            if o.sm_count:            # an op of no SM share (0) holds no interval: others may run anywhere
                placed.append(o)
            continue
        busy_ops = [a for a in placed if a.stream != o.stream
                    and a.start_ms < o.end_ms - TOLERANCE_MS and o.start_ms < a.end_ms - TOLERANCE_MS]
        busy = [parts[a.id] for a in busy_ops]
        corun = _corun_sets(o, busy_ops, parts)
        cands = _candidates(o.sm_count, n, g, o.op_class in COMPUTE_CLASSES)
        choice = next((c for c in cands if _free(c, busy) and _buildable(c, corun, n, g)), None)
        if choice is None:
            gap = _widest_gap(busy, n, g, o.op_class in COMPUTE_CLASSES)
            if gap is not None and _buildable(gap, corun, n, g):
                choice = gap
                notes.append(f"{o.id}: no free {o.sm_count}-SM interval beside the ops predicted to run "
                             f"with it; runs on {choice.sms} SMs ({choice.label})")
            else:
                choice = next((c for c in cands if _free(c, busy)), gap)
                if choice is not None:
                    notes.append(f"{o.id}: no interval beside the ops predicted to run with it forms a "
                                 f"buildable layout of at most {MAX_GROUPS} groups; runs on {choice.label}")
            if choice is None:
                choice = cands[0]
                notes.append(f"{o.id}: shares SMs with ops predicted to run beside it ({choice.label})")
        parts[o.id] = choice
        placed.append(o)
    return parts


def _candidates(width: int, n: int, g: int, front: bool) -> list[Partition]:
    w = min(n, -(-width // g) * g)
    fronts = []
    for lo in range(0, n, g):
        hi = lo + w
        if hi < n:
            fronts.append(Partition(lo, hi, n))
        elif n - lo >= width:
            fronts.append(Partition(lo, n, n))
    backs = []
    lo = (n - width) // g * g
    if lo > 0:
        backs.append(Partition(lo, n, n))
    for hi in range((n - 1) // g * g, 0, -g):
        if hi - w >= 0:
            backs.append(Partition(hi - w, hi, n))
    cands = fronts + backs if front else backs + fronts
    # exact widths first: a group can be a multiple of the granularity anywhere aligned, or any width
    # as the remainder (last) of a layout; only after them the widths rounded up (e.g. 100 SMs is
    # exact as [32, 132), the remainder of (32, 100), but rounds to 104 at the front)
    exact = [c for c in cands if c.sms == width and (c.lo % g == 0) and (c.hi % g == 0 or c.hi == n)]
    # ... and of those first the ones at an end of the SM line, which cut no idle sliver off it
    exact.sort(key=lambda c: not (c.lo == 0 or c.hi == n))
    cands = exact + cands
    seen, out = set(), []
    for c in cands:
        if (c.lo, c.hi) not in seen and c.sms < n:
            seen.add((c.lo, c.hi))
            out.append(c)
    return out


def _free(p: Partition, busy: list[Partition]) -> bool:
    return not any(p.overlaps(b) for b in busy)


def _corun_sets(o, busy_ops, parts) -> list[list[Partition]]:
    """The intervals of the ops running at each instant of o's window where that set changes (each
    op in busy_ops overlaps o in time)."""
    out = []
    for t in sorted({o.start_ms} | {a.start_ms for a in busy_ops if a.start_ms > o.start_ms}):
        out.append([parts[a.id] for a in busy_ops
                    if a.start_ms <= t + TOLERANCE_MS and t < a.end_ms - TOLERANCE_MS])
    return out


def _buildable(p: Partition, corun: list[list[Partition]], n: int, g: int) -> bool:
    """Whether p beside each co-running set cuts the SM line into a buildable layout. A set that was
    not buildable without p (an earlier op already had to share SMs) does not hold p back."""
    for ps in corun:
        spans = [(q.lo, q.hi) for q in ps]
        if line_layout(spans + [(p.lo, p.hi)], n, g, MAX_GROUPS) is None and line_layout(spans, n, g, MAX_GROUPS):
            return False
    return True


def _widest_gap(busy: list[Partition], n: int, g: int, front: bool) -> Partition | None:
    used = [False] * n
    for b in busy:
        for i in range(b.lo, b.hi):
            used[i] = True
    best = None
    starts = range(0, n, g)
    for lo in starts:
        if used[lo]:
            continue
        hi = lo
        while hi < n and not used[hi]:
            hi += 1
        if hi < n:
            hi = hi // g * g
        if hi - lo < g and hi != n:
            continue
        if hi <= lo:
            continue
        cand = Partition(lo, hi, n)
        if (best is None or cand.sms > best.sms or (cand.sms == best.sms and not front and cand.lo > best.lo)):
            best = cand
    return best


# ---------------------------------------------------------------------------------------------- layouts
def _corun(a, b) -> bool:
    """Predicted to run side by side: different plan streams, overlapping predicted times."""
    return (a.stream != b.stream and a.start_ms < b.end_ms - TOLERANCE_MS
            and b.start_ms < a.end_ms - TOLERANCE_MS)


def corun_components(ops, placed: dict[str, Partition]) -> list[list]:
    """The co-running sets: connected components of "predicted side by side" among the launches
    that do not take the whole GPU (in issue order, each component in issue order)."""
    return layout_components([o for o in ops if not placed[o.id].is_whole], TOLERANCE_MS)


def assign_layouts(ops, placed: dict[str, Partition], n: int, g: int, notes: list[str]
                   ) -> dict[str, tuple[Layout, int]]:
    """(layout, group) per launch: one buildable layout per co-running set (see the module docstring)."""
    whole = Layout((n,), "whole")
    out = {o.id: (whole, 0) for o in ops if placed[o.id].is_whole}
    resized, shared = [], []
    for comp in corun_components(ops, placed):
        layout, group_of = _best_layout(comp, placed, n, g)
        for o in comp:
            out[o.id] = (layout, group_of[o.id])
            got = layout.sizes[group_of[o.id]]
            if got != o.sm_count:
                resized.append(f"{o.id} {o.sm_count}->{got}")
        for a, b in combinations(comp, 2):
            if group_of[a.id] == group_of[b.id] and _corun(a, b):
                shared.append(f"{a.id}+{b.id}")
    if resized:
        notes.append(f"{len(resized)} launch(es) run on another SM count than the plan asks (rounded to the "
                     f"granularity, or one layout per co-running set): " + ", ".join(resized[:6]) + (" ..." if len(resized) > 6 else ""))
    if shared:
        notes.append(f"{len(shared)} pair(s) predicted side by side share a group (one stream, one after the "
                     f"other): " + ", ".join(shared[:4]) + (" ..." if len(shared) > 4 else ""))
    return out


def _best_layout(comp, placed: dict[str, Partition], n: int, g: int) -> tuple[Layout, dict[str, int]]:
    """The layout (cut at the component's interval ends) and group per launch that puts the fewest
    co-running pairs in one group, then changes the SM counts least (weighted by duration)."""
    pairs = [(a.id, b.id) for a, b in combinations(comp, 2) if _corun(a, b)]
    cuts = sorted({x for o in comp for x in (placed[o.id].lo, placed[o.id].hi)} - {0, n})
    best = None
    for k in range(MAX_GROUPS):
        for chosen in combinations(cuts, k):
            bounds = (0, *chosen, n)
            sizes = tuple(b - a for a, b in zip(bounds, bounds[1:]))
            if not is_buildable(sizes, n, g, MAX_GROUPS):
                continue
            layout = make_layout(sizes, n, g, MAX_GROUPS)
            group_of = {o.id: _group_for(placed[o.id], layout) for o in comp}
            clashes = sum(1 for a, b in pairs if group_of[a] == group_of[b])
            change = sum((o.end_ms - o.start_ms + TOLERANCE_MS) * abs(layout.sizes[group_of[o.id]] - placed[o.id].sms)
                         for o in comp)
            score = (clashes, round(change, 9), layout.num_groups)
            if best is None or score < best[0]:
                best = (score, layout, group_of)
    return best[1], best[2]          # k = 0 (the whole GPU, one group) is always buildable


def _group_for(p: Partition, layout: Layout) -> int:
    """The group of the layout that overlaps p most (ties: the one nearest p's width, then the first)."""
    def key(i):
        lo, hi = layout.bounds[i]
        return (-(min(hi, p.hi) - max(lo, p.lo)), abs((hi - lo) - p.sms), i)
    return min(range(layout.num_groups), key=key)


# ---------------------------------------------------------------------------------------------- json
def to_dict(ll: LaunchList) -> dict:
    return {"num_sms": ll.num_sms, "granularity": ll.granularity, "num_layers": ll.num_layers,
            "notes": list(ll.notes), "capacity_edges": [list(e) for e in ll.capacity_edges],
            "launches": [{"id": l.id, "op": l.op, "impl": l.impl, "tokens": list(l.tokens), "stream": l.stream,
                          "key": l.key, "order": l.order, "sm_count": l.sm_count, "sms": l.sms,
                          "partition": [l.partition.lo, l.partition.hi], "layout": list(l.layout.sizes),
                          "layout_build": l.layout.build, "group": l.group, "waits": list(l.waits),
                          "wait_kinds": list(l.wait_kinds), "record": l.record} for l in ll.launches]}
