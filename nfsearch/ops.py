"""The operations of one decoder layer: their class, token domain, and the work they do.

Work (FLOPs, bytes moved, bytes sent over the network) is per GPU under tensor parallelism and is
what the analytic profile and the roofline analysis are computed from.
"""

from dataclasses import dataclass

from nfsearch.specs import ModelSpec, Workload

OP_CLASSES = ("compute", "memory", "network", "other")
DOMAINS = ("all", "decode", "prefill")


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
    """The layer's ops in data-flow order (each feeds the next; both attentions feed O)."""
    tp = workload.tp_degree
    q, kv, hidden = _shard(model.q_size, tp), _shard(model.kv_size, tp), model.hidden_size
    inter = _shard(model.intermediate_size, tp)
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
    q, kv = _shard(model.q_size, tp), _shard(model.kv_size, tp)
    heads = max(1, model.num_heads // tp)
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
        inter = op_inter(model, tp)
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


def op_inter(model: ModelSpec, tp: int) -> int:
    return _shard(model.intermediate_size, tp)


def op_context(op: Op, workload: Workload) -> int:
    """The context a profile row for this op is keyed by (0 for ops without one)."""
    if op.name == "decode_attn":
        return workload.decode_context
    if op.name == "prefill_attn":
        return round(workload.num_prefill_tokens / len(workload.prefill_lengths))
    return 0


def domain_range(op: Op, workload: Workload) -> tuple[int, int]:
    """The token range [start, end) of the dense batch this op works on."""
    if op.domain == "decode":
        return (0, workload.num_decode)
    if op.domain == "prefill":
        return (workload.num_decode, workload.num_tokens)
    return (0, workload.num_tokens)


def _shard(size: int, tp: int) -> int:
    return max(1, size // tp)
