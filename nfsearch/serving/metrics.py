"""Benchmark metrics: tokens/s over the whole run and the steady window, TTFT/TPOT, % of optimal.

Tokens are real tokens, counted once: a request's prompt when its first token reaches the host (the
prefill is done then), each output token when it reaches the host. Recomputed tokens after a
preemption and padding rows are not counted.
"""

from collections import Counter
from dataclasses import asdict, dataclass, field

from nfsearch.serving.batch import Batch, Sequence


@dataclass
class RequestRecord:
    request_id: int
    arrival_s: float
    first_token_s: float | None
    finish_s: float | None
    prompt_len: int
    num_output_tokens: int
    token_times: list[float] = field(default_factory=list)   # per output token, host time it arrived
    admitted_s: float | None = None
    error: str | None = None         # refused: why

    @classmethod
    def from_sequence(cls, seq: Sequence) -> "RequestRecord":
        return cls(seq.seq_id, seq.arrival_s, seq.first_token_s, seq.finish_s, seq.prompt_len,
                   len(seq.output_ids), list(seq.token_times), seq.admitted_s, seq.error)


@dataclass
class Percentiles:
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: list[float]) -> "Percentiles":
        if not values:
            return cls(None, None, None, None)
        ordered = sorted(values)
        return cls(sum(ordered) / len(ordered), *(percentile(ordered, q) for q in (50, 90, 99)))


def percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) of a sorted, non-empty list."""
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def optimal_tokens_per_s(p_gemm_flops: float, num_params_layers_and_head: float) -> float:
    """NanoFlow's optimal throughput: every token costs 2 FLOPs per parameter at the measured GEMM rate."""
    return p_gemm_flops / (2.0 * num_params_layers_and_head)


@dataclass
class BenchSummary:
    num_requests: int
    num_finished: int
    num_refused: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    total_tokens_per_s: float             # per GPU, whole run
    output_tokens_per_s: float
    steady_start_s: float
    steady_end_s: float
    is_steady_window: bool                # False: the window was empty, the whole run is used
    steady_total_tokens_per_s: float      # per GPU
    steady_output_tokens_per_s: float
    ttft_s: Percentiles
    tpot_s: Percentiles
    num_gpus: int = 1
    optimal_tokens_per_s: float | None = None
    pct_of_optimal: float | None = None   # steady total tokens/s over optimal, in %

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(records: list[RequestRecord], start_s: float, end_s: float,
              optimal_tokens_per_s: float | None = None, num_gpus: int = 1) -> BenchSummary:
    """Whole run [start_s, end_s]; steady window from the first request finishing to the last admitted."""
    served = [r for r in records if r.error is None]
    finishes = [r.finish_s for r in served if r.finish_s is not None]
    admits = [r.admitted_s for r in served if r.admitted_s is not None]
    steady_start = min(finishes, default=start_s)
    steady_end = max(admits, default=start_s)
    is_steady = steady_end > steady_start
    if not is_steady:
        steady_start, steady_end = start_s, end_s
    whole_in, whole_out = _tokens_between(served, start_s, end_s)
    steady_in, steady_out = _tokens_between(served, steady_start, steady_end)
    whole_gpu_s = max(end_s - start_s, 1e-12) * num_gpus
    steady_gpu_s = max(steady_end - steady_start, 1e-12) * num_gpus
    ttfts = [r.first_token_s - r.arrival_s for r in served if r.first_token_s is not None]
    tpots = [(r.finish_s - r.first_token_s) / (r.num_output_tokens - 1) for r in served
             if r.finish_s is not None and r.first_token_s is not None and r.num_output_tokens > 1]
    steady_total = (steady_in + steady_out) / steady_gpu_s
    return BenchSummary(
        num_requests=len(records), num_finished=len(finishes), num_refused=len(records) - len(served),
        duration_s=end_s - start_s, input_tokens=whole_in, output_tokens=whole_out,
        total_tokens_per_s=(whole_in + whole_out) / whole_gpu_s, output_tokens_per_s=whole_out / whole_gpu_s,
        steady_start_s=steady_start, steady_end_s=steady_end, is_steady_window=is_steady,
        steady_total_tokens_per_s=steady_total, steady_output_tokens_per_s=steady_out / steady_gpu_s,
        ttft_s=Percentiles.of(ttfts), tpot_s=Percentiles.of(tpots), num_gpus=num_gpus,
        optimal_tokens_per_s=optimal_tokens_per_s,
        pct_of_optimal=100.0 * steady_total / optimal_tokens_per_s if optimal_tokens_per_s else None)


def _tokens_between(records: list[RequestRecord], t0: float, t1: float) -> tuple[int, int]:
    """(prompt tokens, output tokens) that reached the host in [t0, t1]."""
    num_in = sum(r.prompt_len for r in records if r.first_token_s is not None and t0 <= r.first_token_s <= t1)
    num_out = sum(1 for r in records for t in r.token_times if t0 <= t <= t1)
    return num_in, num_out


@dataclass
class BatchStats:
    """Per-iteration shape statistics: mean decode and dense batch, bucket hits and padding."""
    num_iterations: int = 0
    num_decode_rows: int = 0
    num_tokens: int = 0
    num_padded_tokens: int = 0            # bucket token slots the batch left empty
    bucket_hits: Counter = field(default_factory=Counter)

    def add(self, batch: Batch) -> None:
        self.num_iterations += 1
        self.num_decode_rows += batch.num_decode
        self.num_tokens += batch.num_tokens
        self.num_padded_tokens += batch.bucket.max_tokens - batch.num_tokens
        self.bucket_hits[batch.bucket] += 1

    def to_dict(self) -> dict:
        n = max(self.num_iterations, 1)
        slots = self.num_tokens + self.num_padded_tokens
        return {"num_iterations": self.num_iterations, "mean_decode_batch": self.num_decode_rows / n,
                "mean_dense_batch": self.num_tokens / n,
                "padding_fraction": self.num_padded_tokens / slots if slots else 0.0,
                "bucket_hits": [{**asdict(b), "num_iterations": c, "fraction": c / n}
                                for b, c in sorted(self.bucket_hits.items())]}
