"""Plain-torch reference implementations of the layer's ops (float32 math, results cast to the
output dtype). Used by the GPU tests, the executor's correctness check and the seq-torch baseline.
Every function returns its result (and writes ``out`` when given one)."""

from __future__ import annotations

import math


def _torch():
    import torch

    return torch


def _emit(res, out):
    if out is not None:
        out.copy_(res)
        return out
    return res


def rmsnorm_ref(x, weight, out=None, eps: float = 1e-5, residual=None, residual_out=None):
    """out = (h / rms(h)) * weight with h = x (+ residual); residual_out gets h when given."""
    h = x.float()
    if residual is not None:
        h = h + residual.float()
    if residual_out is not None:
        residual_out.copy_(h)
    y = h * _torch().rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return _emit(y.to(x.dtype), out)


def gemm_ref(a, w, out=None, residual=None):
    y = a.float() @ w.float()
    if residual is not None:
        y = y + residual.float()
    return _emit(y.to(a.dtype), out)


def silu_and_mul_ref(x, out=None):
    i = x.shape[-1] // 2
    xf = x.float()
    y = _torch().nn.functional.silu(xf[..., :i]) * xf[..., i:]
    return _emit(y.to(x.dtype), out)


def rope_cos_sin(max_pos: int, head_dim: int, theta: float = 500000.0, device=None):
    """cos, sin tables [max_pos, head_dim // 2] (float32), LLaMA rotate-half convention."""
    torch = _torch()
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    ang = torch.arange(max_pos, device=device, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return _torch().cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_append_ref(qkv, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping, k_out=None, v_out=None):
    """Split qkv[T, (Hq+2Hkv)*D] into q/k/v heads, rotate q and k at ``positions``, write q_out[T,Hq,D];
    for tokens with slot_mapping[t] >= 0 write k/v into k_cache/v_cache[slot, positions[t]];
    k_out/v_out[T,Hkv,D] (optional) get every token's rotated k and v."""
    T = qkv.shape[0]
    HQ, D = q_out.shape[1], q_out.shape[2]
    HKV = k_cache.shape[2]
    x = qkv.float().view(T, HQ + 2 * HKV, D)
    pos = positions.long()
    c = cos[pos].float()[:, None, :]
    s = sin[pos].float()[:, None, :]
    q = _rotate(x[:, :HQ], c, s)
    k = _rotate(x[:, HQ:HQ + HKV], c, s)
    v = x[:, HQ + HKV:]
    q_out.copy_(q)
    if k_out is not None:
        k_out.copy_(k)
    if v_out is not None:
        v_out.copy_(v)
    sel = (slot_mapping >= 0).nonzero().flatten()
    if sel.numel():
        slots = slot_mapping[sel].long()
        k_cache[slots, pos[sel]] = k[sel].to(k_cache.dtype)
        v_cache[slots, pos[sel]] = v[sel].to(v_cache.dtype)
    return q_out


def decode_attention_ref(q, k_cache, v_cache, context_lens, out=None, scale=None):
    torch = _torch()
    R, HQ, D = q.shape
    _, T, HKV, _ = k_cache.shape
    G = HQ // HKV
    scale = (1.0 / math.sqrt(D)) if scale is None else scale
    qq = q.float().view(R, HKV, G, D)
    kk = k_cache.float().transpose(1, 2)  # [R, HKV, T, D]
    vv = v_cache.float().transpose(1, 2)
    sc = torch.matmul(qq, kk.transpose(-1, -2)) * scale  # [R, HKV, G, T]
    mask = torch.arange(T, device=q.device)[None, :] < context_lens[:, None].long()
    sc = sc.masked_fill(~mask[:, None, None, :], float("-inf"))
    y = torch.matmul(sc.softmax(-1), vv).reshape(R, HQ, D)
    return _emit(y.to(q.dtype), out)


def prefill_attention_ref(q, k, v, cu_seqlens, out=None, scale=None):
    """Causal attention of each packed prompt with itself; q[T,Hq,D], k/v[T,Hkv,D]."""
    torch = _torch()
    HQ, D = q.shape[1], q.shape[2]
    HKV = k.shape[1]
    G = HQ // HKV
    scale = (1.0 / math.sqrt(D)) if scale is None else scale
    res = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    cu = [int(c) for c in cu_seqlens.tolist()]
    for s0, s1 in zip(cu[:-1], cu[1:]):
        if s1 <= s0:
            continue
        L = s1 - s0
        qq = q[s0:s1].float().transpose(0, 1)  # [HQ, L, D]
        kk = k[s0:s1].float().transpose(0, 1).repeat_interleave(G, 0)
        vv = v[s0:s1].float().transpose(0, 1).repeat_interleave(G, 0)
        sc = torch.matmul(qq, kk.transpose(-1, -2)) * scale
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        sc = sc.masked_fill(~causal, float("-inf"))
        res[s0:s1] = torch.matmul(sc.softmax(-1), vv).transpose(0, 1)
    return _emit(res.to(q.dtype), out)
