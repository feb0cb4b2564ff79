"""What a bench run reports beside tokens/s: GPU idle, the variants of --compare, the per-op trace of
one iteration per bucket, power and clocks.

GPU idle = host wall time minus GPU busy time, busy being the sum of the CUDA-event times around
each iteration's replay (read one iteration late, never waited for on their own). An iteration's
wall time, for the variants' comparison, is the host time from its launch to the next launch: in
steady state the loop is paced by the GPU, so that is the GPU time plus whatever gap the host left.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise
from dataclasses import asdict, dataclass

import torch

from nfsearch.runtime.engine import EngineRun

OP_CLASSES = ("gemm", "attention", "other")
_GEMM_WORDS = ("gemm", "matmul", "cutlass", "nvjet", "xmma", "aten::mm", "aten::addmm", "aten::linear")
_ATTN_WORDS = ("attn", "attention", "paged", "decode", "prefill", "flash", "einsum", "softmax", "write_kv")


@dataclass
class Window:
    """GPU busy and idle over [start_s, end_s] of a run (iterations launched inside it)."""
    start_s: float
    end_s: float
    num_iterations: int
    num_tokens: int
    num_decode_rows: int
    gpu_busy_s: float

    @property
    def mean_decode_batch(self) -> float:
        return self.num_decode_rows / max(self.num_iterations, 1)

    @property
    def wall_s(self) -> float:
        return max(self.end_s - self.start_s, 1e-12)

    @property
    def idle_pct(self) -> float:
        return max(0.0, 100.0 * (1.0 - self.gpu_busy_s / self.wall_s))

    def to_dict(self) -> dict:
        return asdict(self) | {"wall_s": self.wall_s, "idle_pct": self.idle_pct,
                               "mean_decode_batch": self.mean_decode_batch,
                               "iterations_per_s": self.num_iterations / self.wall_s}


def window(run: EngineRun, start_s: float, end_s: float) -> Window:
    its = [r for r in run.iterations if start_s <= r.launch_s <= end_s]
    return Window(start_s, end_s, len(its), sum(r.num_tokens for r in its), sum(r.num_decode for r in its),
                  sum(r.gpu_ms for r in its) / 1e3)


@dataclass
class VariantStats:
    variant: str
    num_iterations: int
    num_tokens: int                  # real rows (prompt chunks + decode rows) of its iterations
    wall_s: float                    # launch to next launch, summed
    gpu_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.wall_s, 1e-12)

    @property
    def gpu_ms_per_iteration(self) -> float:
        return 1e3 * self.gpu_s / max(self.num_iterations, 1)

    @property
    def gpu_us_per_token(self) -> float:
        return 1e6 * self.gpu_s / max(self.num_tokens, 1)

    def to_dict(self) -> dict:
        return asdict(self) | {"tokens_per_s": self.tokens_per_s, "gpu_ms_per_iteration": self.gpu_ms_per_iteration,
                               "gpu_us_per_token": self.gpu_us_per_token}


def variant_stats(run: EngineRun, start_s: float, end_s: float) -> list[VariantStats]:
    """Per variant over the iterations launched in [start_s, end_s] (the last iteration has no next
    launch and is left out)."""
    acc = defaultdict(lambda: [0, 0, 0.0, 0.0])
    its = run.iterations
    for rec, nxt in pairwise(its):
        if start_s <= rec.launch_s <= end_s:
            a = acc[rec.variant]
            a[0] += 1
            a[1] += rec.num_tokens
            a[2] += nxt.launch_s - rec.launch_s
            a[3] += rec.gpu_ms / 1e3
    return [VariantStats(v, *acc[v]) for v in sorted(acc)]


# ------------------------------------------------------------------------------------ op trace
def op_class(name: str) -> str:
    low = name.lower()
    if any(w in low for w in _GEMM_WORDS):
        return "gemm"
    if any(w in low for w in _ATTN_WORDS):
        return "attention"
    return "other"


def op_trace(engine, variant: str = "plan", buckets=None) -> list[dict]:
    """One eager forward of a full dry batch per bucket under torch.profiler: device time (CPU time on
    the CPU) by op class, and the top kernels. Writes K/V of pages the dry batch names only, so run it
    after the bench (or before), never while requests are live."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if engine.is_cuda else ProfilerActivity.CPU
    rows = []
    for i, bucket in enumerate(engine.buckets):
        if buckets is not None and bucket not in buckets:
            continue
        engine.runner.run_dry(variant, bucket)            # warm
        engine._sync()
        with profile(activities=[activity]) as prof:
            engine.runner.run_dry(variant, bucket)
            engine._sync()
        by_class, kernels = {c: 0.0 for c in OP_CLASSES}, []
        for event in prof.key_averages():
            us = _self_time_us(event, engine.is_cuda)
            if us <= 0:
                continue
            by_class[op_class(event.key)] += us / 1e3
            kernels.append((us / 1e3, event.key[:80], event.count))
        kernels.sort(reverse=True)
        rows.append({"bucket": i, **asdict(bucket), "ms_by_class": by_class, "total_ms": sum(by_class.values()),
                     "top_kernels": [{"ms": ms, "name": name, "count": n} for ms, name, n in kernels[:8]]})
    return rows


def _self_time_us(event, is_cuda: bool) -> float:
    if is_cuda:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, attr):
                return float(getattr(event, attr))
        return 0.0
    return float(event.self_cpu_time_total)


# ------------------------------------------------------------------------------------ power
def power_summary(samples, t0_perf: float, start_s: float, end_s: float, energy_j: float | None,
                  num_tokens: int) -> dict:
    """NVML samples (runtime.power.Sampler) inside [start_s, end_s] of the run (run clock, t0_perf the
    run's perf_counter start) and the whole run's counter energy per token."""
    from nfsearch.runtime.power import summarize
    inside = [s for s in samples if start_s <= s.time_s - t0_perf <= end_s]
    s = summarize(inside)
    mean_w = sum(x.power_w for x in inside) / len(inside) if inside else None
    return {"num_samples": s.num_samples, "mean_power_w": mean_w, "median_sm_clock_mhz": s.sm_clock_mhz,
            "min_sm_clock_mhz": s.min_sm_clock_mhz, "power_capped_share": s.capped_share,
            "reasons": dict(s.reasons), "run_energy_j": energy_j,
            "joules_per_token": energy_j / num_tokens if energy_j and num_tokens else None}


def count_params(spec) -> int:
    """Parameters in the layers (GEMM weights) and the LM head: what optimal throughput divides by."""
    per_layer = spec.hidden_size * (spec.q_size + 2 * spec.kv_size) + spec.q_size * spec.hidden_size \
        + 3 * spec.hidden_size * spec.intermediate_size
    return spec.num_layers * per_layer + spec.hidden_size * spec.vocab_size


def gpu_peak_flops(device) -> float | None:
    """P_gemm measured now: a large bf16 cuBLAS GEMM (runtime.bench's ceiling), in FLOP/s."""
    if torch.device(device).type != "cuda":
        return None
    from nfsearch.runtime.bench import gemm_peak_tflops
    return gemm_peak_tflops(device=str(device)) * 1e12
