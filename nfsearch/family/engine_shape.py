"""The engine's batch limits and buckets for a trace, worked out without torch or a GPU.

The engine sizes its dense batch, decode slots, buckets and analytic KV cache with
runtime.engine_memory.size_batch (torch-free); this module calls the same function, so a plan family
is made for the buckets the engine will capture (a test builds a CPU engine and checks both agree),
and keeps the family file's record of them (EngineShape). On the GPU the engine's figure for "other"
memory (CUDA context, other processes) is measured at start-up: OTHER_BYTES is the figure its E1 run
printed, and a family records its dense batch and buckets, so an engine that comes out otherwise
refuses the family (pin both with --dense-batch).
"""

from __future__ import annotations

from dataclasses import dataclass

from nfsearch.runtime import engine_memory as mem
from nfsearch.runtime.engine_memory import TraceShape
from nfsearch.serving.batch import Bucket
from nfsearch.serving.model_config import ModelConfig
from nfsearch.serving.pages import DEFAULT_PAGE_SIZE

DEFAULT_UTILIZATION = 0.90       # the engine's gpu_memory_utilization default
OTHER_BYTES = int(0.67 * mem.GIB)   # CUDA context + cuBLAS workspaces the engine measured on an H100


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


def engine_shape(cfg: ModelConfig, trace: TraceShape, total_bytes: int, *, dtype_bytes: int = 2,
                 kv_cache_dtype: str = "auto", utilization: float = DEFAULT_UTILIZATION,
                 other_bytes: int = OTHER_BYTES, page_size: int = DEFAULT_PAGE_SIZE, dense_batch: int | None = None,
                 max_decode: int | None = None, num_pages: int | None = None) -> EngineShape:
    """The dense batch, decode slots, buckets and (analytic) KV pages Engine(...) chooses for this
    model, trace, memory and KV cache dtype ("auto": the model's; "fp8"); NfsearchError (the engine's
    message) when the model does not fit."""
    sizing = mem.size_batch(cfg, trace, total_bytes, dtype_bytes=dtype_bytes,
                            kv_token_bytes=mem.kv_token_bytes(cfg.spec, dtype_bytes, kv_cache_dtype),
                            utilization=utilization, other_bytes=other_bytes, page_size=page_size,
                            dense_batch=dense_batch, max_decode=max_decode, num_pages=num_pages)
    return EngineShape(sizing.dense_batch, sizing.max_decode, sizing.max_context, page_size, sizing.num_pages,
                       tuple(sorted(sizing.buckets)))
