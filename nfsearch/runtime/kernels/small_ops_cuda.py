"""Raw CUDA versions of the memory-bound ops (``small_ops.cu``), loaded through ``cupy.RawModule``.

Same signatures as the Triton impls in ``small_ops``. The kernels are compiled once per process by
NVRTC (cupy is imported on first call, so CPU-only installs import this module fine) and launched on
torch's current stream, so they run inside whatever green-context stream the caller selected. Torch
tensors are passed as raw device pointers (``data_ptr``); the host checks the 16-byte alignment the
vector loads need and falls back to the Triton impl otherwise.

Grid: ``num_sms`` times the CTAs that fit on one SM at once (from the kernel's register count, at
most ``CTAS_PER_SM``), each walking its share with a grid-stride loop: a grid larger than what is
resident would leave a late second wave (2x slower at 16-32 SMs of an H100).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ._common import torch
from .small_ops import rmsnorm, rope_append, silu_and_mul

CTAS_PER_SM = 8
THREADS = 256
RMS_ITEMS = (1, 2, 4, 8)

_STATE: dict = {}


def _cupy():
    if "cupy" not in _STATE:
        try:
            import cupy
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError("the 'cuda' impls need cupy (e.g. pip install cupy-cuda12x)") from exc
        _STATE["cupy"] = cupy
    return _STATE["cupy"]


def _module():
    mod = _STATE.get("mod")
    if mod is None:
        cp = _cupy()
        src = Path(__file__).with_name("small_ops.cu").read_text()
        mod = cp.RawModule(code=src, options=("--std=c++17",),
                           name_expressions=[f"rmsnorm_kernel<{i}>" for i in RMS_ITEMS])
        _STATE["mod"] = mod
    return mod


def _kernel(name):
    ks = _STATE.setdefault("kernels", {})
    if name not in ks:
        ks[name] = _module().get_function(name)
    return ks[name]


def _fit(name, block):
    """CTAs of ``block`` threads that are resident on one SM at once (registers, threads)."""
    key = ("fit", name, block)
    if key not in _STATE:
        regs = max(1, int(getattr(_kernel(name), "num_regs", 64) or 64))
        _STATE[key] = max(1, min(CTAS_PER_SM, 65536 // (regs * block), 2048 // block))
    return _STATE[key]


def _launch(name, device, grid, block, args):
    cp = _cupy()
    sid = torch.cuda.current_stream(device).cuda_stream
    streams = _STATE.setdefault("streams", {})
    st = streams.get(sid)
    if st is None:
        with warnings.catch_warnings():
            # CuPy 14 deprecates ExternalStream for Stream.from_external (an object with __cuda_stream__);
            # what torch hands us is the raw handle, which ExternalStream still takes as before
            warnings.simplefilter("ignore", DeprecationWarning)
            st = streams[sid] = cp.cuda.ExternalStream(sid, device.index or 0)
    with cp.cuda.Device(device.index or 0):
        _kernel(name)((int(grid),), (int(block),), args, stream=st)


def _p(t):
    import numpy as np

    return np.uint64(t.data_ptr()) if t is not None else np.uint64(0)


def _i32(x):
    import numpy as np

    return np.int32(x)


def _i64(x):
    import numpy as np

    return np.int64(x)


def _aligned(*ts) -> bool:
    """16-byte vectors: unit inner stride, 16-byte aligned bases and row strides (bf16: multiples of 8)."""
    for t in ts:
        if t is None:
            continue
        if t.dtype != torch.bfloat16 or t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any(s % 8 for s in t.stride()[:-1]):
            return False
    return True


def _grid(num_sms, work, per_cta=1, name=None, block=THREADS):
    n = max(1, int(num_sms)) * (_fit(name, block) if name else CTAS_PER_SM)
    return max(1, min(n, -(-int(work) // per_cta)))


def rmsnorm_cuda(x, weight, out, num_sms: int, eps: float = 1e-5, residual=None, residual_out=None):
    """out = rmsnorm(h) * weight, h = x (+ residual); residual_out gets h. See small_ops.rmsnorm."""
    T, H = x.shape
    pick = None
    for items in RMS_ITEMS:  # threads per CTA closest to 256 with H == items * threads * 8
        if H % (8 * items) == 0:
            thr = H // (8 * items)
            if thr % 32 == 0 and 64 <= thr <= 1024 and (pick is None or abs(thr - 256) < abs(pick[1] - 256)):
                pick = (items, thr)
    if pick is None or not _aligned(x, out, residual, residual_out, weight):
        return rmsnorm(x, weight, out, num_sms, eps=eps, residual=residual, residual_out=residual_out)
    items, thr = pick
    if T == 0:
        return out
    r = residual if residual is not None else x
    ro = residual_out if residual_out is not None else out
    args = (_p(x), _p(r), _p(weight), _p(out), _p(ro), _i32(T), _i32(H), _i64(x.stride(0)), _i64(r.stride(0)),
            _i64(out.stride(0)), _i64(ro.stride(0)), __import__("numpy").float32(eps),
            _i32(residual is not None), _i32(residual_out is not None))
    name = f"rmsnorm_kernel<{items}>"
    _launch(name, x.device, _grid(num_sms, T, 1, name, thr), thr, args)
    return out


def silu_and_mul_cuda(x, out, num_sms: int):
    """out[T, I] = silu(x[:, :I]) * x[:, I:]. See small_ops.silu_and_mul."""
    T, I2 = x.shape
    I = I2 // 2
    assert tuple(out.shape) == (T, I)
    if I % 8 or not _aligned(x, out):
        return silu_and_mul(x, out, num_sms)
    if T == 0:
        return out
    args = (_p(x), _p(out), _i64(T), _i32(I), _i64(x.stride(0)), _i64(out.stride(0)))
    _launch("silu_mul_kernel", x.device, _grid(num_sms, T * (I // 8), THREADS * 2, "silu_mul_kernel"), THREADS, args)
    return out


def rope_append_cuda(qkv, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping, num_sms: int,
                     k_out=None, v_out=None):
    """RoPE on q/k + KV-cache append (+ k_out/v_out). See small_ops.rope_append."""
    T = qkv.shape[0]
    HQ, D = q_out.shape[1], q_out.shape[2]
    HKV = k_cache.shape[2]
    has_kv = k_out is not None and v_out is not None
    ok = (D % 16 == 0 and qkv.shape[1] == (HQ + 2 * HKV) * D and cos.dtype == torch.float32
          and sin.dtype == torch.float32 and cos.stride(1) == 1 and sin.stride() == cos.stride()
          and _aligned(qkv, q_out, k_cache, v_cache, *((k_out, v_out) if has_kv else ())))
    if not ok:
        return rope_append(qkv, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping, num_sms,
                           k_out=k_out, v_out=v_out)
    if T == 0:
        return q_out
    pos = positions if positions.dtype == torch.int32 else positions.to(torch.int32)
    slot = slot_mapping if slot_mapping.dtype == torch.int32 else slot_mapping.to(torch.int32)
    pos, slot = pos.contiguous(), slot.contiguous()
    ko = k_out if has_kv else k_cache
    vo = v_out if has_kv else v_cache
    args = (_p(qkv), _p(pos), _p(cos), _p(sin), _p(q_out), _p(k_cache), _p(v_cache), _p(slot), _p(ko), _p(vo),
            _i32(T), _i32(HQ), _i32(HKV), _i32(D), _i64(qkv.stride(0)), _i64(q_out.stride(0)), _i64(q_out.stride(1)),
            _i64(k_cache.stride(0)), _i64(k_cache.stride(1)), _i64(k_cache.stride(2)),
            _i64(v_cache.stride(0)), _i64(v_cache.stride(1)), _i64(v_cache.stride(2)),
            _i64(ko.stride(0)), _i64(ko.stride(1)), _i64(vo.stride(0)), _i64(vo.stride(1)),
            _i64(cos.stride(0)), _i32(has_kv),
            _i32(cos.stride(0) % 4 == 0 and cos.data_ptr() % 16 == 0 and sin.data_ptr() % 16 == 0))
    work = T * (HQ + 2 * HKV) * (D // 16)
    _launch("rope_append_kernel", qkv.device, _grid(num_sms, work, THREADS, "rope_append_kernel"), THREADS, args)
    return q_out
