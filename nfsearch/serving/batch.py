"""The host-side types the scheduler hands the engine: sequences, buckets and one iteration's batch."""

import enum
from dataclasses import dataclass, field

from nfsearch.serving.pages import PageManager


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SamplingParams:
    temperature: float = 0.0      # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                # 0: no top-k filter
    seed: int = 0
    max_tokens: int = 16
    ignore_eos: bool = False
    min_tokens: int = 0           # EOS does not stop the request before this many output tokens


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler tracks it (compared by identity)."""
    seq_id: int
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_s: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0          # tokens whose K/V are in the cache (or written by a launched batch)
    page_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    admitted_s: float | None = None        # first admission (schedule's now_s)
    first_token_s: float | None = None
    finish_s: float | None = None
    token_times: list[float] = field(default_factory=list)   # per output token, when it reached the host
    finish_reason: str | None = None       # "length", "stop" or "error"
    error: str | None = None               # why the request was refused
    num_preemptions: int = 0
    num_pending: int = 0                   # tokens sampled by launched batches, not yet postprocessed
    last_sample_batch: int = -1            # batch_id of the latest such sample
    last_sample_index: int = -1            # its index in that batch's sampled-ids vector

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens of the request so far, the sampled ones not yet known on the host included."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def token_id(self, position: int) -> int:
        """The id at position (known on the host: prompt or postprocessed output)."""
        if position < len(self.prompt_ids):
            return self.prompt_ids[position]
        return self.output_ids[position - len(self.prompt_ids)]


@dataclass(frozen=True, order=True)
class Bucket:
    """A graph shape: grids are fixed per bucket. Ordered smallest first by (tokens, decode, segments, context)."""
    max_tokens: int
    max_decode: int
    max_segments: int
    max_context: int

    def covers(self, num_tokens: int, num_decode: int, num_segments: int, max_context: int) -> bool:
        return (num_tokens <= self.max_tokens and num_decode <= self.max_decode
                and num_segments <= self.max_segments and max_context <= self.max_context)


@dataclass
class Batch:
    """One iteration; rows are tokens: decode rows first, then the prefill chunks' rows."""
    batch_id: int
    bucket: Bucket
    seqs: list[Sequence]          # in row order: decode seqs, then prefill-chunk seqs
    num_decode: int
    input_ids: list[int]          # per row; -1 where the id is the previous iteration's sample
    prev_rows: list[int]          # per row; index into the previous batch's sampled-ids vector, or -1
    positions: list[int]          # per row, position within its request
    slot_mapping: list[int]       # per row: where its K/V go in the paged cache
    context_lens: list[int]       # per decode request: tokens attended, the new one included
    chunk_starts: list[int]       # per prefill chunk: its first row (absolute row index)
    chunk_lens: list[int]
    prefix_lens: list[int]        # per chunk: tokens of its request already cached before the chunk
    page_tables: list[list[int]]  # per request in row order (decode requests, then chunks); copies
    logit_rows: list[int]         # rows sampled: each decode row, the last row of a prompt-completing chunk
    sample_seqs: list[Sequence]   # the sequence each logit row samples for (same order)
    sample_steps: list[int]       # per logit row: index of the output token it samples (sampler's step)
    max_context: int              # longest context any request of the batch attends

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_segments(self) -> int:
        return len(self.chunk_lens)

    @property
    def num_prefill_tokens(self) -> int:
        return len(self.input_ids) - self.num_decode


class BatchBuilder:
    """Accumulates one batch's rows (the scheduler allocates each request's pages before adding it)."""

    def __init__(self, batch_id: int, pages: PageManager):
        self.batch_id, self.pages = batch_id, pages
        self.seqs: list[Sequence] = []
        self.num_decode = 0
        self.input_ids, self.prev_rows, self.positions, self.slot_mapping = [], [], [], []
        self.context_lens, self.chunk_starts, self.chunk_lens, self.prefix_lens = [], [], [], []
        self.page_tables, self.logit_rows, self.sample_seqs, self.sample_steps = [], [], [], []

    @property
    def num_segments(self) -> int:
        return len(self.chunk_lens)

    def _sample_last_row(self, seq: Sequence) -> None:
        self.logit_rows.append(len(self.positions) - 1)
        self.sample_seqs.append(seq)
        self.sample_steps.append(len(seq.output_ids) + seq.num_pending)
        seq.num_pending += 1
        seq.last_sample_batch, seq.last_sample_index = self.batch_id, len(self.sample_seqs) - 1

    def add_decode(self, seq: Sequence) -> None:
        position = seq.num_computed
        if seq.num_pending:
            self.input_ids.append(-1)
            self.prev_rows.append(seq.last_sample_index)
        else:
            self.input_ids.append(seq.token_id(position))
            self.prev_rows.append(-1)
        self.positions.append(position)
        self.slot_mapping.append(self.pages.slot(seq, position))
        self.context_lens.append(position + 1)
        self.page_tables.append(list(seq.page_table))
        self.seqs.append(seq)
        self.num_decode += 1
        seq.num_computed += 1
        self._sample_last_row(seq)

    def add_chunk(self, seq: Sequence, num_tokens: int) -> None:
        prefix, end = seq.num_computed, seq.num_computed + num_tokens
        self.chunk_starts.append(len(self.positions))
        num_prompt = len(seq.prompt_ids)
        self.input_ids += (seq.prompt_ids[prefix:end] if end <= num_prompt
                           else [seq.token_id(p) for p in range(prefix, end)])
        self.prev_rows += [-1] * num_tokens
        self.positions += range(prefix, end)
        size, table = self.pages.page_size, seq.page_table
        self.slot_mapping += [table[p // size] * size + p % size for p in range(prefix, end)]
        self.chunk_lens.append(num_tokens)
        self.prefix_lens.append(prefix)
        self.page_tables.append(list(table))
        self.seqs.append(seq)
        seq.num_computed = end
        if end == seq.num_tokens:     # the chunk completes what is known: sample the next token
            self._sample_last_row(seq)

    def shape(self) -> tuple[int, int, int, int]:
        contexts = self.context_lens + [p + n for p, n in zip(self.prefix_lens, self.chunk_lens)]
        return len(self.positions), self.num_decode, self.num_segments, max(contexts, default=0)

    def build(self, bucket: Bucket) -> Batch:
        return Batch(self.batch_id, bucket, self.seqs, self.num_decode, self.input_ids, self.prev_rows,
                     self.positions, self.slot_mapping, self.context_lens, self.chunk_starts, self.chunk_lens,
                     self.prefix_lens, self.page_tables, self.logit_rows, self.sample_seqs, self.sample_steps,
                     max_context=self.shape()[3])
