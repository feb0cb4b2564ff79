"""SM-bounded kernels of one transformer layer, and the library kernels beside them.

``IMPLS[op][impl]`` is a callable; ``impl`` is one of

* ``"triton"``: ours, pointer-based Triton, persistent grid sized by the ``num_sms`` argument;
* ``"torch"``: the layer as a straightforward torch user writes it, bf16: F.rms_norm, cuBLAS, RoPE by
  indexing, SDPA (``num_sms`` ignored; ``torch_ops``). These are also the reference every other impl
  is checked against, and what the seq-torch baseline runs;
* ``"tma"`` (kqv, o, ug, d, decode_attn): Triton with TMA tensor descriptors; the GEMM runs exactly
  ``num_sms`` persistent programs with a stream-K tail (whole waves on any partition), decode
  attention streams K/V through TMA into shared memory (``gemm_tma``, ``decode_tma``);
* ``"flash"`` (prefill_attn): torch's FlashAttention-2 varlen kernel, one launch for all prompts,
  no host sync when ``cu_seqlens`` is on the GPU (``prefill_flash``);
* ``"cublaslt"`` (kqv, o, ug, d): the torch call through cuBLASLt with its SM-count target set to
  ``num_sms`` (torch's SM carve-out), so cuBLAS sizes its kernel for the partition it runs on
  (``gemm_cublaslt``; registered where torch has the carve-out; `nfsearch profile` measures it only
  with ``--opt-in-impls cublaslt``, plan.OPT_IN_IMPLS says why);
* ``"fp8"`` (kqv, o, ug, d): W8A8 e4m3, the weight an ``runtime.fp8.Fp8Weight`` (per output channel),
  the activation quantized per token on the fly, ``torch._scaled_mm`` with rowwise scales on CUDA (a
  float32 matmul of the dequantized values on the CPU); full grid, ``num_sms`` ignored. Opt-in: it
  changes numerics (``gemm_fp8``; `nfsearch profile --opt-in-impls fp8`, plan.OPT_IN_IMPLS);
* ``"cuda"`` (norm1, norm2, act, rope_append): raw CUDA kernels (``small_ops.cu``) compiled by
  NVRTC through ``cupy.RawModule`` and launched on torch's current stream (``small_ops_cuda``);
* ``"paged"`` (decode_attn, prefill_attn): the serving engine's attention over its paged KV cache
  (``paged_attention``), behind these signatures: the contiguous K/V copied once into shuffled
  16-token pages, the engine's kernel on ``num_sms`` (``paged_adapters``). What a plan family prices
  the engine's attention with; opt-in (`nfsearch profile --family`, or ``--opt-in-impls paged``), and
  a profile's lookups leave it out except in a family's engine view (plan.ENGINE_IMPLS);
* ``"paged_fp8kv"`` (decode_attn, prefill_attn): the same over the engine's fp8 KV cache
  (``--kv-cache-dtype fp8``: e4m3 with a float32 scale per token and kv head), what a family solved
  for an fp8 cache prices attention with (`nfsearch profile --family` of such a family).

See docs/kernels.md for which impl wins where. Call signatures by op:

* ``norm1``, ``norm2``: ``f(x, weight, out, num_sms, eps=1e-5, residual=None, residual_out=None)``
* ``kqv``, ``o``, ``ug``, ``d``: ``f(a, w, out, num_sms, residual=None)``  (out = a @ w (+ residual))
* ``rope_append``: ``f(qkv, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping, num_sms,
  k_out=None, v_out=None)``
* ``decode_attn``: ``f(q, k_cache, v_cache, context_lens, out, num_sms, scale=None)`` (the torch impl
  also takes ``context_lens`` None: every request attends to its whole cache; the paged impls also take
  ``max_context``: their page tables' width in tokens, the engine bucket's context cap)
* ``prefill_attn``: ``f(q, k, v, cu_seqlens, out, num_sms, scale=None)`` (the paged impl also takes
  ``prefix_lens``: each prompt is a chunk after that many cached tokens of its request; its profile
  row (tokens, context) is ``paged_adapters.prefill_chunks``)
* ``act``: ``f(x, out, num_sms)``  (SiLU-and-mul, [T, 2I] -> [T, I])

Importing this package needs neither triton, cupy nor a GPU; calling a "triton" impl without triton
raises a RuntimeError that says so.
"""

from __future__ import annotations

from nfsearch.plan import OPT_IN_IMPLS

from ._common import HAVE_TRITON
from .decode_attention import decode_attention
from .decode_tma import decode_attention_tma
from .gemm import gemm
from .gemm_cublaslt import HAVE_SM_TARGET, gemm_cublaslt
from .gemm_fp8 import IMPL_NOTE as FP8_NOTE
from .gemm_fp8 import fp8_weight, gemm_fp8
from .gemm_tma import gemm_tma
from .paged_adapters import paged_decode_attn, paged_fp8kv_decode_attn, paged_fp8kv_prefill_attn, paged_prefill_attn
from .prefill_attention import prefill_attention
from .prefill_flash import prefill_attention_flash, prefill_attention_sdpa
from .small_ops import rmsnorm, rope_append, silu_and_mul
from .small_ops_cuda import rmsnorm_cuda, rope_append_cuda, silu_and_mul_cuda
from .torch_ops import (
    decode_attention_torch,
    gemm_torch,
    prefill_attention_torch,
    rmsnorm_torch,
    rope_append_torch,
    rope_cos_sin,
    silu_and_mul_torch,
)

OPS = ("norm1", "kqv", "rope_append", "decode_attn", "prefill_attn", "o", "norm2", "ug", "act", "d")

IMPLS: dict[str, dict[str, object]] = {
    "norm1": {"triton": rmsnorm, "torch": rmsnorm_torch, "cuda": rmsnorm_cuda},
    "kqv": {"triton": gemm, "torch": gemm_torch, "tma": gemm_tma},
    "rope_append": {"triton": rope_append, "torch": rope_append_torch, "cuda": rope_append_cuda},
    "decode_attn": {"triton": decode_attention, "torch": decode_attention_torch, "tma": decode_attention_tma,
                    "paged": paged_decode_attn, "paged_fp8kv": paged_fp8kv_decode_attn},
    "prefill_attn": {"triton": prefill_attention, "torch": prefill_attention_torch, "flash": prefill_attention_flash,
                     "paged": paged_prefill_attn, "paged_fp8kv": paged_fp8kv_prefill_attn},
    "o": {"triton": gemm, "torch": gemm_torch, "tma": gemm_tma},
    "norm2": {"triton": rmsnorm, "torch": rmsnorm_torch, "cuda": rmsnorm_cuda},
    "ug": {"triton": gemm, "torch": gemm_torch, "tma": gemm_tma},
    "act": {"triton": silu_and_mul, "torch": silu_and_mul_torch, "cuda": silu_and_mul_cuda},
    "d": {"triton": gemm, "torch": gemm_torch, "tma": gemm_tma},
}
if HAVE_SM_TARGET:
    for _op in ("kqv", "o", "ug", "d"):
        IMPLS[_op]["cublaslt"] = gemm_cublaslt
GEMM_OPS = ("kqv", "o", "ug", "d")
for _op in GEMM_OPS:
    IMPLS[_op]["fp8"] = gemm_fp8
# what a profile measured with an opt-in impl records about it (its meta's impl_notes)
IMPL_NOTES = {"fp8": FP8_NOTE}


def weight_for(impl: str, w):
    """The weight a GEMM impl takes for the bf16 weight w [K, N]: fp8 quantizes it (per output
    channel; cached per tensor), every other impl takes w itself."""
    return fp8_weight(w) if impl == "fp8" else w


def profiled_impls(opt_in=()) -> dict[str, tuple[str, ...]]:
    """The impls `nfsearch profile` measures per op: every registered one, but those of
    plan.OPT_IN_IMPLS only where named in `opt_in`."""
    return {op: tuple(i for i in impls if i not in OPT_IN_IMPLS or i in opt_in) for op, impls in IMPLS.items()}

__all__ = ["GEMM_OPS", "HAVE_TRITON", "IMPLS", "IMPL_NOTES", "OPS", "decode_attention",
           "decode_attention_tma", "decode_attention_torch", "gemm", "gemm_cublaslt", "gemm_fp8", "gemm_tma",
           "gemm_torch", "paged_decode_attn", "paged_fp8kv_decode_attn", "paged_fp8kv_prefill_attn", "paged_prefill_attn", "prefill_attention", "prefill_attention_flash", "prefill_attention_sdpa",
           "prefill_attention_torch", "profiled_impls", "rmsnorm", "rmsnorm_cuda", "rmsnorm_torch",
           "rope_append", "rope_append_cuda", "rope_append_torch", "rope_cos_sin", "silu_and_mul",
           "silu_and_mul_cuda", "silu_and_mul_torch", "weight_for"]
