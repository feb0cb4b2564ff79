"""GPU state of one run and the one way launches are issued on it (torch).

ExecContext holds everything a run needs on its device: the SM partitions (one build per layout), a
stream per stream key and an event per recorded launch; there are no module globals. `issue` puts a
LaunchList's launches on their streams with their cross-stream event waits, the same code eagerly and
under CUDA-graph capture (executor.py's module doc says how). The executor (timing, correctness) and
the kernel trace (trace.py) both issue launches through it, so neither imports the other.
"""

from __future__ import annotations

import torch

from nfsearch.plan import NETWORK_IMPLS
from nfsearch.runtime.collectives import COLLECTIVE_OPS
from nfsearch.runtime.kernels import IMPLS
from nfsearch.runtime.launch import Launch, LaunchList, layout_label
from nfsearch.runtime.model import ModelInstance
from nfsearch.runtime.partitions import PartitionError, SmPartitions

__all__ = ["ExecContext", "StreamFork", "issue", "resolve_impl"]


def resolve_impl(op: str, impl: str, device_type: str) -> str:
    """The impl to run: the plan's if the registry has it, else our SM-bounded kernels on CUDA and the
    torch impls on CPU (analytic profiles name their impl "analytic")."""
    if op in COLLECTIVE_OPS:          # network nano-ops: the TP model's op_allreduce_* (runtime.collectives)
        return impl if impl in NETWORK_IMPLS else NETWORK_IMPLS[0]
    if device_type != "cuda":
        return "torch"
    return impl if impl in IMPLS[op] else "triton"


# ---------------------------------------------------------------------------------------------- context
class ExecContext:
    """Device, SM partitions (one build per layout), streams per stream key, events per launch id, notes."""

    def __init__(self, device="cuda", mode: str = "green"):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.notes: list[str] = []
        self.partitions = None
        self.mode = mode if self.is_cuda else "cpu"
        self.num_sms, self.granularity = 1, 1
        self._streams: dict[str, object] = {}
        self._events: dict[str, object] = {}
        self._noted: set[str] = set()
        if self.is_cuda:
            idx = self.device.index or 0
            props = torch.cuda.get_device_properties(idx)
            self.gpu_name, self.num_sms = props.name, int(props.multi_processor_count)
            try:
                self.partitions = SmPartitions(idx, mode)
            except PartitionError as exc:
                if mode != "green":
                    raise
                self.notes.append(f"green contexts unavailable ({exc}); running grid mode (plain streams, "
                                  "SM-bounded grids)")
                self.mode = "grid"
                self.partitions = SmPartitions(idx, "grid")
            # grid mode keeps the green granularity so that plans place as they would in green mode
            self.granularity = self.partitions.granularity if self.mode == "green" else 8
        else:
            self.gpu_name = "cpu"

    def _note_once(self, key: str, text: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            self.notes.append(text)

    def _plain(self, key: str):
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=self.device)
        return self._streams[key]

    def build(self, layout):
        """The streams of one build of `layout` ([(sms, stream), ...]), or None where the driver
        refuses it (noted once; its launches then run on plain streams with SM-bounded grids)."""
        try:
            return self.partitions.build(layout)
        except PartitionError as exc:
            self._note_once("build:" + layout_label(layout),
                            f"no green contexts for layout {layout_label(layout)} ({exc}); its launches run on "
                            "plain streams with SM-bounded grids")
            return None

    def stream_for(self, l: Launch):
        """Group `l.group` of the one build of `l.layout`; a plain stream for whole-GPU launches."""
        if l.layout.build == "whole":
            return self._plain(l.key)
        streams = self.build(l.layout)
        if streams is None:
            return self._plain("plain@" + l.key)
        sms, stream = streams[l.group]
        if sms != l.sms:
            self._note_once("sms:" + l.key, f"group {l.key} has {sms} SMs, not {l.sms}")
        return stream

    def event(self, launch_id: str):
        if launch_id not in self._events:
            self._events[launch_id] = torch.cuda.Event()
        return self._events[launch_id]

    def close(self):
        if self.partitions is not None:
            self.partitions.close()
            self.partitions = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------- issue
def issue(ctx: ExecContext, model: ModelInstance, bufs, ll: LaunchList, impl: str | None = None,
          spans: dict | None = None) -> None:
    """Issue every launch in order. On CUDA: fork from the current stream, wait on events of other
    streams, record an event where a later launch waits on it, join back at the end (so the same
    code runs eagerly and under graph capture). `spans` (eager only): id -> (start, end) timing events."""
    if not ctx.is_cuda:
        for l in ll.launches:
            model.run(bufs, l.layer, l.op, *l.tokens, resolve_impl(l.op, impl or l.impl, "cpu"), l.sms)
        return
    fork = StreamFork(ctx.device)
    for l in ll.launches:
        s = fork.enter(ctx.stream_for(l))
        for d in l.waits:
            s.wait_event(ctx.event(d))
        with torch.cuda.stream(s):
            if spans is not None:
                spans[l.id] = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                spans[l.id][0].record(s)
            model.run(bufs, l.layer, l.op, *l.tokens, resolve_impl(l.op, impl or l.impl, "cuda"), l.sms)
            if spans is not None:
                spans[l.id][1].record(s)
        if l.record:
            ctx.event(l.id).record(s)
    fork.join()


class StreamFork:
    """Side streams forked from the current stream and joined back into it: each stream waits on the
    fork event before its first launch, and the current stream waits on every stream used at the
    end. The same code runs eagerly and under CUDA-graph capture (a captured side stream must fork
    from the capturing stream and join it again). Used by `issue` and the engine's overlapped
    buckets (runtime.engine_overlap)."""

    def __init__(self, device):
        self.origin = torch.cuda.current_stream(device)
        self.fork = torch.cuda.Event()
        self.fork.record(self.origin)
        self.used: dict[int, object] = {}

    def enter(self, stream):
        """`stream`, made to wait on the fork the first time it is used."""
        if stream.cuda_stream not in self.used:
            stream.wait_event(self.fork)
            self.used[stream.cuda_stream] = stream
        return stream

    def join(self) -> None:
        for s in self.used.values():
            done = torch.cuda.Event()
            done.record(s)
            self.origin.wait_event(done)
