"""The operations of one decoder layer and their graph, and its split into nano-ops over token ranges.

An Op has a class (compute, memory, network, other), a token domain and the work it does (FLOPs,
bytes moved, bytes sent over the network; per GPU under tensor parallelism): the analytic profile
and the roofline are computed from that work.

`build_layer` gives a networkx DiGraph whose nodes are op names (attribute `op`: an Op, `token_range`)
and whose edges are data dependencies. `split_layers` unrolls it over L layers and splits each op into
nano-ops over token ranges: a nano-op depends only on the nano-ops of its predecessors whose token
ranges intersect the range it reads.
"""

from dataclasses import dataclass

import networkx as nx

from nfsearch.errors import NfsearchError
from nfsearch.specs import ModelSpec, Workload, check_fits


OP_CLASSES = ("compute", "memory", "network", "other")
DOMAINS = ("all", "decode", "prefill")
# the op groups stage 1 may cut differently (NanoFlow: nano-batch count and sizes per group): the
# attention block, the output projection with its all-reduce and the norm after it, the FFN
OP_GROUPS = {"norm1": "attention", "kqv": "attention", "rope_append": "attention", "decode_attn": "attention",
             "prefill_attn": "attention", "o": "projection", "allreduce_o": "projection", "norm2": "projection",
             "router": "ffn", "expert_ug": "ffn", "ug": "ffn", "act": "ffn", "expert_d": "ffn", "d": "ffn",
             "allreduce_d": "ffn"}


@dataclass(frozen=True)
class Op:
    name: str
    op_class: str
    domain: str
    gemm_k: int = 0          # GEMM ops: the reduction size and output width, per GPU
    gemm_n: int = 0

    @property
    def is_gemm(self) -> bool:
        return self.gemm_n > 0


@dataclass(frozen=True)
class Work:
    flops: float = 0.0
    num_bytes: float = 0.0
    net_bytes: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.num_bytes + other.num_bytes,
                    self.net_bytes + other.net_bytes)


def layer_ops(model: ModelSpec, workload: Workload) -> list[Op]:
    """The layer's ops in data-flow order (each feeds the next; both attentions feed O).

    Every path from a model and a workload to ops, graphs, profiles and rooflines passes here, so
    this is where the pair is checked (TP divides the heads, contexts fit a sliding window)."""
    check_fits(model, workload)
    tp = workload.tp_degree
    shard = tp_shard(model, tp)          # checks the FFN split too: check_fits covers the heads only
    q, kv, hidden, inter = shard.q_size, shard.kv_size, model.hidden_size, shard.intermediate_size
    ops = [Op("norm1", "other", "all"),
           Op("kqv", "compute", "all", hidden, q + 2 * kv),
           Op("rope_append", "other", "all")]
    if workload.num_decode:
        ops.append(Op("decode_attn", "memory", "decode"))
    if workload.num_prefill_tokens:
        ops.append(Op("prefill_attn", "compute", "prefill"))
    ops.append(Op("o", "compute", "all", q, hidden))
    if tp > 1:
        ops.append(Op("allreduce_o", "network", "all"))
    ops.append(Op("norm2", "other", "all"))
    if model.is_moe:
        ops.append(Op("router", "other", "all", hidden, model.num_experts))
        ops += [Op("expert_ug", "compute", "all", hidden, 2 * inter), Op("act", "other", "all"),
                Op("expert_d", "compute", "all", inter, hidden)]
    else:
        ops += [Op("ug", "compute", "all", hidden, 2 * inter), Op("act", "other", "all"),
                Op("d", "compute", "all", inter, hidden)]
    if tp > 1:
        ops.append(Op("allreduce_d", "network", "all"))
    return ops


def op_work(op: Op, model: ModelSpec, workload: Workload, num_tokens: int, context: int) -> Work:
    """Work of `op` over `num_tokens` tokens of its domain (requests, for decode attention).

    context: decode attention's KV length per request; prefill attention's prompt length.
    """
    tp, b = workload.tp_degree, workload.dtype_bytes
    hidden, n = model.hidden_size, num_tokens
    shard = tp_shard(model, tp)           # this GPU's heads and FFN slice (one place computes them)
    q, kv, heads = shard.q_size, shard.kv_size, shard.num_heads
    if op.name in ("expert_ug", "expert_d"):
        routed = n * model.num_experts_per_token
        experts_read = min(model.num_experts, routed)
        return Work(2.0 * routed * op.gemm_k * op.gemm_n,
                    b * (experts_read * op.gemm_k * op.gemm_n + routed * (op.gemm_k + op.gemm_n)))
    if op.is_gemm:
        return Work(2.0 * n * op.gemm_k * op.gemm_n, b * (op.gemm_k * op.gemm_n + n * (op.gemm_k + op.gemm_n)))
    if op.name in ("norm1", "norm2"):
        return Work(4.0 * n * hidden, b * (2 * n * hidden + hidden))
    if op.name == "rope_append":
        return Work(6.0 * n * (q + kv), b * n * 2 * (q + 2 * kv))
    if op.name == "act":
        inter = shard.intermediate_size
        return Work(4.0 * n * inter, b * 3 * n * inter)
    if op.name == "decode_attn":
        return Work(4.0 * n * context * heads * model.head_dim, b * (2 * n * context * kv + 2 * n * q))
    if op.name == "prefill_attn":
        pairs = n * (context + 1) / 2.0          # causal: token i of a prompt sees i + 1 keys
        return Work(4.0 * pairs * heads * model.head_dim, b * n * (2 * q + 2 * kv))
    if op.name.startswith("allreduce"):
        volume = b * n * hidden
        return Work(0.0, 2.0 * volume, 2.0 * (tp - 1) / tp * volume)
    raise ValueError(f"no work model for op {op.name}")


@dataclass(frozen=True)
class TpShard:
    """What one of `tp_degree` GPUs holds of a layer under Megatron-style tensor parallelism.

    KQV and UG are column-parallel (each GPU computes its heads' q/k/v and its slice of gate and up),
    O and D row-parallel (each GPU multiplies its slice of the reduction dimension and the partial
    sums are all-reduced after O and after D). Shapes are [rows, cols] of the `x @ W` weights."""
    tp_degree: int
    num_heads: int               # query heads on one GPU
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int       # I / tp: this GPU's slice of gate (and of up)

    def __post_init__(self):
        if min(self.tp_degree, self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_size,
               self.intermediate_size) < 1:
            raise ValueError(f"TpShard sizes must be positive: {self}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_shapes(self) -> dict[str, tuple[int, int]]:
        h, i = self.hidden_size, self.intermediate_size
        return {"wqkv": (h, self.q_size + 2 * self.kv_size), "wo": (self.q_size, h),
                "wug": (h, 2 * i), "wd": (i, h)}

    def collectives(self) -> tuple[str, ...]:
        """The layer's network ops, in order (none on one GPU)."""
        return ("allreduce_o", "allreduce_d") if self.tp_degree > 1 else ()


def tp_shard(model: ModelSpec, tp_degree: int) -> TpShard:
    """One GPU's share of a layer; refuses head, KV-head or FFN sizes that TP does not divide."""
    if tp_degree < 1:
        raise NfsearchError(f"TP degree must be at least 1, not {tp_degree}")
    for what, count in (("attention heads", model.num_heads), ("key/value heads", model.num_kv_heads),
                        ("FFN columns (intermediate_size)", model.intermediate_size)):
        if count % tp_degree:
            raise NfsearchError(f"model {model.name}'s {count} {what} are not divisible by TP={tp_degree}")
    return TpShard(tp_degree, model.num_heads // tp_degree, model.num_kv_heads // tp_degree, model.head_dim,
                   model.hidden_size, model.intermediate_size // tp_degree)


def shard_signature(model: ModelSpec, tp_degree: int, dtype: str) -> dict:
    """What a layer's kernel times depend on: one GPU's shapes of the layer, the TP degree (the
    collectives) and the data type. A profile is of the models whose signature it carries."""
    shard = tp_shard(model, tp_degree)
    return {"hidden_size": model.hidden_size, "num_heads": shard.num_heads,
            "num_kv_heads": shard.num_kv_heads, "head_dim": shard.head_dim, "intermediate_size": shard.intermediate_size,
            "num_experts": model.num_experts, "num_experts_per_token": model.num_experts_per_token,
            "has_qkv_bias": model.has_qkv_bias, "tp_degree": tp_degree, "dtype": dtype}


def op_context(op: Op, workload: Workload) -> int:
    """The context a profile row for this op is keyed by (0 for ops without one): decode attention's
    mean context (its time goes with the sum of the contexts), prefill attention's pair-weighted
    prompt length (Workload.prefill_context: the chunks' own causal pairs, prefixes included, priced
    as one launch; whole prompts of one length give that length)."""
    if op.name == "decode_attn":
        return workload.decode_context
    if op.name == "prefill_attn":
        return workload.prefill_context
    return 0


def batch_work(op: Op, model: ModelSpec, workload: Workload) -> Work:
    """Work of the whole op over the batch that runs: decode attention over each request's own
    context, prefill attention over each chunk's causal pairs and its cached prefix's K/V (read once);
    the roofline sums these exactly, where a profile lookup keys the op by one context (op_context)."""
    start, end = domain_range(op, workload)
    n = end - start
    if op.name == "decode_attn":
        return op_work(op, model, workload, n, sum(workload.contexts) / n)
    if op.name == "prefill_attn":
        work = op_work(op, model, workload, n, 2.0 * workload.prefill_pairs / n - 1.0)
        kv = tp_shard(model, workload.tp_degree).kv_size
        return work + Work(0.0, workload.dtype_bytes * 2.0 * kv * sum(workload.prefix_lens))
    return op_work(op, model, workload, n, op_context(op, workload))


@dataclass(frozen=True)
class MemoryNeed:
    """What one GPU holds to run the batch: its share of the whole model's weights (every layer, the
    embedding and the LM head) and the batch's KV cache (per layer, and for all layers)."""
    weights_bytes: int
    kv_bytes_per_layer: int
    num_layers: int

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_layer * self.num_layers

    def describe(self, memory_bytes: int = 0) -> str:
        gb = lambda x: f"{x / 1e9:.1f} GB"
        text = (f"weights {gb(self.weights_bytes)} + KV {gb(self.kv_bytes_per_layer)} per layer "
                f"({gb(self.kv_bytes)} for all {self.num_layers} layers) per GPU")
        return text + (f", of {gb(memory_bytes)}" if memory_bytes else "")


def check_memory(model: ModelSpec, workload: Workload, memory_bytes: int) -> MemoryNeed:
    """The memory the batch needs; refused where the model's weights and one layer's KV of the batch
    do not fit `memory_bytes` (0: unknown, not checked). A plan times one layer's batch (its layers
    run with their own KV), so all layers' KV is reported (MemoryNeed.describe), not required."""
    need = memory_need(model, workload)
    if memory_bytes and need.weights_bytes + need.kv_bytes_per_layer > memory_bytes:
        what = ("its weights" if need.weights_bytes > memory_bytes
                else "its weights and one layer's KV of the batch")
        raise NfsearchError(f"model {model.name} at TP={workload.tp_degree} does not fit the GPU's memory "
                            f"with workload {workload.name}: {what} exceed it ({need.describe(memory_bytes)})")
    return need


def memory_need(model: ModelSpec, workload: Workload) -> MemoryNeed:
    """One GPU's weights (tensor parallel: its shard; the embedding and LM head split over the GPUs)
    and the batch's KV cache (Workload.num_kv_tokens of K and V in each layer, its KV heads)."""
    shard = tp_shard(model, workload.tp_degree)
    b = workload.dtype_bytes
    kv_per_layer = workload.num_kv_tokens * 2 * shard.kv_size * b
    return MemoryNeed(num_weights(model, workload.tp_degree) * b, kv_per_layer, model.num_layers)


def layer_gemm_weights(model: ModelSpec, tp_degree: int = 1) -> tuple[int, int]:
    """(elements, output channels) of one layer's four GEMMs (QKV, O, gate|up, down; every expert's) in
    one GPU's shard."""
    shard = tp_shard(model, tp_degree)
    h, i, q, kv = model.hidden_size, shard.intermediate_size, shard.q_size, shard.kv_size
    experts = model.num_experts if model.is_moe else 1
    return h * (q + 2 * kv) + q * h + experts * 3 * h * i, q + 2 * kv + h + experts * (2 * i + h)


def num_weights(model: ModelSpec, tp_degree: int = 1, is_tied: bool = False) -> int:
    """Parameters one GPU holds: its shard of every layer (GEMMs, QKV bias, router, the two norms),
    the final norm, and the embedding and LM head (one matrix when tied) split over the GPUs."""
    shard = tp_shard(model, tp_degree)
    h = model.hidden_size
    gemms, _ = layer_gemm_weights(model, tp_degree)
    bias = shard.q_size + 2 * shard.kv_size if model.has_qkv_bias else 0
    router = h * model.num_experts if model.is_moe else 0
    per_layer = gemms + bias + router + 2 * h                        # (+ the two norms' weights)
    vocab = (1 if is_tied else 2) * model.vocab_size * h // tp_degree
    return per_layer * model.num_layers + vocab + h


def domain_range(op: Op, workload: Workload) -> tuple[int, int]:
    """The token range [start, end) of the dense batch this op works on."""
    if op.domain == "decode":
        return (0, workload.num_decode)
    if op.domain == "prefill":
        return (workload.num_decode, workload.num_tokens)
    return (0, workload.num_tokens)


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
    """The layer's op graph; graph.graph holds the model and workload it is of (the cost model
    prices work outside a profile's grid from them)."""
    ops = layer_ops(model, workload)
    graph = nx.DiGraph(model=model, workload=workload)
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
