"""Lazy access to torch and triton, so that importing the kernels works on CPU-only machines."""

from __future__ import annotations

import os

try:  # pragma: no cover - depends on the machine
    import torch
except ImportError:  # pragma: no cover
    torch = None

try:  # pragma: no cover - depends on the machine
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # noqa: BLE001 - triton missing or broken (e.g. no GPU toolchain)
    triton = None
    tl = None
    HAVE_TRITON = False


# Triton's interpreter runs the kernels on CPU tensors: dispatchers that route CPU tensors to torch take
# the Triton kernel under it, so CPU tests reach the GPU path
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t) -> bool:
    """Whether a dispatcher runs its Triton kernel on tensor t: on a CUDA device, or under the interpreter."""
    return HAVE_TRITON and (t.is_cuda or INTERPRET)


def require_triton(what: str) -> None:
    """Raise a clear error when a Triton kernel is called without Triton."""
    if not HAVE_TRITON:
        raise RuntimeError(f"{what} needs triton (pip install triton); only the 'torch' impls work without it")
    if torch is None:
        raise RuntimeError(f"{what} needs torch")


def programs(num_sms: int, programs_per_sm: int, work_items: int) -> int:
    """Persistent grid size: num_sms * programs_per_sm, never more than the work items, at least 1."""
    return max(1, min(int(num_sms) * int(programs_per_sm), int(work_items)))


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
