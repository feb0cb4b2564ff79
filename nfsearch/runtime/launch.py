"""Plan -> launch list: what the executor issues, in what order, on which stream, after which events.

Pure Python (no torch): the executor only walks the list this module makes. For every nano-op of a
Schedule, in plan (issue) order, a Launch says: the op, impl and token range; the plan stream and the
stream key it is issued on; the SM interval it runs on; and the nano-ops (on other streams) whose
completion events it waits on.

Three kinds of ordering edges
-----------------------------
* data: the plan's deps (data dependencies only).
* capacity: the plan's deps do not stop two nano-ops of different streams from running side by side.
  When the plan predicts A (issued earlier, other stream) to END before B STARTS and
  A.sm_count + B.sm_count > the GPU's SMs, they cannot share the GPU, so B also waits on A. Only the
  latest such A per stream is kept (earlier ones on that stream are implied by stream order).
* stream: consecutive nano-ops of one plan stream that land on different SM intervals are issued on
  different stream keys (see below); the later one waits on the earlier one, which keeps the plan
  stream's order.
Redundant waits are pruned with vector clocks over the stream keys: a wait is dropped when the
waiting stream already knows (through earlier waits or its own order) that the op is done.

SM intervals (green-context sides)
----------------------------------
Green contexts made from one split of the device are disjoint; two DIFFERENT splits overlap
physically (the front group of split(96) and the front group of split(36) share 36 SMs). So every
launch gets an explicit SM interval [lo, hi) of the SM line 0..N, and ops that run at the same time
must get disjoint intervals. An interval is what one split gives:
    [0, hi)  -> group 0 of split((hi, N-hi))          (a "front" group; hi a multiple of the granularity)
    [lo, N)  -> group 1 of split((lo, N-lo))          (the "remainder" side of split(lo))
    [lo, hi) -> group 1 of split((lo, hi-lo, N-hi))   (a middle group: a "nested" layout, the
                                                       remainder of split(lo) split again)
(SmPartitions.split rounds every size but the last; the last group takes the remaining SMs.)
    [0, N)   -> the whole GPU: a plain stream, no green context.
Every such split is a layout of nfsearch.layouts (fronts multiples of the granularity, remainder
last). This assumes the driver hands SMs out in one fixed order for every split (granularity-aligned
groups from the front, remainder last). Measured on an H100 (nfsearch/layouts.py) that holds only
in part: groups asked together interleave SMs, and 1869 of 18915 line-disjoint interval pairs from
different layouts shared SMs, so co-runners built from different splits may overlap physically.
Placement, nano-op by nano-op in issue order, against the ops already placed:
  compute ops take the lowest free interval (front: a GEMM of 96 SMs gets [0, 96) = front of split(96));
  other classes take the highest free one (back: decode attention of 36 SMs gets [96, 132) = the
  remainder of split(96) = split(132 - 36)).
"Free" means disjoint from the intervals of ops (on other streams) predicted to overlap it in time,
and buildable together: at every instant the op runs, the intervals of the ops running then, cut
at their ends (idle SMs between them count as groups), must form a layout of
``layouts.buildable_layouts`` with at most MAX_GROUPS groups (so three ops side by side on
132 SMs get e.g. (64, 32, 36), never four groups with an idle gap). A free interval that is not
buildable together is used only when none is (noted).
Ops predicted NOT to overlap may share SMs: if timing drifts and they do co-run, they only slow each
other; where they could not fit side by side at all, a capacity edge keeps them apart. If no
interval of the asked width is free (rounding, fragmentation), the op gets the widest free aligned
gap (noted), else it shares SMs (noted).
Widths round up to the granularity (a front of 12 SMs is 16; a back side is N - lo, e.g. 36 = 132-96).
The launch's ``sms`` (interval width) is what an SM-bounded kernel is told to use.

Sequential baselines (``sequential_launches``) are whole ops on one stream and the whole GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from nfsearch.errors import NfsearchError
from nfsearch.layouts import line_layout

TOLERANCE_MS = 1e-4
COMPUTE_CLASSES = ("compute",)
MAX_GROUPS = 3          # green-context groups side by side (a nested three-way layout at most)


@dataclass(frozen=True)
class Partition:
    """An SM interval [lo, hi) of a GPU with num_sms SMs, and the split that makes it."""
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
    def split(self) -> tuple[tuple[int, ...], int]:
        """(sizes for SmPartitions.split, index of the group), or ((), 0) for the whole GPU.

        SmPartitions.split rounds every size but the last, and the last group takes the rest."""
        n = self.num_sms
        if self.is_whole:
            return (), 0
        if self.lo == 0:
            return (self.hi, n - self.hi), 0
        if self.hi == n:
            return (self.lo, n - self.lo), 1
        return (self.lo, self.hi - self.lo, n - self.hi), 1

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
    partition: Partition
    waits: tuple[str, ...]           # ids whose completion events this launch waits on
    wait_kinds: tuple[str, ...]      # "data" | "capacity" | "stream", one per wait
    record: bool                     # some later launch waits on this one's event
    start_ms: float = 0.0
    end_ms: float = 0.0

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

    def summary(self) -> dict:
        waits = [k for l in self.launches for k in l.wait_kinds]
        return {"launches": len(self.launches), "stream_keys": self.keys,
                "partitions": sorted({l.partition.label for l in self.launches}),
                "waits": {k: waits.count(k) for k in ("data", "capacity", "stream")},
                "capacity_edges": len(self.capacity_edges), "notes": list(self.notes)}


# ---------------------------------------------------------------------------------------------- build
def build(schedule, num_sms: int | None = None, granularity: int | None = None,
          impl_map: dict[str, str] | None = None) -> LaunchList:
    """The launch list of a Schedule (plan order), for a GPU of num_sms SMs (default: the plan's)."""
    n = int(num_sms or schedule.gpu.num_sms)
    g = int(granularity or schedule.gpu.sm_granularity)
    ops = sorted(schedule.nano_ops, key=lambda o: o.order)
    if not ops:
        raise NfsearchError("plan has no nano-ops")
    notes: list[str] = []
    by_id = {o.id: o for o in ops}

    cap = _capacity_edges(ops, n, notes)
    parts = _place(ops, n, g, notes)
    keys = {o.id: f"{o.stream}@{parts[o.id].label}" for o in ops}

    needs: dict[str, list[tuple[str, str]]] = {}
    last_on_stream: dict[str, str] = {}
    for o in ops:
        wanted = [(d, "data") for d in o.deps] + [(a, "capacity") for a in cap.get(o.id, ())]
        prev = last_on_stream.get(o.stream)
        if prev is not None and keys[prev] != keys[o.id]:
            wanted.append((prev, "stream"))
        last_on_stream[o.stream] = o.id
        needs[o.id] = [(d, kind) for d, kind in wanted if keys[d] != keys[o.id]]

    waits = _prune(ops, keys, needs, by_id)
    recorded = {d for ws in waits.values() for d, _ in ws}
    mapped = impl_map or {}
    launches = tuple(
        Launch(id=o.id, layer=o.layer, op=o.op, index=o.index, op_class=o.op_class,
               impl=mapped.get(o.impl, o.impl), tokens=tuple(o.tokens), stream=o.stream, key=keys[o.id],
               order=o.order, sm_count=o.sm_count, partition=parts[o.id],
               waits=tuple(d for d, _ in waits[o.id]), wait_kinds=tuple(k for _, k in waits[o.id]),
               record=o.id in recorded, start_ms=o.start_ms, end_ms=o.end_ms)
        for o in ops)
    edges = tuple((a, b) for b, As in cap.items() for a in As)
    return LaunchList(launches, n, g, schedule.num_layers, tuple(notes), edges)


def sequential_launches(model, workload, num_layers: int, num_sms: int, impl_of, stream: str = "main"
                        ) -> LaunchList:
    """Whole ops, one stream, the whole GPU, in the layer's data-flow order (baselines).

    impl_of: a str (every op) or a dict op -> impl.
    """
    from nfsearch.graph import build_layer
    layer = build_layer(model, workload)
    names = list(layer.nodes)          # inserted in the layer's data-flow order (ops.layer_ops)
    whole = Partition(0, num_sms, num_sms)
    out, order = [], 0
    for l in range(num_layers):
        for name in names:
            op = layer.nodes[name]["op"]
            impl = impl_of if isinstance(impl_of, str) else impl_of[name]
            out.append(Launch(id=f"L{l}.{name}#0", layer=l, op=name, index=0, op_class=op.op_class, impl=impl,
                              tokens=tuple(layer.nodes[name]["token_range"]), stream=stream,
                              key=f"{stream}@all", order=order, sm_count=num_sms, partition=whole,
                              waits=(), wait_kinds=(), record=False))
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


def _prune(ops, keys, needs, by_id) -> dict[str, list[tuple[str, str]]]:
    """Drop waits implied by earlier waits (vector clocks over stream keys)."""
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
        for d, kind in sorted(needs[o.id], key=lambda dk: -by_id[dk[0]].order):
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
        out[o.id] = sorted(kept, key=lambda dk: by_id[dk[0]].order)
    return out


# ---------------------------------------------------------------------------------------------- placement
def _place(ops, n: int, g: int, notes: list[str]) -> dict[str, Partition]:
    """SM interval per op: the first free one on its side, free of ops predicted to overlap it in time."""
    parts: dict[str, Partition] = {}
    placed: list = []
    for o in ops:
        if o.sm_count >= n:
            parts[o.id] = Partition(0, n, n)
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


# ---------------------------------------------------------------------------------------------- json
def to_dict(ll: LaunchList) -> dict:
    return {"num_sms": ll.num_sms, "granularity": ll.granularity, "num_layers": ll.num_layers,
            "notes": list(ll.notes), "capacity_edges": [list(e) for e in ll.capacity_edges],
            "launches": [{"id": l.id, "op": l.op, "impl": l.impl, "tokens": list(l.tokens), "stream": l.stream,
                          "key": l.key, "order": l.order, "sm_count": l.sm_count, "sms": l.sms,
                          "partition": [l.partition.lo, l.partition.hi], "waits": list(l.waits),
                          "wait_kinds": list(l.wait_kinds), "record": l.record} for l in ll.launches]}
