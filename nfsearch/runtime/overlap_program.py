"""An overlapped plan tiled over the engine's layers for one bucket: the nano-ops the bucket's CUDA graph
issues, in issue order, each with its engine rows, stream, SM share and the events it waits on.

Pure Python (no torch); runtime.engine_overlap runs the program.

Rows. A bucket's batches differ (decode rows [0, num_decode), prefill chunks after, padding to T), so
the plan's token ranges (of the bucket's mean batch) become fixed engine row ranges, the same for every
batch: a dense op's nano-batches keep the plan's cuts, the last running to T; decode attention's cover
the decode slots [0, B) (the last to B; slot r is row r); prefill attention's are row windows, the
first from row 0 and the last to T (chunks may start inside the padded decode slots), and each runs
every chunk clipped to its window (a query row's attention depends only on its position and the cache).

Order. The engine keeps one set of activation buffers for all layers, and the nano-ops of a window may
read K/V that other rows wrote, so the plan's deps (of its own layout, a buffer per layer) do not say
what is safe. The program's edges are the hazards of the sequential model, computed on rows: a
nano-op waits on the latest earlier writer of each row it reads or writes and on the readers of each
row it overwrites (decode attention writes zeros in padded slots, which prefill rows may hold: a
write-after-write edge). The plan's deps and `after` order edges, mapped through the tiling, are kept
too. The issue order is a topological order of all edges, by the plan's stated start times (a
layer past the plan's last one is its last layer shifted by one layer period); waits between
streams are pruned with vector clocks (runtime.launch.prune_waits).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from itertools import pairwise

from nfsearch.errors import NfsearchError
from nfsearch.runtime.launch import prune_waits

LAYER_OPS = ("norm1", "kqv", "rope_append", "decode_attn", "prefill_attn", "o", "norm2", "ug", "act", "d")
# buffers each op reads and writes over its rows ("kv": this layer's cache entries of those rows;
# "kv<": of every row before the end of the window, as a chunk reads its earlier rows' K/V)
ACCESS = {"norm1": (("x",), ("h",)), "kqv": (("h",), ("qkv",)), "rope_append": (("qkv",), ("q", "k", "v", "kv")),
          "decode_attn": (("q", "kv"), ("attn",)), "prefill_attn": (("q", "kv<"), ("attn",)),
          "o": (("attn", "x"), ("mid",)), "norm2": (("mid",), ("h",)), "ug": (("h",), ("ug",)),
          "act": (("ug",), ("act",)), "d": (("act", "mid"), ("x",))}
# dense ops whose impls take num_sms as their grid; "torch" (cuBLAS, F.rms_norm) and "fp8" ignore it
BOUNDED_IMPLS = ("triton", "tma", "cuda", "cublaslt")


@dataclass(frozen=True)
class EngineOp:
    id: str                          # L<model layer>.<op>#<index>
    layer: int
    op: str
    index: int
    rows: tuple[int, int]            # decode_attn: decode slots; prefill_attn: the window chunks are clipped to
    stream: str                      # the plan's stream
    num_sms: int                     # its SM share on this GPU (the kernels' grid bound)
    impl: str                        # the plan's impl name (the model's ops dict runs the op)
    template: str                    # the plan nano-op it tiles ("" for one the plan lacks)
    waits: tuple[str, ...] = ()      # ops on other streams whose events it waits on
    record: bool = False             # a later op waits on its event


@dataclass(frozen=True)
class OverlapProgram:
    ops: tuple[EngineOp, ...]        # issue order
    streams: tuple[str, ...]
    edges: tuple[tuple[str, str], ...]       # every (earlier, later) edge the order honours
    plan_edges: tuple[tuple[str, str], ...]  # those of the plan's deps and `after`, mapped to model layers
    notes: tuple[str, ...]

    @property
    def prefill_windows(self) -> list[tuple[int, int]]:
        return list(dict.fromkeys(o.rows for o in self.ops if o.op == "prefill_attn"))


def build_program(plan, num_layers: int, num_tokens: int, num_decode: int, num_segments: int,
                  num_sms: int, op_impls: dict[str, str] | None = None) -> OverlapProgram:
    """The program of `plan` for a bucket of num_tokens rows, num_decode decode slots and num_segments
    chunk segments, over num_layers layers, on a GPU of num_sms SMs. op_impls: the impl each dense op
    runs (the plan's names where not given)."""
    notes: list[str] = []
    unknown = sorted({o.op for o in plan.nano_ops} - set(LAYER_OPS))
    if unknown:
        raise NfsearchError(f"its plan has ops the engine's layer does not run: {', '.join(unknown)}")
    ops, keys, plan_edges = _tile(plan, num_layers, num_tokens, num_decode, num_segments, num_sms, op_impls or {},
                                  notes)
    hazards = _hazards(ops)
    order = _topological(ops, hazards + plan_edges, keys)
    if order is None:       # a plan order against the shared buffers: keep the data, drop the order
        notes.append("its plan's order edges conflict with the engine's shared buffers: left out")
        plan_edges = [e for e in plan_edges if e[2] == "data"]
        order = _topological(ops, hazards + plan_edges, keys)
    edges = [(a, b) for a, b, _ in hazards + plan_edges]
    by_id = {o.id: o for o in ops}
    rank = {oid: k for k, oid in enumerate(order)}
    needs = {oid: [] for oid in order}
    for a, b in edges:
        if by_id[a].stream != by_id[b].stream:
            needs[b].append((a, "data"))
    ordered = [by_id[i] for i in order]
    waits = prune_waits(ordered, {o.id: o.stream for o in ordered}, needs, rank)
    recorded = {d for ws in waits.values() for d, _ in ws}
    final = tuple(_with(o, waits=tuple(d for d, _ in waits[o.id]), record=o.id in recorded) for o in ordered)
    notes += _unbounded_notes(final, num_sms)
    return OverlapProgram(final, tuple(dict.fromkeys(o.stream for o in final)), tuple(sorted(set(edges))),
                          tuple(sorted({(a, b) for a, b, _ in plan_edges})), tuple(notes))


def _with(o: EngineOp, **kw) -> EngineOp:
    return EngineOp(**{**o.__dict__, **kw})


# ---------------------------------------------------------------------------------------------- tiling
def _tile(plan, L: int, T: int, B: int, S: int, num_sms: int, impls: dict[str, str], notes: list[str]):
    """Engine ops of every model layer from the plan's layers (layer i >= the plan's last takes its last),
    their sort keys, and the plan's edges mapped to model layers."""
    last = plan.num_layers - 1
    by_layer: dict[int, list] = {}
    for o in plan.nano_ops:
        by_layer.setdefault(o.layer, []).append(o)
    period = _period(plan)
    limits = {"decode_attn": B, "prefill_attn": T if S else 0}
    ops, keys, plan_edges, of_template = [], {}, [], {}
    for i in range(L):
        t = min(i, last)
        shift = (i - t) * period
        template = by_layer.get(t, [])
        for op in LAYER_OPS:
            mine = sorted((o for o in template if o.op == op), key=lambda o: o.index)
            limit = limits.get(op, T)
            if limit == 0:
                continue
            if not mine:
                if op not in ("decode_attn", "prefill_attn"):
                    raise NfsearchError(f"its plan's layer {t} has no {op}")
                ops.append(_whole(op, i, limit, template, num_sms, notes))
                keys[ops[-1].id] = (_whole_key(template) + shift, -1)
                continue
            for o, rows in zip(mine, _rows(op, [x.tokens for x in mine], limit)):
                e = EngineOp(f"L{i}.{op}#{o.index}", i, op, o.index, rows, o.stream,
                             _share(o.sm_count, plan.gpu.num_sms, num_sms), impls.get(op, o.impl), o.id)
                ops.append(e)
                keys[e.id] = (o.start_ms + shift, o.order)
                of_template[(i, o.id)] = e.id
    for i in range(L):
        t = min(i, last)
        for o in by_layer.get(t, []):
            me = of_template.get((i, o.id))
            for kind, refs in (("data", o.deps), ("order", o.after)):
                for ref in refs:
                    other = of_template.get(_tiled_ref(ref, i, t, last))
                    if me is not None and other is not None:
                        plan_edges.append((other, me, kind))
    return ops, keys, plan_edges


def _tiled_ref(ref: str, i: int, t: int, last: int) -> tuple[int, str]:
    """(model layer, plan nano-op id it tiles) of `ref`, named by the plan's layer t nano-op tiled to
    model layer i: a nano-op k layers before t is of model layer i - k."""
    dot = ref.index(".")
    layer = i - (t - int(ref[1:dot]))
    return layer, f"L{min(max(layer, 0), last)}{ref[dot:]}"


def _period(plan) -> float:
    """The plan's layer period: the mean start-time shift of layer 1's nano-ops from layer 0's."""
    starts = {(o.layer, o.op, o.index): o.start_ms for o in plan.nano_ops}
    shifts = [starts[(1, op, k)] - s for (layer, op, k), s in starts.items() if layer == 0 and (1, op, k) in starts]
    if shifts:
        return max(sum(shifts) / len(shifts), 1e-9)
    return max((o.end_ms for o in plan.nano_ops), default=1.0) or 1.0


def _rows(op: str, tokens: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Engine rows of an op's nano-batches: the plan's cuts, the first from 0 (prefill windows: from row
    0; a dense op starts there anyway) and the last to `limit`."""
    cuts = [0] + [min(a, limit) for a, _ in tokens[1:]] + [limit]
    rows = list(pairwise(cuts))
    if any(b <= a for a, b in rows):
        raise NfsearchError(f"its plan's {op} nano-batches {tokens} do not fit the bucket's {limit} rows")
    return rows


def _share(sm_count: int, plan_sms: int, num_sms: int) -> int:
    return max(1, min(num_sms, round(sm_count * num_sms / plan_sms)))


def _whole(op: str, layer: int, limit: int, template, num_sms: int, notes: list[str]) -> EngineOp:
    """An attention op the plan's batch had none of (its mean batch had no decode rows or no chunks),
    which the bucket's batches may need: whole, at the full GPU, on the stream of the layer's O GEMM."""
    stream = next((o.stream for o in sorted(template, key=lambda o: o.order) if o.op == "o"), "main")
    if layer == 0:
        notes.append(f"its plan has no {op}: the engine runs it whole on stream {stream}")
    return EngineOp(f"L{layer}.{op}#0", layer, op, 0, (0, limit), stream, num_sms, "engine", "")


def _whole_key(template) -> float:
    return min((o.start_ms for o in template if o.op == "o"), default=0.0) - 1e-9


# ---------------------------------------------------------------------------------------------- order
def _hazards(ops: list[EngineOp]) -> list[tuple[str, str, str]]:
    """(earlier, later, "data") edges of the sequential model's hazards on rows, in program order (layer,
    op, nano-batch): the latest earlier writer of each row read or written, the readers of each row
    overwritten since its last write."""
    rank = {op: k for k, op in enumerate(LAYER_OPS)}
    seen: dict[str, list[tuple[str, tuple[int, int], bool]]] = {}   # buffer -> (op id, rows, is_write)
    edges = []
    for o in sorted(ops, key=lambda o: (o.layer, rank[o.op], o.index)):
        reads, writes = ACCESS[o.op]
        accesses = [(_buffer(b, o.layer), _span(b, o.rows), False) for b in reads] + \
                   [(_buffer(b, o.layer), o.rows, True) for b in writes]
        for buf, rows, is_write in accesses:
            left = [rows]
            for other, span, other_writes in reversed(seen.get(buf, [])):
                if not left:
                    break
                if other != o.id and (is_write or other_writes) and any(_overlap(x, span) for x in left):
                    edges.append((other, o.id, "data"))
                if other_writes:
                    left = [piece for x in left for piece in _minus(x, span)]
        for buf, rows, is_write in accesses:
            seen.setdefault(buf, []).append((o.id, rows, is_write))
    return sorted(set(edges))


def _buffer(name: str, layer: int) -> str:
    return f"kv{layer}" if name.startswith("kv") else name


def _span(name: str, rows: tuple[int, int]) -> tuple[int, int]:
    return (0, rows[1]) if name == "kv<" else rows


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _minus(a: tuple[int, int], b: tuple[int, int]) -> list[tuple[int, int]]:
    return [x for x in ((a[0], min(a[1], b[0])), (max(a[0], b[1]), a[1])) if x[0] < x[1]]


def _topological(ops: list[EngineOp], edges, keys) -> list[str] | None:
    """Kahn's order of the edges, smallest key first; None on a cycle."""
    after: dict[str, list[str]] = {o.id: [] for o in ops}
    num_before = {o.id: 0 for o in ops}
    for a, b, _ in set(edges):
        after[a].append(b)
        num_before[b] += 1
    ready = [(keys[i], i) for i, n in num_before.items() if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for j in after[i]:
            num_before[j] -= 1
            if num_before[j] == 0:
                heapq.heappush(ready, (keys[j], j))
    return order if len(order) == len(ops) else None


def _unbounded_notes(ops, num_sms: int) -> list[str]:
    """Ops given less than the whole GPU whose kernel cannot be held to it. rope_append and the attention
    ops run the engine's own paged Triton kernels (RoPE fused with the K/V write), whose grids take the
    share as num_sms."""
    loose = sorted({(o.op, o.impl) for o in ops if o.num_sms < num_sms and o.op not in
                    ("decode_attn", "prefill_attn", "rope_append") and o.impl not in BOUNDED_IMPLS})
    return [f"{op} ({impl}) ignores its SM share: it may take every SM beside the ops it overlaps"
            for op, impl in loose]
