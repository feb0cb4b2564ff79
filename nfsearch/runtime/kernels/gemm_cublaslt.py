"""The "cublaslt" GEMM impl: cuBLASLt told how many SMs its partition has.

cuBLAS picks its kernel and grid for the SM count the device reports. Launched inside a green
context of fewer SMs it still sizes for the whole GPU, and the last wave runs nearly empty: on an
H100 it loses 32% on 124 of 132 SMs for a 70B shard's GEMM (docs/gpu_facts.md). cuBLASLt has a matmul
attribute for exactly this, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET ("the SMs a concurrent stream
leaves us"), and torch sets it from its SM carve-out (`torch._C._set_sm_carveout_experimental`:
target = device SMs - carve-out) on its cuBLASLt path. So this impl runs the same torch call as the
"torch" impl with cuBLASLt as torch's BLAS backend and a carve-out of (device SMs - num_sms), then
puts both settings back. The choice is made when the call is issued, so a CUDA graph captures the
kernel chosen for the partition.

Why it is opt-in (docs/kernels.md): on an H100, alone in the profiler's CUDA graphs, it beats the
TMA GEMM on 96-120 SMs by up to 15-20% (kqv, o, d at 2048 tokens), yet a W2 plan of the same
structure runs 2.24-2.26 ms/layer with it and 1.97-2.00 with the TMA GEMM, drawing 1.58-1.61 against
1.38-1.40 J per layer: under the power cap the energy decides. So `nfsearch profile` leaves it
out unless asked (plan.OPT_IN_IMPLS).

torch names the carve-out experimental: where it is missing (`HAVE_SM_TARGET` False) the impl is not
registered. On a CPU tensor it is the torch impl (there is no partition to size for).
"""

from __future__ import annotations

from ._common import torch
from .torch_ops import gemm_torch

HAVE_SM_TARGET = torch is not None and hasattr(torch._C, "_set_sm_carveout_experimental") \
    and hasattr(torch._C, "_get_sm_carveout_experimental") and hasattr(torch.backends.cuda, "preferred_blas_library")

def gemm_cublaslt(a, w, out=None, num_sms: int = 0, residual=None):
    """out = a @ w (+ residual), one cuBLASLt call whose heuristic targets `num_sms` SMs (0 or the
    whole device: no target)."""
    if not a.is_cuda:
        return gemm_torch(a, w, out, num_sms, residual)
    if not HAVE_SM_TARGET:
        raise RuntimeError("gemm_cublaslt: this torch has no SM carve-out for cuBLASLt")
    whole = torch.cuda.get_device_properties(a.device).multi_processor_count     # torch caches these
    carveout = whole - num_sms if 0 < num_sms < whole else None
    backend, previous = torch.backends.cuda.preferred_blas_library(), torch._C._get_sm_carveout_experimental()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(carveout)
    try:
        return gemm_torch(a, w, out, num_sms, residual)
    finally:
        torch._C._set_sm_carveout_experimental(previous)
        torch.backends.cuda.preferred_blas_library(backend)
