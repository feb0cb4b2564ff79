"""The one roofline: the bound of one layer (docs/workloads.md) and the analytic profile built from it.

`roofline` gives FLOPs, bytes, network bytes, T_compute, T_mem, T_net and the bound of one layer.
`analytic_profile` is a profile table of kernel times from the same work over a GPU's rates,
labelled `analytic`, so everything works before a measured table exists. Time of an op on s SMs:
    max(FLOPs / (peak * s / S / tile_efficiency), bytes / (bandwidth * bw_fraction(s))) + launch
where bw_fraction(s) is the share of the copy ceiling that a streaming kernel confined to s SMs
pulls (on an H100, docs/gpu_facts.md) and tile_efficiency counts GEMM tile and wave
quantisation. Network ops: bytes sent / (bus bandwidth * cta_fraction(s)) + latency.

Network ops also get co-run rows (co_class compute, memory, other): their time beside another class's
op on the rest of the GPU, from NET_CORUN_FRACTION (all-reduce beside a GEMM in the other green
context, on 2 and 4 H100s, docs/gpu_facts.md "The network"). Without them the cost model
would fall back to NanoFlow's A100 network curve and apply it over a solo time that is already
SM-limited (a 16-SM all-reduce would cost 2.3x its full-GPU time where 1.3x was measured): the double
penalty that kept every TP plan sequential.
"""

import datetime
import math
from dataclasses import dataclass

import pandas as pd

from nfsearch.graph import Op, Work, batch_work, layer_ops, op_context, op_work, shard_signature
from nfsearch.profile import ProfileTable, Scaling, gpu_from_profile
from nfsearch.specs import GpuSpec, ModelSpec, Workload


@dataclass(frozen=True)
class Roofline:
    flops: float
    num_bytes: float
    net_bytes: float
    compute_ms: float
    mem_ms: float
    net_ms: float
    num_tokens: int
    num_layers: int

    @property
    def ratio(self) -> float:
        """TR = T_mem / T_compute."""
        return self.mem_ms / self.compute_ms

    @property
    def bound_ms(self) -> float:
        return max(self.compute_ms, self.mem_ms, self.net_ms)

    @property
    def tokens_per_s(self) -> float:
        """Optimal throughput: tokens in the batch / (bound x layers)."""
        return self.num_tokens / (self.bound_ms * 1e-3 * self.num_layers)


def layer_work(model: ModelSpec, workload: Workload) -> Work:
    """The layer's work over the batch that runs (graph.batch_work: each decode request at its own
    context, each prefill chunk's own pairs)."""
    total = Work()
    for op in layer_ops(model, workload):
        total = total + batch_work(op, model, workload)
    return total


def roofline(model: ModelSpec, workload: Workload, gpu: GpuSpec) -> Roofline:
    """The roofline of one layer on `gpu`'s rates. The one roofline of a plan is this on the rates of
    the profile it is priced with (`profile_roofline`): analyze, solve and simulate all print that."""
    work = layer_work(model, workload)
    return Roofline(
        flops=work.flops,
        num_bytes=work.num_bytes,
        net_bytes=work.net_bytes,
        compute_ms=work.flops / (gpu.peak_tflops * 1e9),
        mem_ms=work.num_bytes / (gpu.mem_bandwidth_tbps * 1e9),
        net_ms=work.net_bytes / (gpu.net_bandwidth_gbps * 1e6),
        num_tokens=workload.num_tokens,
        num_layers=model.num_layers,
    )


def profile_roofline(model: ModelSpec, workload: Workload, profile: ProfileTable) -> Roofline:
    """The roofline on the rates of the GPU `profile` was made on (its measured ceilings where it has
    them, profile.gpu_from_profile): the bound every command states for a plan priced with it."""
    return roofline(model, workload, gpu_from_profile(profile))


def op_floor_ms(op: Op, model: ModelSpec, workload: Workload, gpu: GpuSpec, tokens: int,
                context: float) -> float:
    """The op's own roofline on the whole GPU: no time of it, measured or scaled, is taken below this
    outside a profile's grid."""
    work = op_work(op, model, workload, tokens, context)
    return max(work.flops / (gpu.peak_tflops * 1e9), work.num_bytes / (gpu.mem_bandwidth_tbps * 1e9),
               work.net_bytes / (gpu.net_bandwidth_gbps * 1e6))


def op_scaling(op: Op, model: ModelSpec, workload: Workload, gpu: GpuSpec) -> Scaling:
    """How a profile lookup of `op` outside its measured grid scales (profile.Scaling): by the shape of
    the op's analytic time on the same SM count (linear in tokens and context where it is bound by
    work, flat where launch or weight reads bound it: a GEMM's weights cost the same for 1 token as
    for 64), never below the op's roofline on the whole GPU."""
    return Scaling(lambda n, c, s: op_time_ms(op, model, workload, gpu, n, c, s),
                   lambda n, c: op_floor_ms(op, model, workload, gpu, n, c))


TOKEN_GRID = (64, 128, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096, 6144, 8192)
DECODE_CONTEXTS = (256, 512, 1024, 2048, 4096, 8192)
PROMPT_LENGTHS = (128, 256, 512, 1024, 2048, 4096)
# share of the copy ceiling reached inside an n-SM partition (Triton streaming read, H100)
BW_FRACTION = ((8, 0.24), (16, 0.43), (32, 0.71), (48, 0.86), (64, 0.92), (132, 0.98))
# share of the NCCL bus bandwidth reached with n CTAs (2x H200 all-reduce, 34 MB)
NET_FRACTION = ((4, 0.38), (8, 0.72), (16, 0.86), (32, 1.0))
LAUNCH_MS = 0.004
# share of the full-GPU all-reduce speed kept beside a GEMM on the other SMs, n CTAs / SMs (median of
# TP=2 and TP=4, default and 16-CTA communicators, 2048 x 8192 bf16; docs/gpu_facts.md "The network")
NET_CORUN_FRACTION = ((8, 0.54), (16, 0.75), (24, 0.84))
CO_CLASSES = ("compute", "memory", "other")
NET_LATENCY_MS = 0.010
TILE_M, TILE_N = 128, 256


def analytic_profile(model: ModelSpec, workload: Workload, gpu: GpuSpec) -> ProfileTable:
    rows = []
    for op in layer_ops(model, workload):
        for context in _contexts(op, workload):
            for tokens in TOKEN_GRID:
                for sms in gpu.sm_grid():
                    solo_ms = op_time_ms(op, model, workload, gpu, tokens, context, sms)
                    rows.append((op.name, "analytic", tokens, context, sms, solo_ms, ""))
                    if op.op_class == "network" and sms < gpu.num_sms:
                        corun = net_corun_ms(op, model, workload, gpu, tokens, sms)
                        rows += [(op.name, "analytic", tokens, context, sms, max(solo_ms, corun), c)
                                 for c in CO_CLASSES]
    meta = {"gpu_name": gpu.name, "gpu_key": gpu.key, "num_sms": gpu.num_sms,
            "sm_granularity": gpu.sm_granularity, "source": "analytic", "model": model.name,
            "tp_degree": workload.tp_degree, "dtype": workload.dtype,
            "shard": shard_signature(model, workload.tp_degree, workload.dtype),
            "peak_tflops": gpu.peak_tflops,
            "mem_bandwidth_tbps": gpu.mem_bandwidth_tbps, "net_bandwidth_gbps": gpu.net_bandwidth_gbps,
            "figures_source": gpu.figures_source, "date": datetime.date.today().isoformat()}
    if gpu.memory_bytes:
        meta["memory_bytes"] = gpu.memory_bytes
    if workload.tp_degree > 1:
        meta["corun_source"] = "analytic network co-run rows (NET_CORUN_FRACTION, docs/gpu_facts.md)"
    df = pd.DataFrame(rows, columns=["op", "impl", "num_tokens", "context", "sm_count", "time_ms", "co_class"])
    return ProfileTable(df, meta)


def op_time_ms(op: Op, model: ModelSpec, workload: Workload, gpu: GpuSpec, tokens: int, context: int,
               sms: int) -> float:
    work = op_work(op, model, workload, tokens, context)
    if op.op_class == "network":
        rate_bytes_per_ms = gpu.net_bandwidth_gbps * 1e6 * interp(NET_FRACTION, sms)
        return work.net_bytes / rate_bytes_per_ms + NET_LATENCY_MS
    flops_per_ms = gpu.peak_tflops * 1e9 * sms / gpu.num_sms * _tile_efficiency(op, tokens, sms)
    bytes_per_ms = gpu.mem_bandwidth_tbps * 1e9 * interp(BW_FRACTION, sms)
    return max(work.flops / flops_per_ms, work.num_bytes / bytes_per_ms) + LAUNCH_MS


def net_corun_ms(op: Op, model: ModelSpec, workload: Workload, gpu: GpuSpec, tokens: int, sms: int) -> float:
    """A network op on `sms` SMs while another class's op runs on the rest of the GPU."""
    work = op_work(op, model, workload, tokens, 0)
    return work.net_bytes / (gpu.net_bandwidth_gbps * 1e6 * interp(NET_CORUN_FRACTION, sms)) + NET_LATENCY_MS


def _tile_efficiency(op: Op, tokens: int, sms: int) -> float:
    if not op.is_gemm:
        return 1.0
    m_tiles, n_tiles = math.ceil(tokens / TILE_M), math.ceil(op.gemm_n / TILE_N)
    tile_eff = tokens / (m_tiles * TILE_M)
    waves = math.ceil(m_tiles * n_tiles / sms)
    return tile_eff * (m_tiles * n_tiles) / (waves * sms)


def _contexts(op: Op, workload: Workload) -> tuple[int, ...]:
    if op.name == "decode_attn":
        return tuple(sorted(set(DECODE_CONTEXTS) | {op_context(op, workload)}))
    if op.name == "prefill_attn":
        return tuple(sorted(set(PROMPT_LENGTHS) | {op_context(op, workload)}))
    return (0,)


def interp(curve, x: float) -> float:
    """Piecewise-linear curve ((x, y), ...) at x: through the origin below its first point, flat after its last."""
    if x <= curve[0][0]:
        return curve[0][1] * x / curve[0][0]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]
