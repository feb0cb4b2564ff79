"""The baselines every run measures beside the plan, in the same process (../shared/WORKLOADS.md):

* seq-torch: the fastest straightforward torch a user would write: the whole layer stack as one
  function on one stream, bf16 throughout, ``F.rms_norm``, cuBLAS GEMMs with fused QKV and
  gate/up weights (residual adds fused into the O and D GEMMs as ``addmm``), RoPE and the KV-cache
  append in bf16, SDPA attention (decode: one query per request over its cache, the query heads of
  a KV head as its query rows; prefill: one causal SDPA per prompt, which torch sends to its
  flash/cuDNN kernels), captured as one CUDA graph (``torch_forward``).
* seq-same: the plan's op set, whole ops at the full GPU, one stream, no nano-batching, one CUDA
  graph, each op with the FASTEST impl the profile has for it at the full GPU (``fastest_impls``),
  so the plan's overlap is measured against the best kernels, not against its partition impls.
* seq-compiled: ``torch_forward`` through ``torch.compile`` (no compiler CUDA graphs: the executor
  captures it as the others), where it compiles.
"""

from __future__ import annotations

from nfsearch.runtime.launch import LaunchList, sequential_launches

EPS = 1e-5


def fastest_impls(schedule, num_sms: int, profile=None) -> tuple[dict[str, str], list[str]]:
    """Each op's fastest impl at `num_sms` SMs for the plan's whole-batch sizes, by the profile
    (the plan's own when None and the bundled one matches it), and notes on where it came from.
    An op the profile cannot answer, or answers with an impl the runtime lacks (an analytic
    profile), keeps the plan's impl (noted)."""
    from nfsearch.cost import default_profile
    from nfsearch.graph import build_layer, domain_range, op_context
    from nfsearch.profile import ProfileMiss
    from nfsearch.runtime.kernels import IMPLS

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
    from collections import Counter
    counts: dict[str, Counter] = {}
    for o in schedule.nano_ops:
        counts.setdefault(o.op, Counter())[o.impl] += 1
    return {op: c.most_common(1)[0][0] for op, c in counts.items()}


def plan_impls(launches: LaunchList) -> dict[str, str]:
    """Each op's impl in a launch list (the most used one where launches differ)."""
    from collections import Counter
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
    variant does). Straightforward bf16 torch; see the module docstring."""
    import torch
    import torch.nn.functional as F

    m = model
    H, hq, hkv, d = m.model.hidden_size, m.hq, m.hkv, m.d
    G, R, ctx, half = hq // hkv, m.num_decode, m.context, m.d // 2
    prompts = [(s, e) for s, e in m.prompts if e > s]
    cos, sin = m.cos.to(m.dtype), m.sin.to(m.dtype)
    pos = m.positions.long()

    def layer(x, w, cache, c, s):
        T = x.shape[0]
        h = F.rms_norm(x, (H,), w.norm1, EPS)
        qkv = h @ w.wqkv if w.bqkv is None else torch.addmm(w.bqkv, h, w.wqkv)
        qkv = qkv.view(T, hq + 2 * hkv, d)
        qk, v = qkv[:, :hq + hkv], qkv[:, hq + hkv:]
        x1, x2 = qk[..., :half], qk[..., half:]
        qk = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)          # RoPE, q and k heads at once
        q, k = qk[:, :hq], qk[:, hq:]
        parts = []
        if R:
            kc, vc = cache
            kc[:, ctx - 1] = k[:R]
            vc[:, ctx - 1] = v[:R]
            o = F.scaled_dot_product_attention(q[:R].view(R, hkv, G, d), kc.transpose(1, 2), vc.transpose(1, 2))
            parts.append(o.reshape(R, hq * d))
        for s0, s1 in prompts:
            o = F.scaled_dot_product_attention(q[s0:s1].transpose(0, 1)[None], k[s0:s1].transpose(0, 1)[None],
                                               v[s0:s1].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
            parts.append(o[0].transpose(0, 1).reshape(s1 - s0, hq * d))
        attn = torch.cat(parts) if len(parts) > 1 else parts[0]
        mid = torch.addmm(x, attn, w.wo)
        h2 = F.rms_norm(mid, (H,), w.norm2, EPS)
        ug = h2 @ w.wug
        i = ug.shape[1] // 2
        act = F.silu(ug[:, :i]) * ug[:, i:]
        return torch.addmm(mid, act, w.wd)

    def forward(x):
        c = cos[pos][:, None, :]
        s = sin[pos][:, None, :]
        for w, cache in zip(m.layers, m.kv_cache):
            x = layer(x, w, cache, c, s)
        return x

    return forward
