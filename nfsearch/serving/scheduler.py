"""Batch formation as NanoFlow does it: decode rows first, chunked prefill fills a dense token budget.

A request is admitted only while the predicted peak KV of every admitted request fits the cache;
when a running request still cannot get a page, the newest running request is preempted by
recompute (pages freed, back to the front of the queue, its generated tokens recomputed with its
prompt). Asynchronous use: schedule() for iteration i+1 runs before postprocess() of iteration i, so a
decode row whose input is i's sample reads it on the device (input_ids -1, prev_rows its index).
"""

from collections import deque
from dataclasses import dataclass

from nfsearch.errors import NfsearchError
from nfsearch.serving.batch import Batch, BatchBuilder, Bucket, SamplingParams, SeqStatus, Sequence
from nfsearch.serving.pages import DEFAULT_PAGE_SIZE, PageManager
from nfsearch.serving.traces import Request

__all__ = ["Batch", "Bucket", "SamplingParams", "Scheduler", "SchedulerConfig", "SeqStatus", "Sequence",
           "default_buckets", "sequence_from_request"]


def default_buckets(dense_batch: int, max_decode: int, max_context: int, page_size: int = DEFAULT_PAGE_SIZE,
                    num_token_levels: int = 4, max_segments: int = 8) -> list[Bucket]:
    """Token budgets dense_batch, /2, /4, ... (multiples of 16 below the top) x contexts full and 1/4.

    Decode slots follow the token level (a bucket cannot hold more decode rows than tokens).
    """
    tokens = [dense_batch]
    while len(tokens) < num_token_levels and tokens[-1] // 2 >= 16:
        tokens.append(min(dense_batch, -(-(tokens[-1] // 2) // 16) * 16))
    full_ctx = -(-max_context // page_size) * page_size
    contexts = {full_ctx, max(page_size, -(-(full_ctx // 4) // page_size) * page_size)}
    return sorted({Bucket(t, min(max_decode, t), min(max_segments, t), c) for t in tokens for c in contexts})


@dataclass
class SchedulerConfig:
    dense_batch: int                       # token budget per iteration
    max_decode: int                        # running requests (each decodes one row per iteration)
    buckets: list[Bucket] | None = None    # None: default_buckets(...)
    page_size: int = DEFAULT_PAGE_SIZE
    max_model_len: int = 8192
    eos_token_ids: tuple[int, ...] = ()
    predicted_output_len: int | None = None  # admission's output length; None: each max_tokens (never overcommits)

    def __post_init__(self):
        if self.dense_batch < 1 or self.max_decode < 1 or self.max_model_len < 1:
            raise NfsearchError(f"dense batch {self.dense_batch}, max decode {self.max_decode} and max model "
                                f"length {self.max_model_len} must all be >= 1")
        if self.buckets is None:
            self.buckets = default_buckets(self.dense_batch, self.max_decode, self.max_model_len, self.page_size)
        self.buckets = sorted(self.buckets)
        top = self.top_bucket
        if not all(top.covers(b.max_tokens, b.max_decode, b.max_segments, b.max_context) for b in self.buckets) \
                or min(top.max_tokens, top.max_decode, top.max_segments, top.max_context) < 1:
            raise NfsearchError("buckets need one that covers all the others, with every limit >= 1")

    @property
    def top_bucket(self) -> Bucket:
        return max(self.buckets, key=lambda b: (b.max_tokens, b.max_decode, b.max_segments, b.max_context))


def sequence_from_request(request: Request, prompt_ids: list[int], **sampling) -> Sequence:
    """A Sequence for a trace request (max_tokens and ignore_eos from the request)."""
    params = SamplingParams(max_tokens=request.output_len, ignore_eos=request.ignore_eos, **sampling)
    return Sequence(request.request_id, list(prompt_ids), params, request.arrival_s)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, pages: PageManager):
        if pages.page_size != cfg.page_size:
            raise NfsearchError(f"page size {pages.page_size} differs from the scheduler's {cfg.page_size}")
        self.cfg, self.pages = cfg, pages
        top = cfg.top_bucket
        self.token_budget = min(cfg.dense_batch, top.max_tokens)
        self.decode_cap = min(cfg.max_decode, top.max_decode, self.token_budget)
        self.segment_cap = top.max_segments
        self.max_context = min(cfg.max_model_len, top.max_context)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # admission order
        self.refused: list[Sequence] = []
        self.num_preemptions = 0
        self.num_discarded_tokens = 0          # sampled after EOS was known one iteration late
        self._in_flight: deque[Batch] = deque()
        self._next_batch_id = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> bool:
        """Queue seq; False (seq finished with seq.error saying why) if it can never run."""
        reason = self._refusal(seq)
        if reason is None:
            self.waiting.append(seq)
            return True
        seq.status, seq.error, seq.finish_reason = SeqStatus.FINISHED, reason, "error"
        self.refused.append(seq)
        return False

    def _refusal(self, seq: Sequence) -> str | None:
        total = seq.prompt_len + seq.sampling.max_tokens
        if seq.prompt_len < 1 or seq.sampling.max_tokens < 1:
            return f"prompt of {seq.prompt_len} tokens and max_tokens {seq.sampling.max_tokens}: both must be >= 1"
        what = f"prompt of {seq.prompt_len} tokens + max_tokens {seq.sampling.max_tokens}"
        if total > self.cfg.max_model_len:
            return f"{what} exceeds the model's context {self.cfg.max_model_len}"
        if total > self.max_context:
            return f"{what} exceeds the engine's context cap {self.max_context} (largest bucket)"
        if self.pages.pages_for(total) > self.pages.num_pages:
            return (f"{what} needs {self.pages.pages_for(total)} KV pages; the cache holds "
                    f"{self.pages.num_pages}")
        return None

    def _peak_pages(self, seq: Sequence) -> int:
        output_len = seq.sampling.max_tokens
        if self.cfg.predicted_output_len is not None:
            output_len = min(output_len, self.cfg.predicted_output_len)
        return self.pages.pages_for(max(seq.prompt_len + output_len, seq.num_tokens))

    def _preempt(self, seq: Sequence) -> None:
        self.pages.free(seq)
        seq.num_computed, seq.status = 0, SeqStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def _reserve(self, seq: Sequence, num_tokens_total: int, placed: set) -> bool:
        """Pages for seq up to num_tokens_total, preempting the newest unplaced running requests;
        False when seq itself was the one preempted."""
        if num_tokens_total <= len(seq.page_table) * self.pages.page_size:
            return True
        while not self.pages.can_allocate(seq, num_tokens_total):
            victim = next(s for s in reversed(self.running) if s not in placed)
            self._preempt(victim)
            if victim is seq:
                return False
        self.pages.allocate(seq, num_tokens_total)
        return True

    def schedule(self, now_s: float | None = None) -> Batch | None:
        """The next iteration's batch (None: nothing can run until an in-flight batch is postprocessed)."""
        if len(self._in_flight) >= 2:
            raise RuntimeError("schedule: two batches in flight; postprocess the older one first")
        prev_id = self._in_flight[-1].batch_id if self._in_flight else -1
        batch = BatchBuilder(self._next_batch_id, self.pages)
        placed: set = set()
        for seq in list(self.running):        # decode rows, oldest request first
            if (seq.status is SeqStatus.RUNNING and seq.num_tokens - seq.num_computed == 1
                    and len(seq.output_ids) + seq.num_pending < seq.sampling.max_tokens
                    and batch.num_decode < self.decode_cap
                    and self._reserve(seq, seq.num_computed + 1, placed)):
                if seq.num_pending and seq.last_sample_batch != prev_id:
                    raise RuntimeError(f"sequence {seq.seq_id}: pending token from an older batch")
                batch.add_decode(seq)
                placed.add(seq)
        self._schedule_prefill(batch, placed, now_s)
        if not batch.seqs:
            if not self._in_flight and self.has_work():
                raise RuntimeError("scheduler stalled: work left, nothing in flight, nothing schedulable")
            return None
        bucket = next((b for b in self.cfg.buckets if b.covers(*batch.shape())), None)
        if bucket is None:
            raise RuntimeError(f"no bucket covers batch shape {batch.shape()}")
        self._next_batch_id += 1
        out = batch.build(bucket)
        self._in_flight.append(out)
        return out

    def _schedule_prefill(self, batch: BatchBuilder, placed: set, now_s: float | None) -> None:
        budget = self.token_budget - batch.num_decode
        for seq in list(self.running):        # continue prompts already admitted, oldest first
            if budget <= 0 or batch.num_segments >= self.segment_cap:
                return
            if seq.status is not SeqStatus.RUNNING or seq in placed or seq.num_tokens - seq.num_computed < 2:
                continue
            n = min(seq.num_tokens - seq.num_computed, budget,
                    self.pages.max_tokens_coverable(seq) - seq.num_computed)
            if n <= 0:
                # with no row placed and nothing in flight, no page would ever be freed: preempt
                if batch.seqs or self._in_flight or not self._reserve(seq, seq.num_computed + 1, placed):
                    continue
                n = min(seq.num_tokens - seq.num_computed, budget,
                        self.pages.max_tokens_coverable(seq) - seq.num_computed)
            self.pages.allocate(seq, seq.num_computed + n)
            batch.add_chunk(seq, n)
            placed.add(seq)
            budget -= n
        if not self.waiting:
            return
        peak_pages = sum(self._peak_pages(s) for s in self.running)
        while (self.waiting and budget > 0 and batch.num_segments < self.segment_cap
               and len(self.running) < self.decode_cap):
            seq = self.waiting[0]
            need = self._peak_pages(seq)
            n = min(seq.num_tokens, budget, self.pages.max_tokens_coverable(seq))
            if seq.num_pending or peak_pages + need > self.pages.num_pages or n <= 0:
                return
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if seq.admitted_s is None:
                seq.admitted_s = now_s
            peak_pages += need
            self.pages.allocate(seq, n)
            batch.add_chunk(seq, n)
            placed.add(seq)
            budget -= n

    def postprocess(self, batch: Batch, sampled: list[int], now_s: float) -> list[Sequence]:
        """Apply batch's sampled ids (one per logit row, padding after); return the requests it finished."""
        if not self._in_flight or self._in_flight[0] is not batch:
            raise RuntimeError("postprocess: batches must be postprocessed once each, in schedule order")
        self._in_flight.popleft()
        if len(sampled) < len(batch.sample_seqs):
            raise RuntimeError(f"postprocess: {len(sampled)} sampled ids for {len(batch.sample_seqs)} logit rows")
        finished = []
        for seq, token in zip(batch.sample_seqs, sampled):
            seq.num_pending -= 1
            if seq.is_finished:
                self.num_discarded_tokens += 1
                continue
            token = int(token)
            seq.output_ids.append(token)
            seq.token_times.append(now_s)
            if seq.first_token_s is None:
                seq.first_token_s = now_s
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self._finish(seq, reason, now_s)
                finished.append(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        num_out = len(seq.output_ids)
        if (not seq.sampling.ignore_eos and token in self.cfg.eos_token_ids
                and num_out > seq.sampling.min_tokens):
            return "stop"
        return "length" if num_out >= seq.sampling.max_tokens else None

    def _finish(self, seq: Sequence, reason: str, now_s: float) -> None:
        self.pages.free(seq)
        (self.running if seq.status is SeqStatus.RUNNING else self.waiting).remove(seq)
        seq.status, seq.finish_reason, seq.finish_s = SeqStatus.FINISHED, reason, now_s
