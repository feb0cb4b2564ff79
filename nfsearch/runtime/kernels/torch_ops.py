"""The "torch" impl of every op: the layer as a straightforward, fast torch user writes it.

bf16 throughout (the inputs' dtype): ``F.rms_norm`` (the residual add done once, into
``residual_out`` when given), cuBLAS through ``torch.matmul`` / ``torch.addmm`` (bias or residual
fused into the GEMM), RoPE and the KV-cache append in the tensors' dtype by indexing, SDPA attention
(decode: the query heads of a KV head as its query rows, so no K/V is repeated; prefill: one causal
SDPA per run of consecutive equal-length prompts, with ``enable_gqa`` where torch has it).

These are the only torch versions of the ops. Each is ``IMPLS[op]["torch"]``, the seq-torch
baseline (``runtime.baselines.torch_forward``) is built from them, the executor's correctness check
runs them as the sequential reference, and the GPU tests compare every other impl with them (run on
float32 copies of the inputs where the test needs more precision than bf16: they are dtype-generic).

Each writes ``out`` when given one and returns its result (a new tensor when ``out`` is None);
``num_sms`` is ignored (the full GPU, or the partition of the stream they are launched on). None
synchronizes the host, so all can be captured in a CUDA graph, except ``prefill_attention_torch``
given its offsets as a GPU tensor (pass them on the host or as a list).
"""

from __future__ import annotations

from itertools import pairwise

from ._common import torch

if torch is not None:
    import torch.nn.functional as F

    # SDPA's enable_gqa (torch >= 2.5) attends Hq query heads to Hkv K/V heads without repeating K/V
    HAVE_SDPA_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)
else:  # pragma: no cover - the package imports without torch; calling these needs it
    F = None
    HAVE_SDPA_GQA = False


def _emit(result, out):
    if out is None:
        return result
    out.copy_(result)
    return out


def rmsnorm_torch(x, weight, out=None, num_sms: int = 0, eps: float = 1e-5, residual=None, residual_out=None):
    """out = rms_norm(h) * weight with h = x (+ residual); ``residual_out`` (may alias ``residual``) gets h."""
    h = x
    if residual is not None:
        h = x + residual if residual_out is None else torch.add(x, residual, out=residual_out)
    return _emit(F.rms_norm(h, (h.shape[-1],), weight, eps), out)


def gemm_torch(a, w, out=None, num_sms: int = 0, residual=None):
    """out = a @ w (+ residual, a [M, N] tensor or an [N] bias), one cuBLAS call."""
    if residual is None:
        return torch.matmul(a, w, out=out)
    return torch.addmm(residual, a, w, out=out)


def silu_and_mul_torch(x, out=None, num_sms: int = 0):
    """out[T, I] = silu(x[:, :I]) * x[:, I:] for x[T, 2I]."""
    i = x.shape[-1] // 2
    return torch.mul(F.silu(x[..., :i]), x[..., i:], out=out)


def rope_cos_sin(max_pos: int, head_dim: int, theta: float = 500000.0, device=None):
    """cos, sin tables [max_pos, head_dim // 2] (float32, computed in float64), rotate-half convention."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    ang = torch.arange(max_pos, device=device, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def rope_append_torch(qkv, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping, num_sms: int = 0,
                      k_out=None, v_out=None):
    """Split qkv[T, (Hq+2Hkv)*D] into heads, rotate q and k at ``positions`` (one pass over both, in
    qkv's dtype), write q_out[T, Hq, D] and, when given, k_out/v_out[T, Hkv, D]; a token with
    ``slot_mapping[t] >= 0`` appends its k/v to k_cache/v_cache[slot, positions[t]]. Returns ``q_out``.

    ``slot_mapping`` None appends nothing (the caches are not touched). The append has no host sync:
    tokens that append nothing repeat the first appending token's write (the same value to the same
    entry); when no token appends, they rewrite cache entry [0, 0] with its own value, so pass None
    there if another stream may write that entry meanwhile."""
    T = qkv.shape[0]
    HQ, D = q_out.shape[1], q_out.shape[2]
    HKV = (qkv.shape[1] // D - HQ) // 2
    x = qkv.view(T, HQ + 2 * HKV, D)
    pos = positions.long()
    c = cos[pos].to(qkv.dtype)[:, None, :]
    s = sin[pos].to(qkv.dtype)[:, None, :]
    if k_out is None and slot_mapping is not None:
        k_out = torch.empty((T, HKV, D), device=qkv.device, dtype=qkv.dtype)
    # each rotated half written straight into its output (no concatenation, no copies of q or k)
    for dst, lo, hi in ((q_out, 0, HQ), (k_out, HQ, HQ + HKV)):
        if dst is None:
            continue
        x1, x2 = x[:, lo:hi, :D // 2], x[:, lo:hi, D // 2:]
        torch.addcmul(torch.mul(x1, c), x2, s, value=-1, out=dst[..., :D // 2])
        torch.addcmul(torch.mul(x2, c), x1, s, out=dst[..., D // 2:])
    k, v = k_out, x[:, HQ + HKV:]
    if v_out is not None:
        v_out.copy_(v)
    if slot_mapping is not None:
        _append_kv(k_cache, v_cache, k, v, pos, slot_mapping)
    return q_out


def rope_tables(cos, sin, positions, dtype):
    """cos, sin [T, 1, D/2] at ``positions`` in ``dtype``: taken once per batch, since every layer
    rotates at the same positions."""
    pos = positions.long()
    return cos[pos].to(dtype)[:, None, :], sin[pos].to(dtype)[:, None, :]


def rope_qkv_torch(qkv, cos_t, sin_t, num_q_heads: int, head_dim: int):
    """RoPE of qkv[T, (Hq+2Hkv)*D] at the tables of ``rope_tables``, the straightforward way: returns
    q[T, Hq, D] and k[T, Hkv, D] as views of one new rotated tensor (each half written in place by
    two elementwise kernels, no concatenation, no copies) and v[T, Hkv, D] as a view of qkv."""
    T, D, HQ = qkv.shape[0], head_dim, num_q_heads
    HKV = (qkv.shape[1] // D - HQ) // 2
    x = qkv.view(T, HQ + 2 * HKV, D)
    x1, x2 = x[:, :HQ + HKV, :D // 2], x[:, :HQ + HKV, D // 2:]
    rot = torch.empty((T, HQ + HKV, D), device=qkv.device, dtype=qkv.dtype)
    torch.addcmul(torch.mul(x1, cos_t), x2, sin_t, value=-1, out=rot[..., :D // 2])
    torch.addcmul(torch.mul(x2, cos_t), x1, sin_t, out=rot[..., D // 2:])
    return rot[:, :HQ], rot[:, HQ:], x[:, HQ + HKV:]


def append_kv_torch(k_cache, v_cache, k, v, slots, pos):
    """k/v[N, Hkv, D] of the appending tokens into cache[slots, pos] (long index tensors of N entries:
    two index_put kernels, no host sync)."""
    k_cache[slots, pos] = k
    v_cache[slots, pos] = v


def _append_kv(k_cache, v_cache, k, v, pos, slot_mapping):
    """k/v of tokens with a slot >= 0 into cache[slot, pos], with shapes fixed on the host (a boolean
    selection would need the count of appending tokens, a host sync): every token writes, those that
    append nothing as a copy of the first token that does."""
    valid = slot_mapping >= 0
    first = valid.to(torch.int32).argmax()         # the first appending token (0 when none appends)
    src = torch.where(valid, torch.arange(valid.shape[0], device=valid.device), first)
    appends = valid[src]                           # all True when some token appends, else all False
    slots = slot_mapping[src].long().clamp_min(0)
    at = torch.where(appends, pos[src], 0)
    for cache, new in ((k_cache, k), (v_cache, v)):
        cache[slots, at] = torch.where(appends[:, None, None], new[src].to(cache.dtype), cache[slots, at])


def _sdpa(q, k, v, **kw):
    """SDPA of q[..., Hq, L, D] over k/v[..., Hkv, S, D] with Hq a multiple of Hkv."""
    group = q.shape[-3] // k.shape[-3]
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    if HAVE_SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, -3), v.repeat_interleave(group, -3), **kw)


def decode_attention_torch(q, k_cache, v_cache, context_lens, out=None, num_sms: int = 0, scale=None):
    """One query per request over its cache: q[R, Hq, D], k_cache/v_cache[R, C, Hkv, D].

    ``context_lens[R]`` masks each request's cache past its context (SDPA then leaves its fastest
    kernels); None means every request attends to its whole cache, no mask."""
    R, HQ, D = q.shape
    C, HKV = k_cache.shape[1], k_cache.shape[2]
    mask = None
    if context_lens is not None:
        mask = (torch.arange(C, device=q.device)[None, :] < context_lens[:, None].long())[:, None, None, :]
    o = F.scaled_dot_product_attention(q.reshape(R, HKV, HQ // HKV, D), k_cache.transpose(1, 2),
                                       v_cache.transpose(1, 2), attn_mask=mask, scale=scale)
    if out is None:
        return o.reshape(R, HQ, D)
    out.view(R, HKV, HQ // HKV, D).copy_(o)         # one copy (a reshape first would copy twice)
    return out


def prefill_attention_torch(q, k, v, cu_seqlens, out=None, num_sms: int = 0, scale=None):
    """Causal attention of each packed prompt with itself, one SDPA per prompt: q[T, Hq, D],
    k/v[T, Hkv, D], prompt p is rows cu_seqlens[p]:cu_seqlens[p+1]. ``cu_seqlens`` is a list of ints
    or a tensor (on the GPU reading it syncs the host). Rows outside every prompt are not written."""
    cu = [int(c) for c in (cu_seqlens.tolist() if hasattr(cu_seqlens, "tolist") else cu_seqlens)]
    if out is None:
        out = torch.empty_like(q)
    HQ, HKV, D = q.shape[1], k.shape[1], q.shape[2]
    for a, n, length in equal_length_runs(cu):
        b = a + n * length                    # one causal SDPA for n prompts of this length
        o = _sdpa(q[a:b].reshape(n, length, HQ, D).transpose(1, 2), k[a:b].reshape(n, length, HKV, D).transpose(1, 2),
                  v[a:b].reshape(n, length, HKV, D).transpose(1, 2), is_causal=True, scale=scale)
        out[a:b].view(n, length, HQ, D).copy_(o.transpose(1, 2))
    return out


def equal_length_runs(cu) -> list[tuple[int, int, int]]:
    """(first row, number of prompts, length) of each run of consecutive equal-length prompts of the
    offsets ``cu`` (host ints); empty prompts are skipped."""
    runs: list[list[int]] = []
    for s0, s1 in pairwise(cu):
        if s1 <= s0:
            continue
        if runs and runs[-1][2] == s1 - s0 and runs[-1][0] + runs[-1][1] * runs[-1][2] == s0:
            runs[-1][1] += 1
        else:
            runs.append([s0, 1, s1 - s0])
    return [tuple(r) for r in runs]
