"""The batches the engine forms over a trace, per bucket, from the torch-free scheduler on the CPU.

No model runs: every sampled id is 0 and requests end at their output length (the trace's requests
ignore EOS), which is all batch formation depends on. The loop is the engine's (runtime.engine.Engine.run,
asynchronous): iteration i+1 is formed before i's sampled ids are applied. Arrival times are not
modelled (no iteration time is known here): every request is queued at the start, as E1-E4 have it.

Per bucket it keeps the iterations that landed there and their pooled composition (decode contexts,
prefill chunk lengths with their cached prefixes, logit rows), from which `composition` draws the
bucket's mean batch: the mean number of decode rows at the pooled contexts' quantiles, the mean
number of chunks at the pooled chunks' quantiles, scaled to the mean prefill tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from nfsearch.family.engine_shape import EngineShape
from nfsearch.serving.batch import Batch, Bucket
from nfsearch.serving.pages import PageManager
from nfsearch.serving.scheduler import Scheduler, SchedulerConfig, sequence_from_request
from nfsearch.serving.traces import Request


@dataclass
class BucketHits:
    """What the iterations that landed in one bucket held."""
    num_iterations: int = 0
    num_tokens: int = 0
    num_decode: int = 0
    num_segments: int = 0
    num_prefill_tokens: int = 0
    num_logit_rows: int = 0
    decode_contexts: Counter = field(default_factory=Counter)      # context -> decode rows
    chunks: Counter = field(default_factory=Counter)               # (chunk length, prefix) -> chunks

    def add(self, batch: Batch) -> None:
        self.num_iterations += 1
        self.num_tokens += batch.num_tokens
        self.num_decode += batch.num_decode
        self.num_segments += batch.num_segments
        self.num_prefill_tokens += batch.num_prefill_tokens
        self.num_logit_rows += len(batch.logit_rows)
        self.decode_contexts.update(batch.context_lens)
        self.chunks.update(zip(batch.chunk_lens, batch.prefix_lens))

    def mean(self, total: int) -> float:
        return total / self.num_iterations if self.num_iterations else 0.0


@dataclass
class TraceRun:
    """The scheduler's run over a trace: per bucket hits, and the trace's real tokens."""
    hits: dict[Bucket, BucketHits]
    num_iterations: int
    num_real_tokens: int             # prompts + outputs of the finished requests, each counted once
    num_finished: int
    num_refused: int
    num_preemptions: int
    refusals: list[str]              # the first few refusal reasons


def run_scheduler(requests: list[Request], shape: EngineShape, max_model_len: int, on_batch=None) -> TraceRun:
    """Every batch the engine's scheduler forms for `requests` (all queued at the start);
    on_batch(batch, scheduler) sees each as it is formed."""
    cfg = SchedulerConfig(shape.dense_batch, shape.max_decode, list(shape.buckets), shape.page_size, max_model_len)
    sched = Scheduler(cfg, PageManager(shape.num_pages, shape.page_size))
    seqs = [sequence_from_request(r, [0] * r.prompt_len) for r in sorted(requests, key=lambda r: r.arrival_s)]
    for seq in seqs:
        sched.add(seq)
    hits = {b: BucketHits() for b in shape.buckets}
    in_flight, num_iterations = None, 0
    while True:
        batch = sched.schedule(0.0) if sched.has_work() else None
        if batch is not None:
            hits[batch.bucket].add(batch)
            if on_batch is not None:
                on_batch(batch, sched)
            num_iterations += 1
        if in_flight is not None:
            sched.postprocess(in_flight, [0] * len(in_flight.sample_seqs), 0.0)
        in_flight = batch
        if in_flight is None and not sched.has_work():
            break
    sched.pages.check_no_leaks()
    done = [s for s in seqs if s.finish_reason == "length"]
    return TraceRun(hits, num_iterations, sum(s.prompt_len + len(s.output_ids) for s in done), len(done),
                    len(sched.refused), sched.num_preemptions, [s.error for s in sched.refused[:3]])


def quantiles(counts: Counter, num: int) -> list:
    """`num` values spread over the distribution `counts` (value -> weight): the midpoints of num
    equal-weight slices, in sorted order."""
    if num <= 0 or not counts:
        return []
    items = sorted(counts.items())
    total = sum(counts.values())
    out, k, seen = [], 0, items[0][1]
    for i in range(num):
        target = (i + 0.5) * total / num
        while seen < target and k + 1 < len(items):
            k += 1
            seen += items[k][1]
        out.append(items[k][0])
    return out


@dataclass(frozen=True)
class Composition:
    """One bucket's mean batch: the batch the family's plan for that bucket is solved for."""
    decode_contexts: tuple[int, ...]
    chunk_lens: tuple[int, ...]
    prefix_lens: tuple[int, ...]
    num_logit_rows: int

    @property
    def num_tokens(self) -> int:
        return len(self.decode_contexts) + sum(self.chunk_lens)

    def describe(self) -> str:
        parts = []
        if self.decode_contexts:
            mean = sum(self.decode_contexts) / len(self.decode_contexts)
            parts.append(f"{len(self.decode_contexts)} decode @ ctx {mean:.0f}")
        if self.chunk_lens:
            prefix = sum(self.prefix_lens) / len(self.prefix_lens)
            parts.append(f"{len(self.chunk_lens)} chunk{'s' if len(self.chunk_lens) > 1 else ''} "
                         f"{sum(self.chunk_lens)} tok" + (f" (prefix {prefix:.0f})" if prefix else ""))
        return " + ".join(parts)

    def to_dict(self) -> dict:
        return {"decode_contexts": list(self.decode_contexts), "chunk_lens": list(self.chunk_lens),
                "prefix_lens": list(self.prefix_lens), "num_logit_rows": self.num_logit_rows}

    @classmethod
    def from_dict(cls, d: dict) -> Composition:
        return cls(tuple(d["decode_contexts"]), tuple(d["chunk_lens"]), tuple(d["prefix_lens"]), d["num_logit_rows"])


def composition(hits: BucketHits, bucket: Bucket) -> Composition | None:
    """The bucket's mean batch (None when no iteration landed in it)."""
    if not hits.num_iterations:
        return None
    num_decode = min(round(hits.mean(hits.num_decode)), bucket.max_decode)
    num_chunks = min(round(hits.mean(hits.num_segments)), bucket.max_segments)
    if num_decode + num_chunks == 0:           # rare chunks or rare decode rows: keep the likelier one
        num_decode, num_chunks = (1, 0) if hits.num_decode >= hits.num_segments else (0, 1)
    contexts = quantiles(hits.decode_contexts, num_decode)
    # chunks spread over their attention work, then scaled to the mean prefill tokens and attention pairs
    by_work = Counter({(_pairs(n, p), n, p): w for (n, p), w in hits.chunks.items()})
    picked = [(n, p) for _, n, p in quantiles(by_work, num_chunks)]
    target = max(num_chunks, min(round(hits.mean(hits.num_prefill_tokens)), bucket.max_tokens - num_decode))
    chunk_lens = _scaled([n for n, _ in picked], target)
    mean_pairs = hits.mean(sum(w * _pairs(n, p) for (n, p), w in hits.chunks.items()))
    prefixes = _prefixes_for(chunk_lens, mean_pairs, bucket.max_context)
    logit_rows = min(round(hits.mean(hits.num_logit_rows)), num_decode + num_chunks) or 1
    return Composition(tuple(contexts), tuple(chunk_lens), tuple(prefixes), logit_rows)


def _pairs(chunk_len: int, prefix: int) -> int:
    """(query, key) pairs of a chunk's causal attention over its cached prefix (specs.Workload.prefill_pairs)."""
    return chunk_len * prefix + chunk_len * (chunk_len + 1) // 2


def _prefixes_for(chunk_lens: list[int], target_pairs: float, max_context: int) -> list[int]:
    """One prefix for every chunk so that their attention pairs come to about target_pairs (0 where
    the lengths alone reach it), each within the context cap. Which chunk holds how much prefix is
    not kept: prefill attention is priced by its pairs (specs.Workload.prefill_context)."""
    extra = target_pairs - sum(_pairs(n, 0) for n in chunk_lens)     # pairs the prefixes must add
    if extra <= 0 or not chunk_lens:
        return [0] * len(chunk_lens)
    prefix = round(extra / sum(chunk_lens))
    return [max(0, min(max_context - n, prefix)) for n in chunk_lens]


def _scaled(lengths: list[int], target: int) -> list[int]:
    """lengths scaled to sum to target, each >= 1 (largest remainders get the rounding)."""
    if not lengths:
        return []
    total = sum(lengths)
    raw = [n * target / total for n in lengths]
    out = [max(1, int(x)) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (raw[i] - int(raw[i])), reverse=True)
    k = 0
    while sum(out) < target:
        out[order[k % len(out)]] += 1
        k += 1
    while sum(out) > target and max(out) > 1:
        out[out.index(max(out))] -= 1
    return out
