"""Decode attention (GQA, one new token per request) with K/V tiles streamed in by TMA.

Same contract and layout as ``decode_attention`` (``q[R,Hq,D]``, ``k_cache/v_cache[R,T,Hkv,D]``,
``context_lens[R]``, ``out[R,Hq,D]``); the cache must be contiguous, so it can be viewed as a 2-D
tensor ``[R*T, Hkv*D]`` whose ``[BN, D]`` boxes are one kv head's keys of BN consecutive tokens.

Why TMA: a decode kernel on few SMs is limited by the bytes each SM keeps in flight. Pointer loads
hold them in registers (a few KB per warp); the bulk tensor copies land in shared memory, so with
``STAGES`` buffers of ``2 * BN * D * 2`` bytes per CTA and several CTAs per SM, 100+ KB per SM are
in flight with four warps doing the math.

Work items are (request, kv head, split) on a persistent grid of ``num_sms * programs_per_sm``
programs. The full BN-token blocks of a split go through TMA; the last partial block (context not a
multiple of BN) through masked pointer loads, so rows past the context (other requests' tokens, or
unwritten memory) are never read into the result. Several splits are reduced by the reduction kernel
of ``decode_attention``.
"""

from __future__ import annotations

import math

from ._common import HAVE_TRITON, next_pow2, programs, require_triton, tl, torch, triton
from .decode_attention import choose_splits, decode_attention

try:  # pragma: no cover - depends on the triton version
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAVE_TMA = HAVE_TRITON
except Exception:  # noqa: BLE001
    TensorDescriptor = None
    HAVE_TMA = False

BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3
PROGRAMS_PER_SM = 3  # (64, 4 warps, 3 stages, 3/SM) is the fastest at 48 SMs of an H100: 2.96-3.00 TB/s
LOG2E = 1.4426950408889634

if HAVE_TRITON:
    from .decode_attention import _decode_reduce_kernel, softmax_step, store_item

    @triton.jit
    def _decode_tma_kernel(q_ptr, k_desc, v_desc, k_ptr, v_ptr, lens_ptr, out_ptr, opart_ptr, lse_ptr,
                           s_qr, s_qh, s_or, s_oh, T, R, HKV, NSPLIT, SPLIT_LEN, qk_scale, NP,
                           G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                           DIRECT: tl.constexpr, STAGES: tl.constexpr):
        pid = tl.program_id(0)
        n_items = R * HKV * NSPLIT
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BN)
        gmask = offs_g < G
        row_len = HKV * D
        for item in range(pid, n_items, NP):
            s = item % NSPLIT
            rh = item // NSPLIT
            h = rh % HKV
            r = rh // HKV
            L = tl.load(lens_ptr + r)
            start = s * SPLIT_LEN
            end = tl.minimum(start + SPLIT_LEN, L)
            nfull = tl.maximum(end - start, 0) // BN
            qh = h * G + offs_g
            qt = tl.load(q_ptr + r * s_qr + qh[:, None] * s_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
            m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([GP], dtype=tl.float32)
            acc = tl.zeros([GP, D], dtype=tl.float32)
            row0 = r * T + start
            col = h * D
            for j in tl.range(0, nfull, num_stages=STAGES):
                kt = k_desc.load([row0 + j * BN, col])
                vt = v_desc.load([row0 + j * BN, col])
                sc = tl.dot(qt, tl.trans(kt)) * qk_scale
                m_i, l_i, acc = softmax_step(sc, vt, m_i, l_i, acc)
            t0 = start + nfull * BN
            if t0 < end:  # partial last block: masked pointer loads, nothing past the context is read
                tok = t0 + offs_n
                tmask = tok < end
                base = (r.to(tl.int64) * T + tok)[:, None] * row_len + col + offs_d[None, :]
                kt = tl.load(k_ptr + base, mask=tmask[:, None], other=0.0)
                vt = tl.load(v_ptr + base, mask=tmask[:, None], other=0.0)
                sc = tl.dot(qt, tl.trans(kt)) * qk_scale
                sc = tl.where(tmask[None, :], sc, float("-inf"))
                m_i, l_i, acc = softmax_step(sc, vt, m_i, l_i, acc)
            store_item(acc, l_i, m_i, out_ptr, opart_ptr, lse_ptr, r, qh, s, s_or, s_oh, HKV, NSPLIT, offs_d,
                       gmask, G, D, DIRECT)


def tma_ok(q, k_cache, v_cache, out) -> bool:
    R, T, HKV, D = k_cache.shape
    for c in (k_cache, v_cache):
        if not c.is_contiguous() or c.data_ptr() % 16:
            return False
    return q.stride(2) == 1 and out.stride(2) == 1 and (HKV * D * c.element_size()) % 16 == 0


def decode_attention_tma(q, k_cache, v_cache, context_lens, out, num_sms: int, scale=None, max_context=None,
                         block_n=None, num_warps=None, num_stages=None, programs_per_sm=None):
    """Decode attention over the first context_lens[r] cached tokens (GQA), K/V through TMA.
    Falls back to ``decode_attention`` for caches TMA cannot take. Returns ``out``."""
    require_triton("decode_attention_tma")
    if not HAVE_TMA or not tma_ok(q, k_cache, v_cache, out):
        return decode_attention(q, k_cache, v_cache, context_lens, out, num_sms, scale=scale, max_context=max_context)
    R, HQ, D = q.shape
    _, T, HKV, D2 = k_cache.shape
    assert D == D2 and HQ % HKV == 0 and tuple(out.shape) == (R, HQ, D)
    G = HQ // HKV
    bn = block_n or BLOCK_N
    warps = num_warps or NUM_WARPS
    stages = num_stages or NUM_STAGES
    pps = programs_per_sm or PROGRAMS_PER_SM
    scale = (1.0 / math.sqrt(D)) if scale is None else scale
    mc = min(T, int(max_context)) if max_context else T
    nsplit, split_len = choose_splits(R, HKV, mc, num_sms * pps, bn)
    direct = nsplit == 1
    if direct:
        opart = lse = out  # unused
    else:
        opart = torch.empty((R, HQ, nsplit, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((R, HQ, nsplit), device=q.device, dtype=torch.float32)
    k2 = k_cache.view(R * T, HKV * D)
    v2 = v_cache.view(R * T, HKV * D)
    k_d = TensorDescriptor.from_tensor(k2, [bn, D])
    v_d = TensorDescriptor.from_tensor(v2, [bn, D])
    grid = programs(num_sms, pps, R * HKV * nsplit)
    _decode_tma_kernel[(grid,)](q, k_d, v_d, k2, v2, context_lens, out, opart, lse,
                                q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                                T, R, HKV, nsplit, split_len, scale * LOG2E, grid,
                                G=G, GP=max(16, next_pow2(G)), D=D, BN=bn, DIRECT=direct, STAGES=stages,
                                num_warps=warps, num_stages=stages)
    if not direct:
        rows = R * HQ
        g2 = programs(num_sms, 8, rows)
        _decode_reduce_kernel[(g2,)](opart, lse, out, out.stride(0), out.stride(1), HQ, rows, nsplit, g2,
                                     SP=max(2, next_pow2(nsplit)), D=D, num_warps=4)
    return out
