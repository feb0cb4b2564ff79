"""The "fp8" GEMM impl (kqv, o, ug, d): W8A8 e4m3, weights per output channel, activations per token.

out = a @ W (+ residual) computed as
    q_a, s_a = quantize_rows(a)                    # [M, K] e4m3, [M, 1] float32: on the device, no sync
    out      = (q_a @ q_w) * s_a * s_w             # s_w [1, N]: the scales applied in the GEMM's epilogue
    out     += residual                            # after the GEMM, in out's dtype (a bias vector: in
                                                   # the GEMM's epilogue, _scaled_mm's `bias`)
Pre-quantized activations: gemm_fp8(Fp8Rows(q_a, s_a), w, out) takes e4m3 rows and their [M, 1]
scales (kernels.quant_fp8 fuses the quantization into the RMSNorm / SiLU-and-mul before the GEMM, or
does it in one pass), so the call is the GEMM alone. One argument rather than a keyword, so wrappers
of the GEMM ops with the plain signature (engine_tp's all-reduce) pass it through untouched.
On CUDA the GEMM is one torch._scaled_mm with rowwise scales (out_dtype bf16, fp32 accumulation;
USE_FAST_ACCUM picks the tensor cores' fast FP8 accumulation). On the CPU it is the same
quantization followed by a float32 matmul of the dequantized e4m3 values, so CPU tests check the
real quantization numerics (the CPU _scaled_mm of torch 2.13 exists, but the float32 path is the
plain statement of what the GPU computes, up to the accumulation order and the bf16 output).

Numerics differ from the bf16 impls: the impl is opt-in (plan.OPT_IN_IMPLS; `nfsearch profile
--opt-in-impls fp8`, `nfsearch bench --quantization fp8`), and every engine report says so.

`w` is an runtime.fp8.Fp8Weight (the engine and the profiler quantize once, up front). A plain
[K, N] weight (runtime.model's executor hands its bf16 weights to whatever impl a plan names) is
quantized per channel on its first use and cached, keyed by the tensor and its version counter.

SM share: `num_sms` is ignored. _scaled_mm sizes its grid for the whole GPU (torch's SM carve-out
reaches cuBLASLt's per-tensor path, not the rowwise CUTLASS kernel this uses), like the "torch"
impl; on a partition it runs confined to the partition's SMs with a ragged last wave, and the
profile's rows of it are measured that way (their meta says so: IMPL_NOTE).
"""

from __future__ import annotations

import weakref

from ._common import torch
from .quant_fp8 import Fp8Rows

USE_FAST_ACCUM = True
IMPL_NOTE = ("fp8: W8A8 e4m3 (weights per output channel, activations per token, dynamic), torch._scaled_mm "
             "rowwise; full-grid kernel (num_sms ignored), measured confined to each partition")
_CACHE: dict[int, tuple] = {}        # id(bf16 weight) -> (weakref, version, Fp8Weight)


def fp8_weight(w):
    """w as an Fp8Weight: itself, or its cached per-channel quantization (a plain [K, N] tensor)."""
    from nfsearch.runtime.fp8 import Fp8Weight, quantize_weight
    if isinstance(w, Fp8Weight):
        return w
    hit = _CACHE.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == w._version:
        return hit[2]
    q, key = quantize_weight(w), id(w)
    _CACHE[key] = (weakref.ref(w, lambda _: _CACHE.pop(key, None)), w._version, q)
    return q


def gemm_fp8(a, w, out=None, num_sms: int = 0, residual=None):
    """out[M, N] = a[M, K] @ w (+ residual, an [M, N] tensor or an [N] bias), W8A8 e4m3. `a` is a
    tensor (quantized per token here) or a quant_fp8.Fp8Rows (e4m3 rows + scales: only the GEMM runs;
    the output dtype is out's, bf16 when out is None)."""
    wq = fp8_weight(w)
    if isinstance(a, Fp8Rows):
        q_a, s_a = a.data, a.scale
        dtype = out.dtype if out is not None else torch.bfloat16
    elif a.dtype == torch.float8_e4m3fn:
        raise ValueError("gemm_fp8: pass an e4m3 activation as quant_fp8.Fp8Rows(data, scale)")
    else:
        from nfsearch.runtime.fp8 import quantize_rows
        q_a, s_a = quantize_rows(a)
        dtype = a.dtype
    if q_a.is_cuda:
        bias, residual = _split_bias(residual, torch.bfloat16)
        target = out if out is not None and out.dtype == torch.bfloat16 and out.is_contiguous() else None
        y = torch._scaled_mm(q_a, wq.mat2, scale_a=s_a, scale_b=wq.scale, bias=bias, out_dtype=torch.bfloat16,
                             use_fast_accum=USE_FAST_ACCUM, **({"out": target} if target is not None else {}))
    else:
        y = (q_a.float() @ wq.mat2.float()) * s_a * wq.scale
    if out is None:
        out = y.to(dtype) if residual is None else torch.add(y.to(dtype), residual)
        return out
    if y is not out:
        out.copy_(y)
    if residual is not None:
        out.add_(residual)
    return out


def _split_bias(residual, dtype):
    """(bias [N] for _scaled_mm's epilogue, what is left to add after): a bias vector (1-D, or an [M, N]
    view of one with row stride 0, as PagedModel passes bqkv) of the output dtype goes into the GEMM;
    _scaled_mm takes only an [N] vector (it checks bias.numel() == N), so a real [M, N] residual stays
    an add after the GEMM."""
    if residual is None or residual.dtype != dtype:
        return None, residual
    if residual.dim() == 1:
        return residual.contiguous(), None
    if residual.dim() == 2 and residual.stride(0) == 0:
        return residual[0].contiguous(), None
    return None, residual


def scaled_mm_reference(q_a, s_a, wq):
    """torch._scaled_mm with rowwise scales, float32 output: what gemm_fp8 asks of the library, for tests
    (on the CPU, where torch has it)."""
    return torch._scaled_mm(q_a, wq.mat2, scale_a=s_a, scale_b=wq.scale, out_dtype=torch.float32)
