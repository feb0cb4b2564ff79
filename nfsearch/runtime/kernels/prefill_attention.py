"""SM-bounded causal GQA attention over packed prompts (flash-attention forward, persistent grid).

``q[T, Hq, D]``, ``k/v[T, Hkv, D]``, ``cu_seqlens[P+1]`` (int32 prompt offsets into the packed
tokens), ``out[T, Hq, D]``. A work item is (query block of one prompt, query head); the block table
is built on the GPU (no host sync) with an upper bound of ``ceil(T/BM) + P`` blocks. Each prompt's
blocks are visited last-block-first, so the longest items start first.
"""

from __future__ import annotations

import math

from ._common import HAVE_TRITON, programs, require_triton, tl, torch, triton

BLOCK_M = 128
BLOCK_N = 64
NUM_WARPS = 8
NUM_STAGES = 3
PROGRAMS_PER_SM = 1
LOG2E = 1.4426950408889634

if HAVE_TRITON:

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, cu_ptr, bprompt_ptr, bidx_ptr,
                        s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
                        n_slots, HQ, qk_scale, NP,
                        G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        STAGES: tl.constexpr):
        pid = tl.program_id(0)
        offs_d = tl.arange(0, D)
        n_items = n_slots * HQ
        for item in range(pid, n_items, NP):
            slot = item // HQ
            hq = item % HQ
            p = tl.load(bprompt_ptr + slot)
            mb = tl.load(bidx_ptr + slot)
            valid = p >= 0
            pc = tl.where(valid, p, 0)
            s0 = tl.load(cu_ptr + pc)
            L = tl.where(valid, tl.load(cu_ptr + pc + 1) - s0, 0)
            hk = hq // G
            offs_m = mb * BM + tl.arange(0, BM)
            mmask = offs_m < L
            qt = tl.load(q_ptr + (s0 + offs_m).to(tl.int64)[:, None] * s_qt + hq * s_qh + offs_d[None, :],
                         mask=mmask[:, None], other=0.0)
            m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BM], dtype=tl.float32)
            acc = tl.zeros([BM, D], dtype=tl.float32)
            hi = tl.minimum((mb + 1) * BM, L)
            kb = k_ptr + hk * s_kh
            vb = v_ptr + hk * s_vh
            for n0 in tl.range(0, hi, BN, num_stages=STAGES):
                offs_n = n0 + tl.arange(0, BN)
                nmask = offs_n < L
                rows = (s0 + offs_n).to(tl.int64)
                kt = tl.load(kb + rows[:, None] * s_kt + offs_d[None, :], mask=nmask[:, None], other=0.0)
                vt = tl.load(vb + rows[:, None] * s_vt + offs_d[None, :], mask=nmask[:, None], other=0.0)
                sc = tl.dot(qt, tl.trans(kt)) * qk_scale
                ok = (offs_n[None, :] <= offs_m[:, None]) & nmask[None, :]
                sc = tl.where(ok, sc, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(sc, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                pr = tl.exp2(sc - m_safe[:, None])
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(pr, 1)
                acc = acc * alpha[:, None] + tl.dot(pr.to(vt.dtype), vt)
                m_i = m_new
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + (s0 + offs_m).to(tl.int64)[:, None] * s_ot + hq * s_oh + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=mmask[:, None])


def block_table(cu_seqlens, num_tokens: int, block_m: int):
    """(prompt_of_slot, block_of_slot) int32 on the GPU; unused slots have prompt -1. No host sync."""
    P = cu_seqlens.numel() - 1
    n_slots = -(-num_tokens // block_m) + P
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    nb = (lens + block_m - 1) // block_m
    cum = torch.cumsum(nb, 0)
    slots = torch.arange(n_slots, device=cu.device, dtype=torch.int64)
    prompt = torch.searchsorted(cum, slots, right=True)
    valid = prompt < P
    pc = prompt.clamp(max=max(P - 1, 0))
    local = slots - (cum - nb)[pc]
    blk = nb[pc] - 1 - local  # heaviest (last) block of each prompt first
    prompt = torch.where(valid, prompt, torch.full_like(prompt, -1))
    blk = torch.where(valid, blk, torch.zeros_like(blk))
    return prompt.to(torch.int32), blk.to(torch.int32), n_slots


def prefill_attention(q, k, v, cu_seqlens, out, num_sms: int, scale=None, block_table_cache=None,
                      block_m=None, block_n=None, num_warps=None, num_stages=None, programs_per_sm=None):
    """Causal GQA attention of each packed prompt, on a persistent grid bounded by ``num_sms``.

    ``block_table_cache`` (optional) is a precomputed ``block_table(cu_seqlens, T, block_m)``.
    Returns ``out``.
    """
    require_triton("prefill_attention")
    T, HQ, D = q.shape
    HKV = k.shape[1]
    assert HQ % HKV == 0 and tuple(out.shape) == (T, HQ, D)
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1 and out.stride(2) == 1
    bm = block_m or BLOCK_M
    bn = block_n or BLOCK_N
    warps = num_warps or NUM_WARPS
    stages = num_stages or NUM_STAGES
    pps = programs_per_sm or PROGRAMS_PER_SM
    scale = (1.0 / math.sqrt(D)) if scale is None else scale
    bprompt, bidx, n_slots = block_table_cache or block_table(cu_seqlens, T, bm)
    grid = programs(num_sms, pps, n_slots * HQ)
    _prefill_kernel[(grid,)](q, k, v, out, cu_seqlens, bprompt, bidx,
                             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                             out.stride(0), out.stride(1), n_slots, HQ, scale * LOG2E, grid,
                             G=HQ // HKV, D=D, BM=bm, BN=bn, STAGES=stages, num_warps=warps, num_stages=stages)
    return out
