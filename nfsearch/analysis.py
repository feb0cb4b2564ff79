"""Roofline analysis of one layer of a workload on a GPU, as WORKLOADS.md defines it."""

from dataclasses import dataclass

from nfsearch.ops import Work, domain_range, layer_ops, op_context, op_work
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
    total = Work()
    for op in layer_ops(model, workload):
        start, end = domain_range(op, workload)
        total = total + op_work(op, model, workload, end - start, op_context(op, workload))
    return total


def roofline(model: ModelSpec, workload: Workload, gpu: GpuSpec) -> Roofline:
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
