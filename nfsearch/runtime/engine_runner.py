"""One batch on the device: static inputs per bucket, one CUDA graph per (variant, bucket, sampling
kind), and the sampled ids read back one launch later without a device-wide sync.

A launch is: pack the batch's host lists into one pinned buffer and copy it to the bucket's static
device buffer (runtime.step_inputs.StepBuffers: one stream-ordered non_blocking copy, the pinned side
double-buffered); replay the graph (embedding -> layers -> norm -> LM head -> sampling; the sampled
ids stay on the device, where the next launch's decode rows read them through prev_rows); copy the
real sampled ids into pinned memory (non_blocking) and record an event after that copy. `read` waits
on that event only, so the host never waits on the GPU beyond the launch it reads, and never calls
torch.cuda.synchronize. CUDA events around each replay give the GPU time, read when the launch is
read (already complete then).

Graphs of every bucket and variant share one memory pool: no temporary outlives its capture, so the
pool holds about the largest forward's temporaries. Variants ("plan", "baseline") are models that
share weights, KV cache, buffers and sampled-ids vector and differ only in their kernels.
On the CPU (or with use_cuda_graphs False) the same calls run eagerly. A bucket model that splits
decode attention carries a serving.decode_spread.DecodeSpread: its batches' decode rows are laid out
over the nano-batches' slots by KV work before the pack (the logit order, so prev_rows, unchanged).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from nfsearch.runtime.step_inputs import StepBuffers, make_step_inputs
from nfsearch.serving.batch import Batch, Bucket


@dataclass
class Launched:
    batch: Batch
    variant: str
    slot: int                    # which pinned read-back buffer and event set
    launch_s: float              # host clock when the launch was issued
    num_sampled: int


def dry_fields(bucket: Bucket, page_size: int, is_greedy: bool = True) -> dict:
    """A full batch of the bucket's shape (every decode slot at the longest context, the remaining
    rows as equal prefill chunks from position 0), reading and writing pages 0..max_pages-1 only:
    the dry run and each graph's warm-up use it, so their temporaries are the real ones (shapes
    alone size every buffer and grid)."""
    T, B, S, C = bucket.max_tokens, bucket.max_decode, bucket.max_segments, bucket.max_context
    table = list(range(-(-C // page_size)))
    f = {k: [] for k in ("input_ids", "prev_rows", "positions", "slot_mapping", "context_lens", "chunk_starts",
                         "chunk_lens", "prefix_lens", "logit_rows")}

    def row(position: int) -> None:
        f["input_ids"].append(position % 1000)
        f["prev_rows"].append(-1)
        f["positions"].append(position)
        f["slot_mapping"].append(table[position // page_size] * page_size + position % page_size)

    num_decode = min(B, T)
    for _ in range(num_decode):
        row(C - 1)
        f["context_lens"].append(C)
        f["logit_rows"].append(len(f["positions"]) - 1)
    rest = T - num_decode
    num_chunks = min(S, rest)
    for s in range(num_chunks):
        n = min(C, rest // num_chunks + (1 if s < rest % num_chunks else 0))
        f["chunk_starts"].append(len(f["positions"]))
        f["chunk_lens"].append(n)
        f["prefix_lens"].append(0)
        for p in range(n):
            row(p)
        f["logit_rows"].append(len(f["positions"]) - 1)
    n = len(f["logit_rows"])
    temperature = 0.0 if is_greedy else 1.0
    f.update(temperature=[temperature] * n, top_p=[1.0] * n, top_k=[0] * n, seed=list(range(n)),
             sample_step=[0] * n, page_tables=[table] * (num_decode + num_chunks))
    return f


def batch_fields(batch: Batch) -> dict:
    sampling = [s.sampling for s in batch.sample_seqs]
    return dict(input_ids=batch.input_ids, prev_rows=batch.prev_rows, positions=batch.positions,
                slot_mapping=batch.slot_mapping, context_lens=batch.context_lens, chunk_starts=batch.chunk_starts,
                chunk_lens=batch.chunk_lens, prefix_lens=batch.prefix_lens, logit_rows=batch.logit_rows,
                temperature=[p.temperature for p in sampling], top_p=[p.top_p for p in sampling],
                top_k=[p.top_k for p in sampling], seed=[p.seed for p in sampling],
                sample_step=batch.sample_steps, page_tables=batch.page_tables)


class StepRunner:
    def __init__(self, models: dict, buckets: list[Bucket], page_size: int, device, use_cuda_graphs: bool):
        self.models, self.page_size = models, page_size
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.use_graphs = use_cuda_graphs and self.is_cuda
        self.buffers = {b: StepBuffers(b, page_size, self.device) for b in buckets}
        self.graphs: dict[tuple[str, Bucket, bool], torch.cuda.CUDAGraph] = {}
        # (variant, bucket) -> a model with that bucket's own kernels (runtime.engine_plans); else models[variant]
        self.bucket_models: dict[tuple[str, Bucket], object] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        max_sampled = max(b.max_decode + b.max_segments for b in buckets)
        self._host_ids = [torch.zeros(max_sampled, dtype=torch.int64, pin_memory=self.is_cuda) for _ in range(2)]
        if self.is_cuda:
            self._events = [tuple(torch.cuda.Event(enable_timing=t) for t in (True, True, False)) for _ in range(2)]
        self._slot = 0
        self.num_host_waits = 0          # event waits in read(): one per launch read
        self.num_eager_launches = 0      # graph mode, but no graph for the batch's sampling kind
        self.capture_s = 0.0

    # ------------------------------------------------------------------------------ graphs
    def capture(self, variants=None, is_greedy: bool = True) -> None:
        """Warm up and capture every bucket's graph for the variants, largest bucket first (the shared
        pool then grows once)."""
        t0 = time.perf_counter()
        for variant in variants or self.models:
            for bucket in sorted(self.buffers, reverse=True):
                self._capture(variant, bucket, is_greedy)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()            # the warm-ups' temporaries: the graphs' pool holds their own
        self.capture_s += time.perf_counter() - t0

    def _capture(self, variant: str, bucket: Bucket, is_greedy: bool):
        model, buffers = self.model_for(variant, bucket), self.buffers[bucket]
        step = buffers.fill_(**dry_fields(bucket, self.page_size, is_greedy))
        model.forward(step)                         # warm-up: kernels compiled, workspaces allocated
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            model.forward(step)
        self.graphs[(variant, bucket, is_greedy)] = graph
        return graph

    def model_for(self, variant: str, bucket: Bucket):
        return self.bucket_models.get((variant, bucket), self.models[variant])

    # ------------------------------------------------------------------------------ launch and read
    def launch(self, batch: Batch, variant: str) -> Launched:
        slot, self._slot = self._slot, 1 - self._slot
        model = self.model_for(variant, batch.bucket)
        fields = batch_fields(batch)
        spread = getattr(model, "decode_spread", None)   # serving.decode_spread: an overlapped bucket's layout
        if spread is not None:
            fields = spread.apply(fields, batch.seqs[:batch.num_decode], batch.num_decode)
        step = self.buffers[batch.bucket].fill_(**fields)
        n = len(batch.sample_seqs)
        launch_s = time.perf_counter()
        if not self.is_cuda:
            ids = model.forward(step)
            self._host_ids[slot][:n].copy_(ids[:n])
            return Launched(batch, variant, slot, launch_s, n)
        start, end, done = self._events[slot]
        start.record()
        graph = self.graphs.get((variant, batch.bucket, step.is_all_greedy)) if self.use_graphs else None
        if graph is not None:
            graph.replay()
            ids = model.sampled
        else:
            # no graph for this sampling kind: eager (capturing now would need a warm-up forward,
            # which would overwrite the sampled ids the batch's decode rows read)
            self.num_eager_launches += self.use_graphs
            ids = model.forward(step)
        end.record()
        self._host_ids[slot][:n].copy_(ids[:n], non_blocking=True)
        done.record()
        return Launched(batch, variant, slot, launch_s, n)

    def read(self, launched: Launched) -> tuple[list[int], float]:
        """The launch's sampled ids on the host and its GPU time in ms (0 on the CPU)."""
        gpu_ms = 0.0
        if self.is_cuda:
            start, end, done = self._events[launched.slot]
            done.synchronize()
            self.num_host_waits += 1
            gpu_ms = start.elapsed_time(end)
        return self._host_ids[launched.slot][:launched.num_sampled].tolist(), gpu_ms

    def run_dry(self, variant: str, bucket: Bucket) -> None:
        """One eager forward of a full dry batch (warm-up; the bench's op trace)."""
        step = self.buffers[bucket].fill_(**dry_fields(bucket, self.page_size))
        self.model_for(variant, bucket).forward(step)


def dry_forward(model, bucket: Bucket, page_size: int, device) -> None:
    """One eager forward of a full dry batch on a model of its own (the start-up dry run)."""
    model.forward(make_step_inputs(bucket, page_size, device, **dry_fields(bucket, page_size)))
