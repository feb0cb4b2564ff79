"""The collectives behind a plan's network nano-ops, through torch.distributed (NCCL on GPUs, gloo on CPU).

A network nano-op reduces a token slice [a, b) of one activation buffer in place across the tensor-
parallel group: `allreduce_o` the row-parallel O projection's partial sums ("mid"), `allreduce_d` the
D projection's ("out"). Rows of a [T, H] buffer are contiguous, so a slice is one NCCL call with no
copy. The collective is issued on the caller's current stream (the executor enters the launch's
stream first); with async_op=False torch's NCCL group runs it there or joins that stream to its own,
so either way the launch's events order it against the other nano-ops, also under graph capture.

SM shares: a plan gives a network nano-op an SM count. On a green-context stream the partition bounds
it; on a plain stream NCCL's CTA limit is the only bound the device can build, so `Collectives`
keeps one communicator per CTA limit asked (NCCL_MIN_CTAS = NCCL_MAX_CTAS = n through the
communicator config) and falls back to the default communicator, with a note, where torch cannot set it.

Impl "ce" (runtime.ce_collectives): the same in-place all-reduce of rows [a, b) with the data moved by
the copy engines (no SMs) and the sum done by one kernel pass that can also apply the next RMSNorm;
`prepare_ce` sets it up (symmetric memory, collective) before capture, `all_reduce_rows_ce` runs it.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

from nfsearch.runtime.bench import event_times
from nfsearch.runtime.ce_collectives import CeAllReduce

# op -> the buffer it reduces in place (runtime.model's per-layer buffers)
COLLECTIVE_OPS = {"allreduce_o": "mid", "allreduce_d": "out"}
# NVLink multicast (NVLS) can take a shared host's GPUs out of service: it stays off everywhere
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def set_safe_env() -> None:
    """Before any communicator exists: multicast off (forced, not defaulted: a user's 1 is overridden)."""
    os.environ.update(SAFE_ENV)


class Collectives:
    """The tensor-parallel group and its communicators by CTA limit (0: NCCL's default)."""

    def __init__(self, group=None, limit_ctas: bool = True):
        self.group = group or dist.group.WORLD
        self.backend = dist.get_backend(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.is_limiting_ctas = limit_ctas and self.backend == "nccl"
        self._by_ctas: dict[int, object] = {0: self.group}
        self.notes: list[str] = []
        self._ce: dict = {}                  # op -> CeAllReduce (impl "ce", made by prepare_ce)
        self._ce_slots: dict[str, dict[tuple[int, int], int]] = {}

    def prepare(self, cta_limits) -> None:
        """Make the communicators for these CTA limits before any capture. Every rank must call it with
        the same limits in the same order (new_group is itself collective)."""
        if not self.is_limiting_ctas:
            return
        for n in sorted(set(int(c) for c in cta_limits) - set(self._by_ctas)):
            self._by_ctas[n] = self._new_limited_group(n)

    def _new_limited_group(self, num_ctas: int):
        try:
            opts = dist.ProcessGroupNCCL.Options()
            opts.config.min_ctas = num_ctas
            opts.config.max_ctas = num_ctas
            group = dist.new_group(backend="nccl", pg_options=opts)
        except (AttributeError, RuntimeError, TypeError) as exc:
            self.notes.append(f"no NCCL communicator with a CTA limit of {num_ctas} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120]}); the default communicator runs those ops")
            return self.group
        # one all-reduce now, outside any capture: NCCL sets communicators up lazily
        probe = torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(probe, group=group)
        return group

    def group_for(self, num_sms: int, whole_gpu_sms: int):
        """The communicator a network nano-op of `num_sms` SMs runs on (the default one on the whole GPU)."""
        if not self.is_limiting_ctas or num_sms >= whole_gpu_sms:
            return self.group
        return self._by_ctas.get(num_sms, self.group)

    def all_reduce_rows(self, buf: torch.Tensor, a: int, b: int, group=None) -> None:
        """Sum rows [a, b) of `buf` over the group, in place, on the current stream."""
        dist.all_reduce(buf[a:b], group=group or self.group)

    # ------------------------------------------------------------------ impl "ce": copy engines
    def prepare_ce(self, op_rows: dict, num_rows: int, hidden_size: int, dtype, device, sync: str = "memop") -> None:
        """Set up the copy-engine all-reduce (runtime.ce_collectives) for the network nano-ops whose impl
        is "ce": `op_rows` maps an op name (allreduce_o, allreduce_d) to the row ranges [(a, b), ...] of
        its nano-ops. One CeAllReduce per op (its own receive buffer of `num_rows` rows) and one slot per
        row range: nano-ops of one op on different rows may be in flight at once, the same rows of one
        op in two layers are ordered by the layer's data dependences. Collective and eager: every rank
        calls it with the same arguments before any capture."""
        for op in sorted(op_rows):
            ranges = sorted({(int(a), int(b)) for a, b in op_rows[op]})
            if op in self._ce or not ranges:
                continue
            self._ce[op] = CeAllReduce(self.group, num_rows, hidden_size, dtype, device, num_slots=len(ranges),
                                       sync=sync)
            self._ce_slots[op] = {r: i for i, r in enumerate(ranges)}
            self.notes += self._ce[op].notes

    def all_reduce_rows_ce(self, op: str, buf: torch.Tensor, a: int, b: int, norm_out=None, weight=None,
                           eps: float = 1e-5, num_sms: int | None = None) -> None:
        """Rows [a, b) of `buf` summed over the group in place by copy engines (prepare_ce first); with
        norm_out and weight, the following RMSNorm in the same pass (norm_out = rmsnorm(sum) * weight)."""
        try:
            ce, slot = self._ce[op], self._ce_slots[op][(a, b)]
        except KeyError:
            raise RuntimeError(f"{op} rows [{a}, {b}) were not given to prepare_ce before the run") from None
        ce.all_reduce_norm(buf[a:b], a, b, norm_out=norm_out, weight=weight, eps=eps, slot=slot, num_sms=num_sms)


def bus_bandwidth_gbps(coll: Collectives, num_tokens: int, hidden_size: int, dtype, device, iters: int = 20,
                       warmup: int = 5) -> dict:
    """NCCL bus bandwidth of an all-reduce of [num_tokens, hidden] (the layer's message), measured here:
    B_net of the bound. Bus bandwidth = 2 (n - 1) / n x bytes / time (NCCL's convention)."""
    n = coll.world_size
    x = torch.zeros((num_tokens, hidden_size), device=device, dtype=dtype)
    for _ in range(warmup):
        dist.all_reduce(x, group=coll.group)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dist.all_reduce(x, group=coll.group)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            dist.all_reduce(x, group=coll.group)
            times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    num_bytes = x.numel() * x.element_size()
    return {"all_reduce_ms": ms, "message_bytes": num_bytes, "min_ms": min(times), "max_ms": max(times),
            "bus_gbps": 2.0 * (n - 1) / n * num_bytes / (ms * 1e6), "world_size": n}


def all_reduce_table(coll: Collectives, hidden_size: int, dtype, device, token_grid, cta_limits,
                     iters: int = 10) -> list[dict]:
    """All-reduce of [tokens, hidden] at each token count and NCCL CTA limit (0: NCCL's default), on a
    GPU with nothing beside it: the solo rows a measured TP profile needs (median of `iters`)."""
    coll.prepare(c for c in cta_limits if c)
    rows, n = [], coll.world_size
    for ctas in cta_limits:
        group = coll.group if not ctas else coll._by_ctas.get(ctas, coll.group)
        is_limited = not ctas or group is not coll.group
        for tokens in token_grid:
            x = torch.zeros((tokens, hidden_size), device=device, dtype=dtype)
            ms = statistics.median(event_times(lambda: dist.all_reduce(x, group=group), iters, warmup=3))
            num_bytes = x.numel() * x.element_size()
            rows.append({"num_tokens": tokens, "cta_limit": ctas, "is_limit_applied": is_limited, "time_ms": ms,
                         "message_bytes": num_bytes, "bus_gbps": 2.0 * (n - 1) / n * num_bytes / (ms * 1e6)})
    return rows
