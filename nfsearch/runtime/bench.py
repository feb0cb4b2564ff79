"""Ceilings measured on the device in the running process: bf16 cuBLAS GEMM peak and the
device-to-device copy bandwidth (bytes read + bytes written), as a specs.Ceilings. The roofline
bound of a run report uses these."""

from __future__ import annotations

import statistics
import time

import torch

from nfsearch.specs import Ceilings


def event_times(fn, iters: int = 20, warmup: int = 3) -> list[float]:
    """Times of fn() in ms over `iters` calls after `warmup`, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def rotated(items: list, round_index: int) -> list:
    """`items` starting at item round_index mod n (the order of one timing round: rotating it round by
    round, no candidate always runs first or last)."""
    if not items:
        return []
    k = round_index % len(items)
    return list(items[k:]) + list(items[:k])


def host_times(fn, iters: int = 20, warmup: int = 3) -> list[float]:
    """Times of fn() in ms by the host clock (CPU runs: nothing to put events on)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median time of fn() in ms, CUDA events around each call."""
    return statistics.median(event_times(fn, iters, warmup))


def gemm_peak_tflops(n: int = 8192, iters: int = 20, device: str = "cuda") -> float:
    """Large bf16 GEMM through cuBLAS (torch.matmul) on random data: 2 n^3 / time."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: torch.matmul(a, b, out=c), iters)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12


def copy_bandwidth_tbps(num_bytes: int = 1 << 30, iters: int = 20, device: str = "cuda") -> float:
    """Device-to-device copy of num_bytes: (read + written bytes) / time."""
    src = torch.randn(num_bytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters)
    return 2.0 * num_bytes / (ms * 1e-3) / 1e12


GEMM_N = 8192
COPY_BYTES = 1 << 30


def ceilings(device: str = "cuda") -> Ceilings:
    return Ceilings(gemm_peak_tflops(GEMM_N, device=device), copy_bandwidth_tbps(COPY_BYTES, device=device),
                    f"{GEMM_N}^3 bf16 torch.matmul", COPY_BYTES)
