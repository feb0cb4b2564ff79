"""The baselines every run measures beside the plan, in the same process (docs/workloads.md):

* seq-torch: the fastest straightforward torch a user would write: the whole layer stack as one
  function on one stream, built from the ops' torch impls (kernels/torch_ops.py): bf16 throughout,
  ``F.rms_norm``, cuBLAS GEMMs with fused QKV and gate/up weights (residual adds fused into the O
  and D GEMMs as ``addmm``), RoPE (tables gathered once per forward; q and k rotated into one tensor
  used through views, v a view of the QKV output) and the KV-cache append of the decode rows (two
  ``index_put``) in bf16, SDPA attention (decode: one query per request over its whole cache, the
  query heads of a KV head as its query rows, no mask; prefill: one causal SDPA per run of
  consecutive equal-length prompts, which torch sends to its flash/cuDNN kernels), each attention
  output written once into the O GEMM's input, captured as one CUDA graph (``torch_forward``).
* seq-same: the plan's op set, whole ops at the full GPU, one stream, no nano-batching, one CUDA
  graph, each op with the FASTEST impl the profile has for it at the full GPU (``fastest_impls``),
  so the plan's overlap is measured against the best kernels, not against its partition impls.
* seq-compiled: ``torch_forward`` through ``torch.compile`` (no compiler CUDA graphs: the executor
  captures it as the others), where it compiles.
"""

from __future__ import annotations

from collections import Counter

from nfsearch.cost import default_profile
from nfsearch.graph import build_layer, domain_range, op_context
from nfsearch.profile import ProfileMiss
from nfsearch.runtime.launch import LaunchList, sequential_launches

EPS = 1e-5


def fastest_impls(schedule, num_sms: int, profile=None) -> tuple[dict[str, str], list[str]]:
    """Each op's fastest impl at `num_sms` SMs for the plan's whole-batch sizes, by the profile
    (the plan's own when None and the bundled one matches it), and notes on where it came from.
    An op the profile cannot answer, or answers with an impl the runtime lacks (an analytic
    profile), keeps the plan's impl (noted)."""
    from nfsearch.runtime.kernels import IMPLS  # imports torch

    notes = []
    if profile is None:
        profile = default_profile(schedule.model, schedule.workload)
        if profile.fingerprint() != schedule.profile.fingerprint:
            notes.append(f"seq-same impls from the bundled {profile.label} ({profile.fingerprint()}), not the "
                         f"plan's profile ({schedule.profile.fingerprint}): pass the plan's profile")
    planned = plan_impls_of(schedule)
    layer = build_layer(schedule.model, schedule.workload)
    out, kept = {}, []
    for name in layer.nodes:
        op = layer.nodes[name]["op"]
        lo, hi = domain_range(op, schedule.workload)
        try:
            _ms, impl = profile.time_ms(name, hi - lo, num_sms, op_context(op, schedule.workload),
                                        allow_extrapolation=False)
        except ProfileMiss:
            impl = None
        if impl is None or impl not in IMPLS[name]:
            impl = planned.get(name, "torch")
            kept.append(name)
        out[name] = impl
    if kept:
        notes.append(f"seq-same: the profile names no runtime impl at {num_sms} SMs for {', '.join(kept)}; "
                     "the plan's impl is used there")
    return out, notes


def plan_impls_of(schedule) -> dict[str, str]:
    """Each op's impl in the plan (the most used one where nano-ops differ)."""
    counts: dict[str, Counter] = {}
    for o in schedule.nano_ops:
        counts.setdefault(o.op, Counter())[o.impl] += 1
    return {op: c.most_common(1)[0][0] for op, c in counts.items()}


def plan_impls(launches: LaunchList) -> dict[str, str]:
    """Each op's impl in a launch list (the most used one where launches differ)."""
    counts: dict[str, Counter] = {}
    for l in launches.launches:
        counts.setdefault(l.op, Counter())[l.impl] += 1
    return {op: c.most_common(1)[0][0] for op, c in counts.items()}


def seq_same(schedule, num_sms: int, impls: dict[str, str], num_layers: int | None = None) -> LaunchList:
    return sequential_launches(schedule.model, schedule.workload, num_layers or schedule.num_layers, num_sms,
                               impls, stream="seq-same")


def torch_forward(model):
    """The seq-torch layer stack of a ModelInstance as a function of the input hidden states:
    ``forward(x) -> out`` over all its layers (writes the new tokens' K/V into the caches, as every
    variant does), written the way a careful torch user writes it (see the module docstring): the
    RoPE tables gathered once per forward, q/k rotated into one tensor and used as views (v a view
    of the QKV output), only the decode rows appended to the cache, every run of equal-length
    prompts in one causal SDPA, attention written once into the O GEMM's input. The GEMMs, norms
    and activation are the ops' torch impls (kernels/torch_ops.py)."""
    import torch

    from nfsearch.runtime.kernels import torch_ops as ops

    m = model
    T, R, hq, hkv, d = m.num_tokens, m.num_decode, m.hq, m.hkv, m.d
    group = hq // hkv
    cu = [0] + [e - R for _s, e in m.prompts]     # prompt offsets within the prompt rows, on the host
    slots = m.slot_mapping[:R].long() if R else None
    decode_pos = m.positions[:R].long() if R else None

    def layer(x, w, kc, vc, cos_t, sin_t):
        h = ops.rmsnorm_torch(x, w.norm1, eps=EPS)
        qkv = ops.gemm_torch(h, w.wqkv, residual=w.bqkv)
        q, k, v = ops.rope_qkv_torch(qkv, cos_t, sin_t, hq, d)       # views: [T, Hq, D], [T, Hkv, D] x2
        attn = torch.empty((T, hq, d), device=x.device, dtype=x.dtype)
        if R:
            ops.append_kv_torch(kc, vc, k[:R], v[:R], slots, decode_pos)
            # one query per request, the query heads of a KV head as its query rows: no mask, no K/V repeat
            o = torch.nn.functional.scaled_dot_product_attention(
                q[:R].view(R, hkv, group, d), kc.transpose(1, 2), vc.transpose(1, 2))
            attn[:R].view(R, hkv, group, d).copy_(o)
        if T > R:
            ops.prefill_attention_torch(q[R:], k[R:], v[R:], cu, attn[R:])     # one SDPA per equal-length run
        mid = ops.gemm_torch(attn.view(T, hq * d), w.wo, residual=x)
        ug = ops.gemm_torch(ops.rmsnorm_torch(mid, w.norm2, eps=EPS), w.wug)
        return ops.gemm_torch(ops.silu_and_mul_torch(ug), w.wd, residual=mid)

    def forward(x):
        cos_t, sin_t = ops.rope_tables(m.cos, m.sin, m.positions, x.dtype)
        for w, (kc, vc) in zip(m.layers, m.kv_cache):
            x = layer(x, w, kc, vc, cos_t, sin_t)
        return x

    return forward
