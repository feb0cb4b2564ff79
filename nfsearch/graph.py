"""The operation graph of a decoder layer, and its split into nano-ops over token ranges.

`build_layer` gives a networkx DiGraph whose nodes are op names (attribute `op`: an Op, `token_range`)
and whose edges are data dependencies. `split_layers` unrolls it over L layers and splits each op into
nano-ops over token ranges: a nano-op depends only on the nano-ops of its predecessors whose token
ranges intersect the range it reads.
"""

from dataclasses import dataclass

import networkx as nx

from nfsearch.errors import NfsearchError
from nfsearch.ops import Op, domain_range, layer_ops
from nfsearch.specs import ModelSpec, Workload


@dataclass(frozen=True, order=True)
class NanoOp:
    layer: int
    op: str
    index: int
    start: int
    end: int

    @property
    def id(self) -> str:
        return f"L{self.layer}.{self.op}#{self.index}"

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def build_layer(model: ModelSpec, workload: Workload) -> nx.DiGraph:
    ops = layer_ops(model, workload)
    graph = nx.DiGraph()
    for op in ops:
        graph.add_node(op.name, op=op, token_range=domain_range(op, workload))
    attention = [op.name for op in ops if op.name.endswith("_attn")]
    for prev, op in zip(ops, ops[1:]):
        if op.name.endswith("_attn"):
            graph.add_edge("rope_append", op.name)
        elif prev.name.endswith("_attn"):
            graph.add_edges_from((a, op.name) for a in attention)
        else:
            graph.add_edge(prev.name, op.name)
    return graph


def first_op(graph: nx.DiGraph) -> str:
    return next(n for n in nx.topological_sort(graph) if graph.in_degree(n) == 0)


def last_op(graph: nx.DiGraph) -> str:
    return [n for n in nx.topological_sort(graph) if graph.out_degree(n) == 0][-1]


def op_of(graph: nx.DiGraph, name: str) -> Op:
    return graph.nodes[name]["op"]


def read_range(op_name: str, start: int, end: int, workload: Workload) -> tuple[int, int]:
    """The token range a nano-op over [start, end) reads from its predecessors.

    Prefill attention is causal: a token also reads the keys of its prompt's earlier tokens.
    """
    if op_name != "prefill_attn":
        return (start, end)
    for p_start, p_end in workload.prompt_ranges():
        if p_start <= start < p_end:
            return (p_start, end)
    return (start, end)


def nano_ranges(graph: nx.DiGraph, sizes: dict[str, tuple[int, ...]]) -> dict[str, list[tuple[int, int]]]:
    """Token ranges of each op's nano-ops from their sizes (an op missing from `sizes` stays whole)."""
    ranges = {}
    for name in graph.nodes:
        start, end = graph.nodes[name]["token_range"]
        op_sizes = sizes.get(name, (end - start,))
        if sum(op_sizes) != end - start or min(op_sizes) <= 0:
            raise NfsearchError(f"nano-batch sizes {list(op_sizes)} of op {name} do not cover its "
                                f"{end - start} tokens")
        bounds, pos = [], start
        for n in op_sizes:
            bounds.append((pos, pos + n))
            pos += n
        ranges[name] = bounds
    return ranges


def split_layers(graph: nx.DiGraph, sizes: dict[str, tuple[int, ...]], num_layers: int,
                 workload: Workload) -> nx.DiGraph:
    """The nano-op DAG of `num_layers` unrolled layers; nodes are NanoOp, edges dependencies."""
    ranges = nano_ranges(graph, sizes)
    nano = nx.DiGraph()
    for layer in range(num_layers):
        for name, bounds in ranges.items():
            for i, (s, e) in enumerate(bounds):
                nano.add_node(NanoOp(layer, name, i, s, e))
    layer_edges = [(u, v, 0) for u, v in graph.edges]
    cross_edges = [(last_op(graph), first_op(graph), 1)]
    for layer in range(num_layers):
        for u, v, step in layer_edges + cross_edges:
            if layer + step < num_layers:
                _link(nano, ranges, workload, (layer, u), (layer + step, v))
    return nano


def _link(nano, ranges, workload, src, dst) -> None:
    (src_layer, u), (dst_layer, v) = src, dst
    for j, (vs, ve) in enumerate(ranges[v]):
        rs, re = read_range(v, vs, ve, workload)
        for i, (us, ue) in enumerate(ranges[u]):
            if us < re and rs < ue:
                nano.add_edge(NanoOp(src_layer, u, i, us, ue), NanoOp(dst_layer, v, j, vs, ve))
