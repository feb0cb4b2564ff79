"""SM-bounded decode attention (one new token per request) with GQA over a KV cache.

Layout: ``q[R, Hq, D]``, ``k_cache/v_cache[R, max_context, Hkv, D]``, ``context_lens[R]`` (int32,
number of valid cached tokens, the new token's k/v already appended), ``out[R, Hq, D]``.

Split-KV flash decoding on a persistent grid: a work item is (request, kv head, split); one program
computes all ``Hq / Hkv`` query heads of the kv head, so each K/V byte is read once. With one split
the program writes the normalized output directly; with several, it writes fp32 partials + log-sum-exp
and a second SM-bounded kernel reduces them. The grid is ``num_sms * programs_per_sm`` programs:
several CTAs per SM and pipelined loads keep many bytes in flight on few SMs.
"""

from __future__ import annotations

import math

from ._common import HAVE_TRITON, next_pow2, programs, require_triton, tl, torch, triton

# Defaults; `benchmarks/kernel_bench.py --sweep` sweeps these (see docs/kernels.md).
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3
PROGRAMS_PER_SM = 3  # (64, 4 warps, 3 stages, 3/SM) is the fastest at 48 SMs of an H100
LOG2E = 1.4426950408889634

if HAVE_TRITON:

    @triton.jit
    def softmax_step(sc, vt, m_i, l_i, acc):
        """One online-softmax step: scores `sc` [GP, BN] (log2 units, masked by the caller) of a
        block whose values are `vt` [BN, D]; returns the running (max, sum, accumulator)."""
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        p = tl.exp2(sc - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        return m_new, l_i, acc

    @triton.jit
    def store_item(acc, l_i, m_i, out_ptr, opart_ptr, lse_ptr, r, qh, s, s_or, s_oh, HKV, NSPLIT, offs_d, gmask,
                   G: tl.constexpr, D: tl.constexpr, DIRECT: tl.constexpr):
        """A work item's result: the normalized output (one split), else fp32 partials + log-sum-exp
        in the partial layout [R, Hq, NSPLIT, D] for _decode_reduce_kernel."""
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        if DIRECT:
            tl.store(out_ptr + r * s_or + qh[:, None] * s_oh + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=gmask[:, None])
        else:
            row = (r * HKV * G + qh) * NSPLIT + s
            tl.store(opart_ptr + row[:, None] * D + offs_d[None, :], o, mask=gmask[:, None])
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + row, lse, mask=gmask)

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, out_ptr, opart_ptr, lse_ptr,
                       s_qr, s_qh, s_kr, s_kt, s_kh, s_vr, s_vt, s_vh, s_or, s_oh,
                       R, HKV, NSPLIT, SPLIT_LEN, qk_scale, NP,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                       DIRECT: tl.constexpr, STAGES: tl.constexpr):
        pid = tl.program_id(0)
        n_items = R * HKV * NSPLIT
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BN)
        gmask = offs_g < G
        for item in range(pid, n_items, NP):
            s = item % NSPLIT
            rh = item // NSPLIT
            h = rh % HKV
            r = rh // HKV
            L = tl.load(lens_ptr + r)
            start = s * SPLIT_LEN
            end = tl.minimum(start + SPLIT_LEN, L)
            qh = h * G + offs_g
            qt = tl.load(q_ptr + r * s_qr + qh[:, None] * s_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
            m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([GP], dtype=tl.float32)
            acc = tl.zeros([GP, D], dtype=tl.float32)
            kb = k_ptr + r.to(tl.int64) * s_kr + h * s_kh
            vb = v_ptr + r.to(tl.int64) * s_vr + h * s_vh
            for t0 in tl.range(start, end, BN, num_stages=STAGES):
                tok = t0 + offs_n
                tmask = tok < end
                kt = tl.load(kb + tok[:, None] * s_kt + offs_d[None, :], mask=tmask[:, None], other=0.0)
                vt = tl.load(vb + tok[:, None] * s_vt + offs_d[None, :], mask=tmask[:, None], other=0.0)
                sc = tl.dot(qt, tl.trans(kt)) * qk_scale
                sc = tl.where(tmask[None, :], sc, float("-inf"))
                m_i, l_i, acc = softmax_step(sc, vt, m_i, l_i, acc)
            store_item(acc, l_i, m_i, out_ptr, opart_ptr, lse_ptr, r, qh, s, s_or, s_oh, HKV, NSPLIT, offs_d,
                       gmask, G, D, DIRECT)

    @triton.jit
    def _decode_reduce_kernel(opart_ptr, lse_ptr, out_ptr, s_or, s_oh, HQ, n_rows, NSPLIT, NP,
                              SP: tl.constexpr, D: tl.constexpr):
        pid = tl.program_id(0)
        offs_s = tl.arange(0, SP)
        offs_d = tl.arange(0, D)
        smask = offs_s < NSPLIT
        for row in range(pid, n_rows, NP):
            lse = tl.load(lse_ptr + row * NSPLIT + offs_s, mask=smask, other=float("-inf"))
            m = tl.max(lse, 0)
            m = tl.where(m == float("-inf"), 0.0, m)
            w = tl.exp2(lse - m)
            o = tl.load(opart_ptr + (row * NSPLIT + offs_s)[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
            tot = tl.sum(w, 0)
            res = tl.sum(o * w[:, None], 0) / tl.where(tot > 0, tot, 1.0)
            r = row // HQ
            h = row % HQ
            tl.store(out_ptr + r * s_or + h * s_oh + offs_d, res.to(out_ptr.dtype.element_ty))


def choose_splits(num_requests: int, num_kv_heads: int, max_context: int, grid: int, block_n: int):
    """(num_splits, split_len): enough work items to keep ``grid`` programs busy."""
    items = num_requests * num_kv_heads
    nsplit = max(1, min(-(-4 * grid // items), -(-max_context // block_n)))
    split_len = -(-(-(-max_context // nsplit)) // block_n) * block_n
    nsplit = -(-max_context // split_len)
    return nsplit, split_len


def decode_attention(q, k_cache, v_cache, context_lens, out, num_sms: int, scale=None, max_context=None,
                     block_n=None, num_warps=None, num_stages=None, programs_per_sm=None):
    """out[R,Hq,D] = softmax(q k^T * scale) v over the first context_lens[r] cached tokens; GQA.

    ``max_context`` (optional, host int) bounds context_lens to size the splits; default the cache size.
    Returns ``out``.
    """
    require_triton("decode_attention")
    R, HQ, D = q.shape
    _, T, HKV, D2 = k_cache.shape
    assert D == D2 and HQ % HKV == 0 and tuple(out.shape) == (R, HQ, D)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and out.stride(2) == 1
    G = HQ // HKV
    bn = block_n or BLOCK_N
    warps = num_warps or NUM_WARPS
    stages = num_stages or NUM_STAGES
    pps = programs_per_sm or PROGRAMS_PER_SM
    scale = (1.0 / math.sqrt(D)) if scale is None else scale
    mc = min(T, int(max_context)) if max_context else T
    cap = num_sms * pps
    nsplit, split_len = choose_splits(R, HKV, mc, cap, bn)
    direct = nsplit == 1
    if direct:
        opart = lse = out  # unused
    else:
        opart = torch.empty((R, HQ, nsplit, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((R, HQ, nsplit), device=q.device, dtype=torch.float32)
    grid = programs(num_sms, pps, R * HKV * nsplit)
    _decode_kernel[(grid,)](q, k_cache, v_cache, context_lens, out, opart, lse,
                            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
                            R, HKV, nsplit, split_len, scale * LOG2E, grid,
                            G=G, GP=max(16, next_pow2(G)), D=D, BN=bn, DIRECT=direct, STAGES=stages,
                            num_warps=warps, num_stages=stages)
    if not direct:
        rows = R * HQ
        g2 = programs(num_sms, 8, rows)
        _decode_reduce_kernel[(g2,)](opart, lse, out, out.stride(0), out.stride(1), HQ, rows, nsplit, g2,
                                     SP=max(2, next_pow2(nsplit)), D=D, num_warps=4)
    return out
