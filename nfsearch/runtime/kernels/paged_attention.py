"""Attention over a paged KV cache for the serving engine: decode, chunked prefill ("extend"), KV writes.

KV cache per layer: ``k_cache, v_cache [num_pages, page_size, Hkv, D]`` (bf16 on the GPU); a request's
token at position ``p`` lives in page ``page_table[p // page_size]``, offset ``p % page_size``.

Every launch's grid and split count come from tensor shapes (batch slots, ``max_pages``, segments, rows)
and ``num_sms``, never from the lengths in the device buffers, so the calls can be captured in a CUDA
graph and replayed with new lengths and page tables. ``num_sms`` bounds the persistent grid (an SM
share); work items past a request's length or a segment's end do nothing.

* decode: split-KV flash decoding. A work item is (request, kv head, split); one program computes all
  ``Hq / Hkv`` query heads of its kv head, so each K/V byte is read once. One split: the program
  writes the output; several: fp32 partials + log-sum-exp, reduced by decode_attention's reduce kernel.
* prefill: flash attention of each chunk's rows against its request's keys 0..row position, read
  through the page table. A block's rows are ``block_m // G`` tokens x the G query heads of one kv
  head (GQA without repeated K/V); the keys every row sees run unmasked, the causal edge masked.
  Only real blocks are work items (counted on the device from the chunk lengths), each segment's
  heaviest (last) block first; the grid is sized from the shapes and strides over them.

The torch versions (``*_torch``, paged_attention_torch.py) run on the CPU and are the reference.

FP8 caches (``torch.float8_e4m3fn``, ``--kv-cache-dtype fp8``): every kernel takes ``k_scales,
v_scales [num_pages, page_size, Hkv]`` float32, one scale per (token, kv head), written by write_kv
with the row (paged_attention_torch.py says why that grain). The dtype is a trace-time constant
(``FP8: tl.constexpr``): the bf16 kernels compile exactly as before. With fp8 the attention kernels
load half the K/V bytes (the same vectorised row loads) plus one scale per key, widen the fp8 tile to
fp16 (exact; q is converted to fp16 once per work item) and apply the scales per score column (K)
and per probability column (V). Scales are read through any strides; the engine stores them head-major
(``new_kv_scales``), so one kv head's scales of a page are 64 contiguous bytes, not 16 scattered words.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from ._common import (
    HAVE_TRITON,
    INTERPRET,
    next_pow2,
    programs,
    require_triton,
    tl,
    torch,
    triton,
    use_triton,
)
from .paged_attention_torch import (
    FP8_MAX,
    is_fp8,
    new_kv_scales,
    paged_decode_attention_torch,
    paged_prefill_attention_torch,
    write_kv_torch,
)

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64          # tokens per loop step
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 3
    min_items_per_program: int = 4   # split the KV until the grid has this many items per program
    # fp8 cache: widen the V tile to fp16 in registers and stage it through shared memory as fp16
    # (16-bit transposing loads), instead of Triton's default of loading the fp8 tile from shared
    # memory byte by byte in the PV product's operand layout (8-bit elements have no transposing load)
    fp8_v_fp16_tile: bool = False


@dataclass(frozen=True)
class PrefillConfig:
    # best of 7 configs on an H100 at 132 SMs, a 600-token chunk over a 0 / 1024-token prefix
    block_m: int = 64          # query rows (tokens x query heads of one kv head) per block
    block_n: int = 64          # keys per loop step
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 3


DECODE_CONFIG = DecodeConfig()
# fp8 caches: the best of the fp8 sweep on an H100 at 576 requests x 1536 (0.834 ms against 1.173 ms for
# the bf16 cache's default on the same requests; benchmarks/paged_attention.py --sections decode_fp8_sweep)
FP8_DECODE_CONFIG = DecodeConfig(block_n=128, num_warps=4, num_stages=3, programs_per_sm=2,
                                 fp8_v_fp16_tile=True)
PREFILL_CONFIG = PrefillConfig()
WRITE_KV_PROGRAMS_PER_SM = 8

if HAVE_TRITON:
    from .decode_attention import _decode_reduce_kernel, softmax_step, store_item

    FP8_LIMIT = tl.constexpr(FP8_MAX)
    RNE_MAGIC = tl.constexpr(12582912.0)      # 1.5 x 2^23: y + it - it is y rounded to an integer (|y| < 2^22)
    # the e4m3 rounding by hand only where the cast lacks it: on a GPU the cast is cvt.rn.satfinite
    # (round to nearest even), which writes the same bytes without the ~10 instructions per element
    SOFT_E4M3 = tl.constexpr(INTERPRET)

    @triton.jit
    def _kv_block(k_ptr, v_ptr, ks_ptr, vs_ptr, pt, key, kmask, h, s_kp, s_kt, s_kh, s_vp, s_vt, s_vh,
                  s_sp, s_st, s_sh, offs_d, PS: tl.constexpr, FP8: tl.constexpr):
        """Keys `key` [BN] of one request through its page table row `pt`: (K [BN, D], V [BN, D], K scales,
        V scales): the scales [BN] of an fp8 cache (0 where masked), else 1.0."""
        page = tl.load(pt + key // PS, mask=kmask, other=0).to(tl.int64)
        krow = page * s_kp + (key % PS) * s_kt + h * s_kh
        vrow = page * s_vp + (key % PS) * s_vt + h * s_vh
        kt = tl.load(k_ptr + krow[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
        vt = tl.load(v_ptr + vrow[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
        if FP8:
            srow = page * s_sp + (key % PS) * s_st + h * s_sh
            ks = tl.load(ks_ptr + srow, mask=kmask, other=0.0)
            vs = tl.load(vs_ptr + srow, mask=kmask, other=0.0)
        else:
            ks = 1.0
            vs = 1.0
        return kt, vt, ks, vs

    @triton.jit
    def _scores(qt, kt, ks, qk_scale, FP8: tl.constexpr):
        """q k^T x qk_scale [M, BN] fp32; an fp8 K tile is widened to q's dtype (fp16, see _fp8_query)
        and scaled per column."""
        if FP8:
            sc = tl.dot(qt, tl.trans(kt.to(qt.dtype))) * (ks * qk_scale)[None, :]
        else:
            sc = tl.dot(qt, tl.trans(kt)) * qk_scale
        return sc

    @triton.jit
    def _attend_step(sc, vt, vs, m_i, l_i, acc, FP8: tl.constexpr):
        """softmax_step; with an fp8 V tile (already widened) the probabilities are scaled per key
        column before the PV product (the row sums l_i stay unscaled). The scales are taken relative
        to the tile's largest, so the scaled probabilities stay in [0, 1], where fp16 keeps 11 bits,
        and the product is scaled back once."""
        if FP8:
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            p = tl.exp2(sc - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            vmax = tl.max(vs, 0)
            vmax = tl.where(vmax > 0, vmax, 1.0)
            acc = acc * alpha[:, None] + tl.dot((p * (vs / vmax)[None, :]).to(vt.dtype), vt) * vmax
            m_i = m_new
        else:
            m_i, l_i, acc = softmax_step(sc, vt, m_i, l_i, acc)
        return m_i, l_i, acc

    @triton.jit
    def _fp8_query(qt, FP8: tl.constexpr):
        """q as the fp8 tiles' dot partner: fp16 for an fp8 cache. e4m3 -> fp16 is one exact conversion
        per pair of values (bf16 needs it plus two more), and bf16 q values in fp16's normal range are
        exact in fp16; q as loaded otherwise."""
        if FP8:
            qt = qt.to(tl.float16)
        return qt

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, pt_ptr, lens_ptr, out_ptr, opart_ptr, lse_ptr,
                             s_qb, s_qh, s_kp, s_kt, s_kh, s_vp, s_vt, s_vh, s_sp, s_st, s_sh,
                             s_ob, s_oh, s_pt,
                             B, HKV, NSPLIT, SPLIT_LEN, qk_scale, NP,
                             PS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                             BN: tl.constexpr, DIRECT: tl.constexpr, STAGES: tl.constexpr, FP8: tl.constexpr,
                             V16: tl.constexpr):
        pid = tl.program_id(0)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BN)
        gmask = offs_g < G
        for item in range(pid, B * HKV * NSPLIT, NP):
            s = item % NSPLIT
            h = (item // NSPLIT) % HKV
            b = item // (NSPLIT * HKV)
            start = s * SPLIT_LEN
            end = tl.minimum(start + SPLIT_LEN, tl.load(lens_ptr + b))
            qh = h * G + offs_g
            qt = tl.load(q_ptr + b * s_qb + qh[:, None] * s_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
            qt = _fp8_query(qt, FP8)
            m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([GP], dtype=tl.float32)
            acc = tl.zeros([GP, D], dtype=tl.float32)
            pt = pt_ptr + b.to(tl.int64) * s_pt
            for t0 in tl.range(start, end, BN, num_stages=STAGES):
                tok = t0 + offs_n
                tmask = tok < end
                kt, vt, ks, vs = _kv_block(k_ptr, v_ptr, ks_ptr, vs_ptr, pt, tok, tmask, h, s_kp, s_kt, s_kh,
                                           s_vp, s_vt, s_vh, s_sp, s_st, s_sh, offs_d, PS, FP8)
                sc = _scores(qt, kt, ks, qk_scale, FP8)
                sc = tl.where(tmask[None, :], sc, float("-inf"))
                if V16:
                    # the select pins the widened tile to the load's layout (DecodeConfig.fp8_v_fp16_tile)
                    vt = tl.where(tmask[:, None], vt.to(qt.dtype), 0.0)
                m_i, l_i, acc = _attend_step(sc, vt.to(qt.dtype), vs, m_i, l_i, acc, FP8)
            store_item(acc, l_i, m_i, out_ptr, opart_ptr, lse_ptr, b, qh, s, s_ob, s_oh, HKV, NSPLIT, offs_d,
                       gmask, G, D, DIRECT)

    @triton.jit
    def _paged_prefill_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, pt_ptr, starts_ptr, lens_ptr, prefix_ptr, out_ptr,
                              s_qt, s_qh, s_kp, s_kt, s_kh, s_vp, s_vt, s_vh, s_sp, s_st, s_sh,
                              s_ot, s_oh, s_pt,
                              NSEG, HKV, qk_scale, NP,
                              PS: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr,
                              D: tl.constexpr, BN: tl.constexpr, SP: tl.constexpr, STAGES: tl.constexpr,
                              FP8: tl.constexpr):
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BN)
        offs_s = tl.arange(0, SP)
        tok_in_block = offs_m // G        # row -> (token, query head of the group)
        head_in_group = offs_m % G
        # Only the real blocks become work items (a padded bucket launches no idle items that would
        # unbalance the static striding): item v -> segment s by the running sum of items per segment.
        seg_items = tl.cdiv(tl.load(lens_ptr + offs_s, mask=offs_s < NSEG, other=0), BT) * HKV   # [SP]
        seg_ends = tl.cumsum(seg_items, 0)
        for item in range(pid, tl.sum(seg_items, 0), NP):
            s = tl.sum((seg_ends <= item).to(tl.int32), 0)
            r = item - tl.sum(tl.where(offs_s == s, seg_ends - seg_items, 0), 0)
            h = r % HKV
            mi = r // HKV                 # 0 = the segment's last (heaviest) block
            num_rows = tl.load(lens_ptr + s)
            i0 = (tl.cdiv(num_rows, BT) - 1 - mi) * BT
            i = i0 + tok_in_block
            rmask = (tok_in_block < BT) & (i < num_rows)
            start = tl.load(starts_ptr + s)
            prefix = tl.load(prefix_ptr + s)
            qh = h * G + head_in_group
            qoff = (start + i).to(tl.int64) * s_qt + qh * s_qh
            qt = tl.load(q_ptr + qoff[:, None] + offs_d[None, :], mask=rmask[:, None], other=0.0)
            qt = _fp8_query(qt, FP8)
            pos = prefix + i
            # keys < prefix + i0 + 1 are seen by every row; the block's causal edge ends at its last row
            full_end = (prefix + i0 + 1) // BN * BN
            edge_end = prefix + tl.minimum(i0 + BT, num_rows)
            pt = pt_ptr + s.to(tl.int64) * s_pt
            m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BM], dtype=tl.float32)
            acc = tl.zeros([BM, D], dtype=tl.float32)
            for k0 in tl.range(0, full_end, BN, num_stages=STAGES):
                key = k0 + offs_n
                kt, vt, ks, vs = _kv_block(k_ptr, v_ptr, ks_ptr, vs_ptr, pt, key, key < full_end, h, s_kp, s_kt,
                                           s_kh, s_vp, s_vt, s_vh, s_sp, s_st, s_sh, offs_d, PS, FP8)
                sc = _scores(qt, kt, ks, qk_scale, FP8)
                m_i, l_i, acc = _attend_step(sc, vt.to(qt.dtype), vs, m_i, l_i, acc, FP8)
            for k0 in tl.range(full_end, edge_end, BN, num_stages=STAGES):
                key = k0 + offs_n
                kmask = key < edge_end
                kt, vt, ks, vs = _kv_block(k_ptr, v_ptr, ks_ptr, vs_ptr, pt, key, kmask, h, s_kp, s_kt, s_kh,
                                           s_vp, s_vt, s_vh, s_sp, s_st, s_sh, offs_d, PS, FP8)
                sc = _scores(qt, kt, ks, qk_scale, FP8)
                sc = tl.where(kmask[None, :] & (key[None, :] <= pos[:, None]), sc, float("-inf"))
                m_i, l_i, acc = _attend_step(sc, vt.to(qt.dtype), vs, m_i, l_i, acc, FP8)
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            ooff = (start + i).to(tl.int64) * s_ot + qh * s_oh
            tl.store(out_ptr + ooff[:, None] + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])

    @triton.jit
    def _to_fp8(x, dtype: tl.constexpr):
        """Rows x [HP, D] fp32 -> (fp8 [HP, D], scales [HP]): scale = max |row| / 448 (1.0 for a zero
        row), divisions rounded as torch's (IEEE) so the torch path writes the same bytes."""
        amax = tl.max(tl.abs(x), 1)
        sc = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, FP8_LIMIT, tl.float32)), 1.0)
        xq = tl.math.div_rn(x, tl.broadcast_to(sc[:, None], x.shape))
        return _round_to_e4m3(tl.clamp(xq, -FP8_LIMIT, FP8_LIMIT)).to(dtype), sc

    @triton.jit
    def _round_to_e4m3(x):
        """x (fp32, |x| <= 448) rounded to nearest-even on the e4m3 grid, in fp32 arithmetic, so the
        cast that follows is exact: the grid step is 2^(e - 3) for |x| in [2^e, 2^(e + 1)), e >= -6,
        and 2^-9 below (subnormals). (Triton's interpreter casts to fp8 without the carry into the
        exponent; this way the interpreter, the GPU and torch write the same bytes.) Compiled for a GPU it
        returns x: the cast there rounds the same way (SOFT_E4M3)."""
        r = x
        if SOFT_E4M3:
            e = tl.maximum((x.to(tl.int32, bitcast=True) >> 23) & 0xFF, 121)  # biased exponent, >= 2^-6
            step = ((e - 3) << 23).to(tl.float32, bitcast=True)
            inv_step = ((257 - e) << 23).to(tl.float32, bitcast=True)        # 1 / step
            y = x * inv_step                                                    # |y| < 16, exact
            r = ((y + RNE_MAGIC) - RNE_MAGIC) * step        # fp32 adds round y to an integer, ties even
            r = tl.where(r == 0, x * 0.0, r)                # a negative x rounded to zero stays -0, as torch's
        return r

    @triton.jit
    def _slot_rows(slot_ptr, t, offs_h, HKV: tl.constexpr, PS: tl.constexpr):
        """Token t's cache slot as (kv head mask [HP], page, offset): every head masked off for slot -1."""
        slot = tl.load(slot_ptr + t)
        hmask = offs_h < tl.where(slot >= 0, HKV, 0)    # (a scalar & a vector trips the interpreter)
        slot = tl.maximum(slot, 0).to(tl.int64)
        return hmask, slot // PS, slot % PS

    @triton.jit
    def _store_kv_rows(kv, vv, kc_ptr, vc_ptr, ks_ptr, vs_ptr, page, off, hmask, offs_h, offs_d,
                       s_kcp, s_kct, s_kch, s_vcp, s_vct, s_vch, s_sp, s_st, s_sh, FP8: tl.constexpr):
        """K and V rows [HP, D] of one token into the paged caches at (page, off); an fp8 cache gets
        each (token, kv head) row quantized with its own scale, stored in the scale arrays."""
        mask = hmask[:, None]
        if FP8:
            kv, ksc = _to_fp8(kv.to(tl.float32), kc_ptr.dtype.element_ty)
            vv, vsc = _to_fp8(vv.to(tl.float32), vc_ptr.dtype.element_ty)
            srow = page * s_sp + off * s_st + offs_h * s_sh
            tl.store(ks_ptr + srow, ksc, mask=hmask)
            tl.store(vs_ptr + srow, vsc, mask=hmask)
        tl.store(kc_ptr + page * s_kcp + off * s_kct + offs_h[:, None] * s_kch + offs_d[None, :],
                 kv.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + page * s_vcp + off * s_vct + offs_h[:, None] * s_vch + offs_d[None, :],
                 vv.to(vc_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr, s_kt, s_kh, s_vt, s_vh,
                         s_kcp, s_kct, s_kch, s_vcp, s_vct, s_vch, s_sp, s_st, s_sh, T, NP,
                         HKV: tl.constexpr, HP: tl.constexpr, PS: tl.constexpr, D: tl.constexpr,
                         FP8: tl.constexpr):
        pid = tl.program_id(0)
        offs_h = tl.arange(0, HP)
        offs_d = tl.arange(0, D)
        for t in range(pid, T, NP):
            hmask, page, off = _slot_rows(slot_ptr, t, offs_h, HKV, PS)
            kv = tl.load(k_ptr + t * s_kt + offs_h[:, None] * s_kh + offs_d[None, :], mask=hmask[:, None])
            vv = tl.load(v_ptr + t * s_vt + offs_h[:, None] * s_vh + offs_d[None, :], mask=hmask[:, None])
            _store_kv_rows(kv, vv, kc_ptr, vc_ptr, ks_ptr, vs_ptr, page, off, hmask, offs_h, offs_d,
                           s_kcp, s_kct, s_kch, s_vcp, s_vct, s_vch, s_sp, s_st, s_sh, FP8)


def device_sms(device) -> int:
    """SMs of a CUDA device (the default ``num_sms``); 4 for a CPU tensor (Triton's interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return _cuda_sms(torch.cuda.current_device() if device.index is None else device.index)


@cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check_shapes(q, out, k_cache, v_cache) -> tuple[int, int]:
    """(page_size, num_kv_heads) once q [rows, Hq, D], out (same shape) and the caches fit together."""
    rows, HQ, D = q.shape
    _check_cache(k_cache, v_cache, D)
    page_size, HKV = k_cache.shape[1], k_cache.shape[2]
    if HQ % HKV or tuple(out.shape) != (rows, HQ, D) or q.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError(f"q {tuple(q.shape)} / out {tuple(out.shape)} do not fit {HKV} kv heads of dim {D}")
    return page_size, HKV


def _check_cache(k_cache, v_cache, head_dim: int):
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[3] != head_dim:
        raise ValueError(f"caches must be [num_pages, page_size, Hkv, {head_dim}], got {tuple(k_cache.shape)}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("caches need a contiguous last dimension")
    if head_dim != next_pow2(head_dim) or head_dim < 16:
        raise ValueError(f"the Triton kernels take a power-of-two head dim >= 16, not {head_dim}")


def _scale_args(k_cache, v_cache, k_scales, v_scales):
    """(k scales, v scales, page stride, token stride, head stride, is_fp8) for the kernels; a bf16 cache
    passes its own tensors as unused scale pointers. Any strides (new_kv_scales' head-major layout is
    the fast one for attention)."""
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"K cache {k_cache.dtype} and V cache {v_cache.dtype} differ")
    if not is_fp8(k_cache):
        return k_cache, v_cache, 0, 0, 0, False
    want = tuple(k_cache.shape[:3])
    for t in (k_scales, v_scales):
        if t is None or tuple(t.shape) != want or t.dtype != torch.float32:
            raise ValueError(f"an fp8 cache needs float32 k_scales and v_scales {list(want)}, "
                             f"got {None if t is None else (tuple(t.shape), t.dtype)}")
    if k_scales.stride() != v_scales.stride():
        raise ValueError("k_scales and v_scales need the same strides")
    return (k_scales, v_scales, *k_scales.stride(), True)


def decode_splits(num_requests: int, num_kv_heads: int, max_context: int, grid: int, cfg: DecodeConfig):
    """(num_splits, split_len tokens) from shapes alone: enough items per program for ``grid`` programs."""
    items = max(1, num_requests * num_kv_heads)
    max_blocks = max(1, -(-max_context // cfg.block_n))
    nsplit = max(1, min(-(-cfg.min_items_per_program * grid // items), max_blocks))
    split_len = -(-max_blocks // nsplit) * cfg.block_n
    return -(-max(1, max_context) // split_len), split_len


def paged_decode_attention(q, k_cache, v_cache, page_tables, context_lens, out, scale, num_sms=None, *,
                           num_splits=None, config: DecodeConfig | None = None, k_scales=None, v_scales=None):
    """out[b] = softmax(q[b] k^T * scale) v over request b's first context_lens[b] cached tokens; GQA.

    q [B, Hq, D]; page_tables [B, max_pages] int32; context_lens [B] int32 (0: out row zeros);
    out [B, Hq, D]. ``num_splits`` overrides the split count chosen from the shapes. k_scales,
    v_scales [num_pages, page_size, Hkv] float32 with an fp8 cache. Returns ``out``."""
    require_triton("paged_decode_attention")
    B, HQ, D = q.shape
    page_size, HKV = _check_shapes(q, out, k_cache, v_cache)
    ks, vs, s_sp, s_st, s_sh, fp8 = _scale_args(k_cache, v_cache, k_scales, v_scales)
    cfg = config or (FP8_DECODE_CONFIG if fp8 else DECODE_CONFIG)
    if B == 0:
        return out
    G = HQ // HKV
    max_context = page_tables.shape[1] * page_size
    cap = (num_sms or device_sms(q.device)) * cfg.programs_per_sm
    nsplit, split_len = decode_splits(B, HKV, max_context, cap, cfg)
    if num_splits is not None:
        split_len = -(-max_context // (int(num_splits) * cfg.block_n)) * cfg.block_n
        nsplit = -(-max_context // split_len)
    is_direct = nsplit == 1
    if is_direct:
        opart = lse = out  # unused
    else:
        opart = torch.empty((B, HQ, nsplit, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((B, HQ, nsplit), device=q.device, dtype=torch.float32)
    grid = programs(cap, 1, B * HKV * nsplit)
    _paged_decode_kernel[(grid,)](
        q, k_cache, v_cache, ks, vs, page_tables, context_lens, out, opart, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), s_sp, s_st, s_sh,
        out.stride(0), out.stride(1),
        page_tables.stride(0), B, HKV, nsplit, split_len, scale * LOG2E, grid,
        PS=page_size, G=G, GP=max(16, next_pow2(G)), D=D, BN=cfg.block_n, DIRECT=is_direct,
        STAGES=cfg.num_stages, FP8=fp8, V16=fp8 and cfg.fp8_v_fp16_tile, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    if not is_direct:
        rows = B * HQ
        grid2 = programs(cap // cfg.programs_per_sm, 8, rows)
        _decode_reduce_kernel[(grid2,)](opart, lse, out, out.stride(0), out.stride(1), HQ, rows, nsplit, grid2,
                                        SP=max(2, next_pow2(nsplit)), D=D, num_warps=4)
    return out


def paged_prefill_attention(q, k_cache, v_cache, page_tables, chunk_starts, chunk_lens, prefix_lens, out, scale,
                            num_sms=None, *, max_chunk_rows=None, config: PrefillConfig | None = None,
                            k_scales=None, v_scales=None):
    """Chunked-prefill attention: chunk s owns rows [chunk_starts[s], +chunk_lens[s]) of q [T, Hq, D]; its
    row i sits at position prefix_lens[s] + i and attends to keys 0..that position of its request,
    read through page_tables[s] (the chunk's own K/V already written). chunk_lens[s] == 0: padding.
    Rows outside every chunk are not written. ``max_chunk_rows`` (host int, default T) bounds a
    chunk's rows; it only sizes the grid (no more programs than blocks). k_scales, v_scales as in
    paged_decode_attention. Returns ``out``."""
    require_triton("paged_prefill_attention")
    cfg = config or PREFILL_CONFIG
    T, HQ, D = q.shape
    page_size, HKV = _check_shapes(q, out, k_cache, v_cache)
    ks, vs, s_sp, s_st, s_sh, fp8 = _scale_args(k_cache, v_cache, k_scales, v_scales)
    G = HQ // HKV
    if G > cfg.block_m:
        raise ValueError(f"block_m {cfg.block_m} is smaller than the {G} query heads per kv head")
    num_segments = chunk_lens.shape[0]
    max_rows = min(T, int(max_chunk_rows)) if max_chunk_rows is not None else T
    if num_segments == 0 or max_rows <= 0:
        return out
    block_tokens = cfg.block_m // G
    num_blocks = -(-max_rows // block_tokens)
    cap = (num_sms or device_sms(q.device)) * cfg.programs_per_sm
    grid = programs(cap, 1, num_blocks * num_segments * HKV)
    _paged_prefill_kernel[(grid,)](
        q, k_cache, v_cache, ks, vs, page_tables, chunk_starts, chunk_lens, prefix_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), s_sp, s_st, s_sh,
        out.stride(0), out.stride(1),
        page_tables.stride(0), num_segments, HKV, scale * LOG2E, grid,
        PS=page_size, G=G, BM=cfg.block_m, BT=block_tokens, D=D, BN=cfg.block_n, SP=max(2, next_pow2(num_segments)),
        STAGES=cfg.num_stages, FP8=fp8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def write_kv(k, v, k_cache, v_cache, slot_mapping, num_sms=None, *, k_scales=None, v_scales=None):
    """k_cache.view(-1, Hkv, D)[slot_mapping[t]] = k[t], same for v; slot -1 skipped. k, v [T, Hkv, D]
    (views with any row stride). An fp8 cache gets each (token, kv head) row quantized with its own
    scale, stored in k_scales / v_scales [num_pages, page_size, Hkv] float32. Triton on a CUDA device
    (or under Triton's interpreter), ``write_kv_torch`` elsewhere."""
    if use_triton(k):
        return write_kv_triton(k, v, k_cache, v_cache, slot_mapping, num_sms, k_scales=k_scales, v_scales=v_scales)
    return write_kv_torch(k, v, k_cache, v_cache, slot_mapping, k_scales, v_scales)


def write_kv_triton(k, v, k_cache, v_cache, slot_mapping, num_sms=None, *, k_scales=None, v_scales=None):
    """``write_kv`` by a Triton kernel: one program per row on a persistent grid (graph-capturable)."""
    require_triton("write_kv_triton")
    T, HKV, D = k.shape
    _check_cache(k_cache, v_cache, D)
    ks, vs, s_sp, s_st, s_sh, fp8 = _scale_args(k_cache, v_cache, k_scales, v_scales)
    if T == 0:
        return
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("k and v need a contiguous last dimension")
    grid = programs(num_sms or device_sms(k.device), WRITE_KV_PROGRAMS_PER_SM, T)
    _write_kv_kernel[(grid,)](k, v, k_cache, v_cache, ks, vs, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                              v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                              v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), s_sp, s_st, s_sh,
                              T, grid,
                              HKV=HKV, HP=next_pow2(HKV), PS=k_cache.shape[1], D=D, FP8=fp8, num_warps=4)


__all__ = ["DECODE_CONFIG", "FP8_DECODE_CONFIG", "FP8_MAX", "PREFILL_CONFIG", "DecodeConfig", "PrefillConfig",
           "decode_splits", "device_sms", "is_fp8", "new_kv_scales",
           "paged_decode_attention", "paged_decode_attention_torch", "paged_prefill_attention",
           "paged_prefill_attention_torch", "write_kv", "write_kv_torch", "write_kv_triton"]
