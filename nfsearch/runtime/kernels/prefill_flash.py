"""Prefill attention through torch's flash-attention kernels, one varlen launch for all prompts.

``prefill_attention_flash(q, k, v, cu_seqlens, out, num_sms, scale=None, max_seqlen=None)``: causal
GQA attention of each packed prompt (``q[T,Hq,D]``, ``k/v[T,Hkv,D]``, ``cu_seqlens[P+1]`` int32),
computed by ``aten._flash_attention_forward`` in its varlen form (FlashAttention-2, GQA native: no
repeated K/V). It is not SM-bounded by its grid; it runs inside a partition when launched on a
green-context stream (``num_sms`` is ignored).

``cu_seqlens`` may live on the host (exact ``max_seqlen``, one small H2D copy) or on the GPU (no host
sync: ``max_seqlen`` defaults to T, an upper bound; the extra query blocks exit at once), so the call
can be captured in a CUDA graph when the offsets are on the device.

``prefill_attention_sdpa``: the per-prompt ``F.scaled_dot_product_attention`` path restricted to the
flash backend (the existing "torch" impl lets SDPA choose, and with ``enable_gqa`` it may leave the
flash kernel).
"""

from __future__ import annotations

from ._common import torch


def prefill_attention_flash(q, k, v, cu_seqlens, out, num_sms: int = 0, scale=None, max_seqlen=None):
    T = q.shape[0]
    if cu_seqlens.device.type != q.device.type:
        host = [int(c) for c in cu_seqlens.tolist()]
        mx = max((b - a for a, b in zip(host[:-1], host[1:])), default=0)
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32, non_blocking=True)
    else:
        cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
        mx = T
    if max_seqlen is not None:
        mx = int(max_seqlen)
    mx = max(1, mx)
    res = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, mx, mx, 0.0, True, False, scale=scale)
    out.copy_(res[0])
    return out


def prefill_attention_sdpa(q, k, v, cu_seqlens, out, num_sms: int = 0, scale=None):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cu = [int(c) for c in cu_seqlens.tolist()]
    G = q.shape[1] // k.shape[1]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        for s0, s1 in zip(cu[:-1], cu[1:]):
            if s1 <= s0:
                continue
            kk, vv = k[s0:s1], v[s0:s1]
            if G > 1:  # the flash backend takes equal head counts
                kk = kk.repeat_interleave(G, dim=1)
                vv = vv.repeat_interleave(G, dim=1)
            o = F.scaled_dot_product_attention(q[s0:s1].transpose(0, 1)[None], kk.transpose(0, 1)[None],
                                               vv.transpose(0, 1)[None], is_causal=True, scale=scale)
            out[s0:s1] = o[0].transpose(0, 1)
    return out
