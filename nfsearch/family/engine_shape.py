"""The engine's batch limits and buckets for a trace, worked out without torch or a GPU.

The engine (runtime.engine.Engine._choose_batch) sizes its dense batch and decode slots from the KV
cache an analytic memory plan leaves (runtime.engine_memory.estimate_plan at a 2048-token batch, or
at the given dense batch) and the trace's lengths (engine_memory.choose_batch), then takes
serving.scheduler.default_buckets at the trace's longest request. This module repeats those steps
with the same functions, so a plan family is made for the buckets the engine will capture; a test
builds a CPU engine and checks that both agree. On the GPU the engine's figure for "other" memory
(CUDA context, other processes) is measured at start-up: OTHER_BYTES is the figure its E1 run
printed, and a family records its dense batch and buckets, so an engine that comes out otherwise
refuses the family (pin both with --dense-batch).
"""

from __future__ import annotations

from dataclasses import dataclass

from nfsearch.errors import NfsearchError
from nfsearch.runtime import engine_memory as mem
from nfsearch.serving.batch import Bucket
from nfsearch.serving.model_config import ModelConfig
from nfsearch.serving.pages import DEFAULT_PAGE_SIZE
from nfsearch.serving.scheduler import default_buckets
from nfsearch.serving.traces import Request

DEFAULT_UTILIZATION = 0.90       # the engine's gpu_memory_utilization default
OTHER_BYTES = int(0.67 * mem.GIB)   # CUDA context + cuBLAS workspaces the engine measured on an H100
ANALYTIC_TOKENS, ANALYTIC_DECODE = 2048, 512   # the engine's analytic plan without a given dense batch


@dataclass(frozen=True)
class TraceLengths:
    """runtime.engine.TraceShape without torch: what sizes the engine's batch and bucket contexts."""
    mean_prompt_len: float
    mean_output_len: float
    max_request_len: int             # longest prompt + output

    @classmethod
    def of(cls, requests: list[Request]) -> TraceLengths:
        n = max(1, len(requests))
        return cls(sum(r.prompt_len for r in requests) / n, sum(r.output_len for r in requests) / n,
                   max((r.prompt_len + r.output_len for r in requests), default=1))


@dataclass(frozen=True)
class EngineShape:
    dense_batch: int
    max_decode: int
    max_context: int                 # the top buckets' context: the longest request, in whole pages
    page_size: int
    num_pages: int                   # the analytic plan's KV cache (the GPU's measured one differs a little)
    buckets: tuple[Bucket, ...]      # sorted, smallest first (the scheduler's order)

    def to_dict(self) -> dict:
        return {"dense_batch": self.dense_batch, "max_decode": self.max_decode, "max_context": self.max_context,
                "page_size": self.page_size, "num_pages": self.num_pages,
                "buckets": [bucket_to_list(b) for b in self.buckets]}

    @classmethod
    def from_dict(cls, d: dict) -> EngineShape:
        return cls(d["dense_batch"], d["max_decode"], d["max_context"], d["page_size"], d["num_pages"],
                   tuple(sorted(Bucket(*b) for b in d["buckets"])))


def bucket_to_list(bucket: Bucket) -> list[int]:
    return [bucket.max_tokens, bucket.max_decode, bucket.max_segments, bucket.max_context]


def engine_shape(cfg: ModelConfig, lengths: TraceLengths, total_bytes: int, *, dtype_bytes: int = 2,
                 utilization: float = DEFAULT_UTILIZATION, other_bytes: int = OTHER_BYTES,
                 page_size: int = DEFAULT_PAGE_SIZE, dense_batch: int | None = None,
                 max_decode: int | None = None, num_pages: int | None = None) -> EngineShape:
    """The dense batch, decode slots, buckets and (analytic) KV pages Engine(...) chooses for this
    model, trace and memory; NfsearchError (the engine's message) when the model does not fit."""
    spec, tied = cfg.spec, cfg.tie_word_embeddings
    longest = min(lengths.max_request_len, cfg.max_model_len)
    max_context = -(-longest // page_size) * page_size
    min_pages = -(-longest // page_size)

    def analytic(tokens: int, decode: int, what: str) -> mem.MemoryPlan:
        return mem.estimate_plan(spec, dtype_bytes, tied, total_bytes, utilization, other_bytes, tokens,
                                 decode + 8, page_size, min_pages, what)

    if num_pages is not None:
        kv_tokens = num_pages * page_size
    else:
        what = f"dense batch {dense_batch}" if dense_batch else "the model (at a 2048-token batch)"
        kv_tokens = analytic(dense_batch or ANALYTIC_TOKENS, max_decode or ANALYTIC_DECODE, what).kv_tokens
    auto_dense, auto_decode = mem.choose_batch(kv_tokens, lengths.mean_prompt_len, lengths.mean_output_len,
                                               lengths.max_request_len)
    dense = dense_batch or auto_dense
    decode = min(max_decode or auto_decode, dense)
    buckets = default_buckets(dense, decode, max_context, page_size)
    top = max(buckets)
    max_logit_rows = max(b.max_decode + b.max_segments for b in buckets)
    plan = analytic(top.max_tokens, max_logit_rows - 8, f"dense batch {dense} ({top.max_tokens}-token top bucket)")
    pages = num_pages or plan.num_pages
    if pages < 1:
        raise NfsearchError(f"dense batch {dense}: no KV page fits")
    return EngineShape(dense, decode, max_context, page_size, pages, tuple(sorted(buckets)))
