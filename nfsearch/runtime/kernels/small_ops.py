"""SM-bounded memory-bound ops: RMSNorm (+ fused residual add), RoPE + KV append, SiLU-and-mul.

Each runs a persistent grid of ``num_sms * programs_per_sm`` programs striding over rows/tokens.
"""

from __future__ import annotations

from ._common import HAVE_TRITON, next_pow2, programs, require_triton, tl, triton

PROGRAMS_PER_SM = 4

if HAVE_TRITON:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, res_ptr, resout_ptr, T, H, s_x, s_o, s_r, s_ro, eps, NP,
                        BH: tl.constexpr, HAS_RES: tl.constexpr, HAS_RESOUT: tl.constexpr):
        pid = tl.program_id(0)
        offs = tl.arange(0, BH)
        hm = offs < H
        w = tl.load(w_ptr + offs, mask=hm, other=0.0).to(tl.float32)
        for t in range(pid, T, NP):
            t64 = t + tl.zeros([], dtype=tl.int64)
            h = tl.load(x_ptr + t64 * s_x + offs, mask=hm, other=0.0).to(tl.float32)
            if HAS_RES:
                h += tl.load(res_ptr + t64 * s_r + offs, mask=hm, other=0.0).to(tl.float32)
            if HAS_RESOUT:
                tl.store(resout_ptr + t64 * s_ro + offs, h.to(resout_ptr.dtype.element_ty), mask=hm)
            rstd = tl.rsqrt(tl.sum(h * h, 0) / H + eps)
            tl.store(out_ptr + t64 * s_o + offs, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=hm)

    @triton.jit
    def _rope_append_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr, ko_ptr, vo_ptr,
                            T, s_x, s_qt, s_qh, s_cr, s_ct, s_ch, s_vr, s_vt, s_vh, s_kot, s_koh, s_vot, s_voh,
                            s_cos, NP,
                            HQ: tl.constexpr, HKV: tl.constexpr, HQP: tl.constexpr, HKP: tl.constexpr,
                            HALF: tl.constexpr, HAS_KVOUT: tl.constexpr):
        pid = tl.program_id(0)
        j = tl.arange(0, HALF)
        hq = tl.arange(0, HQP)
        hk = tl.arange(0, HKP)
        qm = (hq < HQ)[:, None]
        km = (hk < HKV)[:, None]
        for t in range(pid, T, NP):
            t64 = t + tl.zeros([], dtype=tl.int64)
            pos = tl.load(pos_ptr + t).to(tl.int64)
            c = tl.load(cos_ptr + pos * s_cos + j)[None, :]
            s = tl.load(sin_ptr + pos * s_cos + j)[None, :]
            row = qkv_ptr + t64 * s_x
            # q heads
            qa = row + hq[:, None] * (2 * HALF) + j[None, :]
            x1 = tl.load(qa, mask=qm, other=0.0).to(tl.float32)
            x2 = tl.load(qa + HALF, mask=qm, other=0.0).to(tl.float32)
            qo = q_ptr + t64 * s_qt + hq[:, None] * s_qh + j[None, :]
            tl.store(qo, (x1 * c - x2 * s).to(q_ptr.dtype.element_ty), mask=qm)
            tl.store(qo + HALF, (x2 * c + x1 * s).to(q_ptr.dtype.element_ty), mask=qm)
            # k heads
            ka = row + (HQ + hk[:, None]) * (2 * HALF) + j[None, :]
            y1 = tl.load(ka, mask=km, other=0.0).to(tl.float32)
            y2 = tl.load(ka + HALF, mask=km, other=0.0).to(tl.float32)
            k1 = y1 * c - y2 * s
            k2 = y2 * c + y1 * s
            va = row + (HQ + HKV + hk[:, None]) * (2 * HALF) + j[None, :]
            v1 = tl.load(va, mask=km, other=0.0)
            v2 = tl.load(va + HALF, mask=km, other=0.0)
            slot = tl.load(slot_ptr + t).to(tl.int64)
            wm = km & (slot >= 0)
            slot_c = tl.where(slot >= 0, slot, 0)
            kc = kc_ptr + slot_c * s_cr + pos * s_ct + hk[:, None] * s_ch + j[None, :]
            tl.store(kc, k1.to(kc_ptr.dtype.element_ty), mask=wm)
            tl.store(kc + HALF, k2.to(kc_ptr.dtype.element_ty), mask=wm)
            vc = vc_ptr + slot_c * s_vr + pos * s_vt + hk[:, None] * s_vh + j[None, :]
            tl.store(vc, v1.to(vc_ptr.dtype.element_ty), mask=wm)
            tl.store(vc + HALF, v2.to(vc_ptr.dtype.element_ty), mask=wm)
            if HAS_KVOUT:
                ko = ko_ptr + t64 * s_kot + hk[:, None] * s_koh + j[None, :]
                tl.store(ko, k1.to(ko_ptr.dtype.element_ty), mask=km)
                tl.store(ko + HALF, k2.to(ko_ptr.dtype.element_ty), mask=km)
                vo = vo_ptr + t64 * s_vot + hk[:, None] * s_voh + j[None, :]
                tl.store(vo, v1.to(vo_ptr.dtype.element_ty), mask=km)
                tl.store(vo + HALF, v2.to(vo_ptr.dtype.element_ty), mask=km)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, T, I, s_x, s_o, NP, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        nb = tl.cdiv(I, BLOCK)
        for item in range(pid, T * nb, NP):
            t = (item // nb).to(tl.int64)
            offs = (item % nb) * BLOCK + tl.arange(0, BLOCK)
            m = offs < I
            g = tl.load(x_ptr + t * s_x + offs, mask=m, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + t * s_x + I + offs, mask=m, other=0.0).to(tl.float32)
            y = g / (1.0 + tl.exp(-g)) * u
            tl.store(out_ptr + t * s_o + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def rmsnorm(x, weight, out, num_sms: int, eps: float = 1e-5, residual=None, residual_out=None,
            programs_per_sm=None):
    """out = rmsnorm(h) * weight with h = x (+ residual); ``residual_out`` (may alias ``residual``) gets h.
    x, out, residual, residual_out: [T, H] with unit stride in H. Returns ``out``."""
    require_triton("rmsnorm")
    T, H = x.shape
    assert x.stride(1) == 1 and out.stride(1) == 1
    grid = programs(num_sms, programs_per_sm or PROGRAMS_PER_SM, T)
    r = residual if residual is not None else x
    ro = residual_out if residual_out is not None else out
    _rmsnorm_kernel[(grid,)](x, weight, out, r, ro, T, H, x.stride(0), out.stride(0), r.stride(0), ro.stride(0),
                             eps, grid, BH=next_pow2(H), HAS_RES=residual is not None,
                             HAS_RESOUT=residual_out is not None, num_warps=8 if H >= 2048 else 4)
    return out


def rope_append(qkv, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping, num_sms: int,
                k_out=None, v_out=None, programs_per_sm=None):
    """Rotary embedding (rotate-half) on q and k of qkv[T, (Hq+2Hkv)*D] at ``positions[T]``.

    cos/sin: [max_pos, D/2] float32. Writes q_out[T,Hq,D]; for tokens with ``slot_mapping[t] >= 0``
    writes rotated k and v into k_cache/v_cache[slot, positions[t]] ([R, max_ctx, Hkv, D]); when given,
    k_out/v_out[T,Hkv,D] get every token's rotated k and v (prefill tokens). Returns ``q_out``.
    """
    require_triton("rope_append")
    T = qkv.shape[0]
    HQ, D = q_out.shape[1], q_out.shape[2]
    HKV = k_cache.shape[2]
    assert qkv.shape[1] == (HQ + 2 * HKV) * D and qkv.stride(1) == 1 and D % 2 == 0
    assert cos.stride(1) == 1 and sin.stride() == cos.stride()
    has_kv = k_out is not None and v_out is not None
    ko = k_out if has_kv else k_cache[0]
    vo = v_out if has_kv else v_cache[0]
    grid = programs(num_sms, programs_per_sm or PROGRAMS_PER_SM, T)
    _rope_append_kernel[(grid,)](qkv, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping, ko, vo,
                                 T, qkv.stride(0), q_out.stride(0), q_out.stride(1),
                                 k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                 v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                                 ko.stride(0), ko.stride(1), vo.stride(0), vo.stride(1), cos.stride(0), grid,
                                 HQ=HQ, HKV=HKV, HQP=next_pow2(HQ), HKP=next_pow2(HKV), HALF=D // 2,
                                 HAS_KVOUT=has_kv, num_warps=4)
    return q_out


def silu_and_mul(x, out, num_sms: int, programs_per_sm=None, block=1024):
    """out[T, I] = silu(x[:, :I]) * x[:, I:] for x[T, 2I]. Returns ``out``."""
    require_triton("silu_and_mul")
    T, I2 = x.shape
    I = I2 // 2
    assert tuple(out.shape) == (T, I) and x.stride(1) == 1 and out.stride(1) == 1
    grid = programs(num_sms, programs_per_sm or PROGRAMS_PER_SM, T * triton.cdiv(I, block))
    _silu_mul_kernel[(grid,)](x, out, T, I, x.stride(0), out.stride(0), grid, BLOCK=block, num_warps=4)
    return out
