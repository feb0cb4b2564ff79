"""RoPE and the paged KV write in one pass: the engine's layer between the QKV GEMM and attention.

The unfused path is ``rope_append_torch`` (cos/sin indexed, multiplies and adds as a handful of
torch kernels writing q, k, v buffers) then ``write_kv`` (a Triton scatter of k and v into the paged
cache). ``rope_write_kv`` does both in one Triton kernel: a program per token reads its qkv row
[(Hq + 2 Hkv) * D] once, writes the rotated q to ``q_out [T, Hq, D]`` and the rotated k and raw v
straight into ``k_cache, v_cache [num_pages, page_size, Hkv, D]`` at ``slot_mapping[t]`` (slot -1:
padding: its k and v neither read nor written). No k or v buffer is written.

Rotation: rotate-half (NeoX / HF LLaMA), ``cos, sin [max_pos, D / 2]`` float32 as
``paged_model.rope_tables`` builds them. The kernel rounds where rope_append_torch rounds, so both
write the same bytes: the table entries to qkv's dtype, ``x * cos`` to qkv's dtype, then that plus or
minus ``partner * sin`` (exact in fp32 for bf16 operands) rounded once. Each program rotates whole
rows [heads, D] (the other half loaded as a second, cached read of the same row), so the FP8 cache's
per-(token, kv head) quantization reuses ``paged_attention._to_fp8`` unchanged: the same bytes and
float32 scales as ``write_kv_triton`` of the rotated bf16 k, and as torch's.

The grid is ``num_sms * ROPE_KV_PROGRAMS_PER_SM`` programs (at most T) striding over tokens, fixed by
T and num_sms: graph-capturable, no host sync. ``rope_write_kv_torch`` (rope_append_torch +
write_kv_torch) defines the op on the CPU and is the GPU test's reference.
"""

from __future__ import annotations

from ._common import HAVE_TRITON, next_pow2, programs, require_triton, tl, torch, triton, use_triton
from .paged_attention import _check_cache, _scale_args, device_sms
from .paged_attention_torch import write_kv_torch
from .torch_ops import rope_append_torch

ROPE_KV_PROGRAMS_PER_SM = 8

if HAVE_TRITON:
    from .paged_attention import _slot_rows, _store_kv_rows

    @triton.jit
    def _round_to(x, DT: tl.constexpr):
        """fp32 x rounded to nearest-even on DT's grid, kept in fp32. bf16 by integer arithmetic: Triton's
        interpreter casts fp32 to bf16 by truncation, so this way the interpreter, the GPU and torch agree
        (and the final cast is exact)."""
        if DT == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
            y = u.to(tl.float32, bitcast=True)
        else:
            y = x.to(DT).to(tl.float32)
        return y

    @triton.jit
    def _rotate_rows(row_ptr, offs_h, offs_d, mask, c, s, sign, HALF: tl.constexpr, D: tl.constexpr):
        """Heads offs_h of one token's qkv row (head h at row_ptr + h * D) rotated [HP, D] fp32 on the grid
        of the row's dtype: x * c (rounded to the dtype) + sign * partner * s (exact for bf16 operands),
        rounded once; partner is the other half of the head."""
        head = offs_h[:, None] * D
        x = tl.load(row_ptr + head + offs_d[None, :], mask=mask, other=0.0)
        xp = tl.load(row_ptr + head + ((offs_d + HALF) % D)[None, :], mask=mask, other=0.0)
        xc = _round_to(x.to(tl.float32) * c, x.dtype)
        return _round_to(xc + sign * (xp.to(tl.float32) * s), x.dtype)

    @triton.jit
    def _rope_kv_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
                        s_x, s_qt, s_qh, s_cos, s_sin, s_kcp, s_kct, s_kch, s_vcp, s_vct, s_vch, s_sp, s_st, s_sh,
                        T, NP,
                        HQ: tl.constexpr, HKV: tl.constexpr, HQP: tl.constexpr, HKP: tl.constexpr,
                        PS: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr):
        # (named without "write_kv" / "paged": the bench's per-op trace counts it with the other ops)
        pid = tl.program_id(0)
        HALF: tl.constexpr = D // 2
        DT: tl.constexpr = qkv_ptr.dtype.element_ty
        offs_d = tl.arange(0, D)
        offs_q = tl.arange(0, HQP)
        offs_k = tl.arange(0, HKP)
        qmask = (offs_q < HQ)[:, None]
        sign = tl.where(offs_d < HALF, -1.0, 1.0)[None, :]
        for t in range(pid, T, NP):
            t64 = t + tl.zeros([], dtype=tl.int64)
            row = qkv_ptr + t64 * s_x
            pos = tl.load(pos_ptr + t).to(tl.int64)
            # the tables rounded to qkv's dtype, as rope_append_torch indexes them
            c = _round_to(tl.load(cos_ptr + pos * s_cos + offs_d % HALF), DT)[None, :]
            s = _round_to(tl.load(sin_ptr + pos * s_sin + offs_d % HALF), DT)[None, :]
            q = _rotate_rows(row, offs_q, offs_d, qmask, c, s, sign, HALF, D)
            tl.store(q_ptr + t64 * s_qt + offs_q[:, None] * s_qh + offs_d[None, :],
                     q.to(q_ptr.dtype.element_ty), mask=qmask)
            hmask, page, off = _slot_rows(slot_ptr, t, offs_k, HKV, PS)
            kmask = hmask[:, None]
            kv = _rotate_rows(row + HQ * D, offs_k, offs_d, kmask, c, s, sign, HALF, D)
            vv = tl.load(row + (HQ + HKV) * D + offs_k[:, None] * D + offs_d[None, :], mask=kmask)
            _store_kv_rows(kv, vv, kc_ptr, vc_ptr, ks_ptr, vs_ptr, page, off, hmask, offs_k, offs_d,
                           s_kcp, s_kct, s_kch, s_vcp, s_vct, s_vch, s_sp, s_st, s_sh, FP8)


def rope_write_kv(qkv, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping, num_sms=None, *,
                  k_scales=None, v_scales=None):
    """RoPE of qkv [T, (Hq + 2 Hkv) * D] at positions [T] into q_out [T, Hq, D]; the rotated k and the v
    of each token with ``slot_mapping[t] >= 0`` into k_cache / v_cache [num_pages, page_size, Hkv, D]
    (fp8 caches: quantized per (token, kv head) row, scales into k_scales / v_scales). Triton on a CUDA
    device (or under Triton's interpreter), ``rope_write_kv_torch`` elsewhere. Returns ``q_out``."""
    if use_triton(qkv):
        return rope_write_kv_triton(qkv, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping, num_sms,
                                    k_scales=k_scales, v_scales=v_scales)
    return rope_write_kv_torch(qkv, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping,
                               k_scales=k_scales, v_scales=v_scales)


def rope_write_kv_torch(qkv, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping, num_sms=None, *,
                        k_scales=None, v_scales=None, k_out=None, v_out=None):
    """``rope_write_kv`` as the unfused ops: rope_append_torch into q_out and k/v [T, Hkv, D] (k_out /
    v_out when given, else new tensors), then write_kv_torch of those into the caches. Returns q_out."""
    T, HKV, D = qkv.shape[0], k_cache.shape[2], q_out.shape[2]
    if k_out is None:
        k_out = torch.empty((T, HKV, D), device=qkv.device, dtype=qkv.dtype)
    if v_out is None:
        v_out = torch.empty((T, HKV, D), device=qkv.device, dtype=qkv.dtype)
    rope_append_torch(qkv, positions, cos, sin, q_out, None, None, None, k_out=k_out, v_out=v_out)
    write_kv_torch(k_out, v_out, k_cache, v_cache, slot_mapping, k_scales, v_scales)
    return q_out


def rope_write_kv_triton(qkv, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping, num_sms=None, *,
                         k_scales=None, v_scales=None):
    """``rope_write_kv`` by one Triton kernel: a program per token on a persistent grid."""
    require_triton("rope_write_kv_triton")
    T, HQ, D = q_out.shape
    _check_cache(k_cache, v_cache, D)
    HKV = k_cache.shape[2]
    if tuple(qkv.shape) != (T, (HQ + 2 * HKV) * D) or qkv.stride(1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} (unit stride in its last dim) does not fit q_out "
                         f"{tuple(q_out.shape)} and {HKV} kv heads of dim {D}")
    if q_out.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1 or cos.shape[1] != D // 2:
        raise ValueError(f"q_out and the cos/sin tables [max_pos, {D // 2}] need a contiguous last dimension")
    ks, vs, s_sp, s_st, s_sh, fp8 = _scale_args(k_cache, v_cache, k_scales, v_scales)
    if T == 0:
        return q_out
    grid = programs(num_sms or device_sms(qkv.device), ROPE_KV_PROGRAMS_PER_SM, T)
    _rope_kv_kernel[(grid,)](qkv, positions, cos, sin, q_out, k_cache, v_cache, ks, vs, slot_mapping,
                             qkv.stride(0), q_out.stride(0), q_out.stride(1), cos.stride(0), sin.stride(0),
                             k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                             v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), s_sp, s_st, s_sh, T, grid,
                             HQ=HQ, HKV=HKV, HQP=next_pow2(HQ), HKP=next_pow2(HKV), PS=k_cache.shape[1], D=D,
                             FP8=fp8, num_warps=4)
    return q_out


__all__ = ["ROPE_KV_PROGRAMS_PER_SM", "rope_write_kv", "rope_write_kv_torch", "rope_write_kv_triton"]
