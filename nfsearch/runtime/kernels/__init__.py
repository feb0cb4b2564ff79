"""SM-bounded kernels of one transformer layer, and the library kernels beside them.

``IMPLS[op][impl]`` is a callable; ``impl`` is ``"triton"`` (ours: persistent grid sized by the
``num_sms`` argument) or ``"torch"`` (cuBLAS / SDPA / torch ops on the full GPU; ``num_sms`` ignored).
Call signatures by op:

* ``norm1``, ``norm2``: ``f(x, weight, out, num_sms, eps=1e-5, residual=None, residual_out=None)``
* ``kqv``, ``o``, ``ug``, ``d``: ``f(a, w, out, num_sms, residual=None)``  (out = a @ w (+ residual))
* ``rope_append``: ``f(qkv, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping, num_sms,
  k_out=None, v_out=None)``
* ``decode_attn``: ``f(q, k_cache, v_cache, context_lens, out, num_sms, scale=None)``
* ``prefill_attn``: ``f(q, k, v, cu_seqlens, out, num_sms, scale=None)``
* ``act``: ``f(x, out, num_sms)``  (SiLU-and-mul, [T, 2I] -> [T, I])

Importing this package needs neither triton nor a GPU; calling a "triton" impl without triton
raises a RuntimeError that says so.
"""

from __future__ import annotations

from ._common import HAVE_TRITON
from .decode_attention import decode_attention, decode_attention_torch
from .gemm import gemm, gemm_torch
from .prefill_attention import prefill_attention, prefill_attention_torch
from .small_ops import (rmsnorm, rmsnorm_torch, rope_append, rope_append_torch, silu_and_mul,
                        silu_and_mul_torch)

OPS = ("norm1", "kqv", "rope_append", "decode_attn", "prefill_attn", "o", "norm2", "ug", "act", "d")

IMPLS: dict[str, dict[str, object]] = {
    "norm1": {"triton": rmsnorm, "torch": rmsnorm_torch},
    "kqv": {"triton": gemm, "torch": gemm_torch},
    "rope_append": {"triton": rope_append, "torch": rope_append_torch},
    "decode_attn": {"triton": decode_attention, "torch": decode_attention_torch},
    "prefill_attn": {"triton": prefill_attention, "torch": prefill_attention_torch},
    "o": {"triton": gemm, "torch": gemm_torch},
    "norm2": {"triton": rmsnorm, "torch": rmsnorm_torch},
    "ug": {"triton": gemm, "torch": gemm_torch},
    "act": {"triton": silu_and_mul, "torch": silu_and_mul_torch},
    "d": {"triton": gemm, "torch": gemm_torch},
}

__all__ = ["HAVE_TRITON", "IMPLS", "OPS", "decode_attention", "decode_attention_torch", "gemm", "gemm_torch",
           "prefill_attention", "prefill_attention_torch", "rmsnorm", "rmsnorm_torch", "rope_append",
           "rope_append_torch", "silu_and_mul", "silu_and_mul_torch"]
