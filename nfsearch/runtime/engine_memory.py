"""How much of the GPU the engine's KV cache gets, and the refusals made before anything is allocated.

The budget is total memory x gpu_memory_utilization. Out of it come the weights, the model's static
activation buffers (sized by the largest bucket), the peak of the temporaries one forward allocates
(measured by a dry run of every bucket: the CUDA graphs' shared pool holds about that much, since no
temporary outlives its capture), and what the process holds besides torch's tensors (CUDA context,
cuBLAS workspaces, other processes). What is left, in whole pages, is the KV cache.

`estimate_*` are analytic (counted from the config): they refuse a dense batch or a memory setting that
cannot fit before the weights are loaded. `kv_plan` uses the measured numbers after the dry run and
refuses a cache too small for the longest request before the cache is allocated.

`size_batch` is the engine's batch sizing (dense batch, decode slots, buckets, analytic KV pages) in
one torch-free place: Engine._choose_batch and the plan families (family.engine_shape) both call it,
so a family is solved for the buckets the engine will capture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from nfsearch.errors import NfsearchError
from nfsearch.graph import layer_gemm_weights, num_weights
from nfsearch.serving.batch import Bucket
from nfsearch.serving.model_config import ModelConfig
from nfsearch.serving.scheduler import default_buckets
from nfsearch.specs import ModelSpec

GIB = 1 << 30
# Temporaries of one forward beyond the static buffers (rope's index tensors, the LM head's matmul
# output, decode attention's split partials), as a share of the static buffers: the analytic check
# before loading only; the planned cache uses the measured peak.
TEMPORARY_SHARE = 0.5
# Left free beyond the measured peak: the allocator rounds segments up and fragments a little.
SAFETY_BYTES = 256 << 20


def weights_bytes(spec: ModelSpec, dtype_bytes: int, tied_embeddings: bool, is_fp8_gemms: bool = False) -> int:
    """The weights in the model's dtype; is_fp8_gemms: with the GEMMs in e4m3 (1 byte per element and a
    float32 scale per output channel, as --quantization fp8 loads them), the rest in the model's dtype."""
    total = num_weights(spec, is_tied=tied_embeddings) * dtype_bytes
    if not is_fp8_gemms:
        return total
    gemm_elements, out_channels = layer_gemm_weights(spec)
    per_layer = gemm_elements * (dtype_bytes - 1) - out_channels * 4
    return total - spec.num_layers * per_layer


def buffer_bytes(spec: ModelSpec, max_tokens: int, max_logit_rows: int, dtype_bytes: int) -> int:
    """The model's static activation buffers (runtime.paged_model's, one set for every layer) and its
    float32 logits."""
    H, I = spec.hidden_size, spec.intermediate_size
    qkv = spec.q_size + 2 * spec.kv_size
    per_token = 3 * H + 2 * qkv + spec.q_size + 3 * I     # x, mid, h; qkv, q/k/v; attn; ug; act
    return (max_tokens * per_token + 2 * max_logit_rows * H) * dtype_bytes + max_logit_rows * spec.vocab_size * 4


# An fp8 KV cache stores one float32 scale per (token, kv head) for K and for V
# (runtime/kernels/paged_attention_torch.py says why): 4 bytes per head_dim bytes of fp8.
FP8_SCALE_BYTES = 4


def kv_bytes_per_token(spec: ModelSpec, dtype_bytes: int, scale_bytes: int = 0) -> int:
    """K and V of one token in every layer: dtype_bytes per element (the cache's dtype, not the
    model's) plus scale_bytes per kv head (FP8_SCALE_BYTES for an fp8 cache)."""
    return 2 * spec.num_layers * (spec.kv_size * dtype_bytes + spec.num_kv_heads * scale_bytes)


def kv_token_bytes(spec: ModelSpec, dtype_bytes: int, kv_cache_dtype: str = "auto") -> int:
    """One token's K/V in a cache of kv_cache_dtype: "auto" (the model's dtype_bytes) or "fp8" (e4m3
    plus its scales)."""
    if kv_cache_dtype not in ("auto", "fp8"):
        raise NfsearchError(f"kv cache dtype {kv_cache_dtype!r}: use one of auto, fp8")
    if kv_cache_dtype == "fp8":
        return kv_bytes_per_token(spec, 1, FP8_SCALE_BYTES)
    return kv_bytes_per_token(spec, dtype_bytes)


@dataclass(frozen=True)
class MemoryPlan:
    total_bytes: int
    budget_bytes: int            # total x utilization
    weights_bytes: int
    activation_bytes: int        # static buffers + the measured (or estimated) peak of temporaries
    other_bytes: int             # CUDA context, workspaces, other processes
    bytes_per_page: int
    num_pages: int
    page_size: int
    is_measured: bool            # activation and other bytes from the dry run (else analytic)

    @property
    def kv_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def kv_bytes(self) -> int:
        return self.num_pages * self.bytes_per_page

    def describe(self) -> str:
        return (f"KV cache {self.kv_tokens:,} tokens ({self.num_pages:,} pages of {self.page_size}, "
                f"{self.kv_bytes / GIB:.2f} GiB) = {self.budget_bytes / GIB:.2f} GiB budget - weights "
                f"{self.weights_bytes / GIB:.2f} - activations {self.activation_bytes / GIB:.2f} - other "
                f"{self.other_bytes / GIB:.2f} GiB")

    def to_dict(self) -> dict:
        return asdict(self) | {"kv_tokens": self.kv_tokens}


def plan_pages(total_bytes: int, utilization: float, weights: int, activations: int, other: int,
               bytes_per_page: int, page_size: int, min_pages: int, is_measured: bool,
               what: str) -> MemoryPlan:
    """The cache that fits; NfsearchError (with the numbers) when fewer than min_pages fit."""
    budget = int(total_bytes * utilization)
    free = budget - weights - activations - other - SAFETY_BYTES
    num_pages = max(0, free // bytes_per_page)
    plan = MemoryPlan(total_bytes, budget, weights, activations, other, bytes_per_page, num_pages, page_size,
                      is_measured)
    if num_pages < min_pages:
        need = (min_pages * bytes_per_page + weights + activations + other + SAFETY_BYTES) / total_bytes
        raise NfsearchError(
            f"{what} does not fit: {total_bytes / GIB:.1f} GiB x utilization {utilization:g} = "
            f"{budget / GIB:.2f} GiB, weights {weights / GIB:.2f} + activations {activations / GIB:.2f} + "
            f"other {other / GIB:.2f} GiB leave {max(free, 0) / GIB:.2f} GiB for the KV cache, "
            f"{min_pages} pages ({min_pages * bytes_per_page / GIB:.2f} GiB) needed "
            f"(a smaller --dense-batch{f', or --gpu-memory-utilization >= {need:.2f}' if need <= 1 else ''})")
    return plan


def estimate_plan(spec: ModelSpec, dtype_bytes: int, tied: bool, total_bytes: int, utilization: float,
                  other_bytes: int, max_tokens: int, max_logit_rows: int, page_size: int,
                  min_pages: int, what: str, kv_token_bytes: int | None = None,
                  is_fp8_gemms: bool = False) -> MemoryPlan:
    """The analytic plan: refuses before the weights are loaded. kv_token_bytes: one token's K/V
    (kv_bytes_per_token of the cache's dtype); None: a cache in the model's dtype. is_fp8_gemms: the
    GEMM weights in e4m3 (weights_bytes)."""
    buffers = buffer_bytes(spec, max_tokens, max_logit_rows, dtype_bytes)
    kv_token_bytes = kv_token_bytes or kv_bytes_per_token(spec, dtype_bytes)
    return plan_pages(total_bytes, utilization, weights_bytes(spec, dtype_bytes, tied, is_fp8_gemms),
                      int(buffers * (1 + TEMPORARY_SHARE)), other_bytes,
                      kv_token_bytes * page_size, page_size, min_pages, False, what)


CPU_KV_TOKENS = 16384            # the CPU's cache without a memory figure (tiny models)
# The analytic plan that sizes the cache before the batch is known: a batch this large (or the given one)
ANALYTIC_TOKENS, ANALYTIC_DECODE = 2048, 512


@dataclass(frozen=True)
class TraceShape:
    """What of a trace sizes the engine's batch and its buckets' contexts."""
    mean_prompt_len: float
    mean_output_len: float
    max_request_len: int             # longest prompt + output

    @classmethod
    def of(cls, requests: list) -> TraceShape:
        """requests: serving.traces.Request (anything with prompt_len and output_len)."""
        n = max(1, len(requests))
        return cls(sum(r.prompt_len for r in requests) / n, sum(r.output_len for r in requests) / n,
                   max((r.prompt_len + r.output_len for r in requests), default=1))


@dataclass(frozen=True)
class BatchSizing:
    dense_batch: int
    max_decode: int
    max_context: int                 # the top buckets' context: the longest request, in whole pages
    buckets: list[Bucket]            # serving.scheduler.default_buckets' order
    max_logit_rows: int              # the largest bucket's decode slots + segments
    num_pages: int                   # given, else the analytic plan's (CPU: CPU_KV_TOKENS)
    plan: MemoryPlan | None          # the analytic plan at the top bucket; None without a memory figure


def size_batch(cfg: ModelConfig, trace: TraceShape, total_bytes: int | None, *, dtype_bytes: int,
               kv_token_bytes: int | None = None, utilization: float = 0.90, other_bytes: int = 0,
               page_size: int = 16, dense_batch: int | None = None, max_decode: int | None = None,
               num_pages: int | None = None, is_fp8_gemms: bool = False) -> BatchSizing:
    """The dense batch, decode slots, buckets and KV pages the engine runs cfg with for this trace:
    batch limits given or chosen (choose_batch) for the cache an analytic plan leaves at a
    2048-token batch (or the given one), buckets at the trace's longest request, then the analytic
    plan of the top bucket, which refuses (NfsearchError) what cannot fit before anything is
    allocated. total_bytes None (the CPU): a cache of CPU_KV_TOKENS, no plan. is_fp8_gemms: the weights
    the plans count are FP8 GEMMs' (--quantization fp8 or an FP8 checkpoint), about 0.57x an 8B model's
    bf16 weights, so the cache the batch is sized for is as large as the one the engine allocates."""
    spec, tied = cfg.spec, cfg.tie_word_embeddings
    longest = min(trace.max_request_len, cfg.max_model_len)
    min_pages = -(-longest // page_size)
    max_context = min_pages * page_size

    def analytic(tokens: int, decode: int, what: str) -> MemoryPlan:
        return estimate_plan(spec, dtype_bytes, tied, total_bytes, utilization, other_bytes, tokens, decode + 8,
                             page_size, min_pages, what, kv_token_bytes=kv_token_bytes, is_fp8_gemms=is_fp8_gemms)

    if num_pages is not None:
        kv_tokens = num_pages * page_size
    elif total_bytes is not None:
        what = f"dense batch {dense_batch}" if dense_batch else "the model (at a 2048-token batch)"
        kv_tokens = analytic(dense_batch or ANALYTIC_TOKENS, max_decode or ANALYTIC_DECODE, what).kv_tokens
    else:
        kv_tokens = CPU_KV_TOKENS
    auto_dense, auto_decode = choose_batch(kv_tokens, trace.mean_prompt_len, trace.mean_output_len,
                                           trace.max_request_len)
    dense = dense_batch or auto_dense
    decode = min(max_decode or auto_decode, dense)
    buckets = default_buckets(dense, decode, max_context, page_size)
    top = max(buckets)
    max_logit_rows = max(b.max_decode + b.max_segments for b in buckets)
    plan = None
    if total_bytes is not None:
        plan = analytic(top.max_tokens, max_logit_rows - 8, f"dense batch {dense} ({top.max_tokens}-token top bucket)")
    pages = num_pages or (plan.num_pages if plan else CPU_KV_TOKENS // page_size)
    return BatchSizing(dense, decode, max_context, buckets, max_logit_rows, pages, plan)


def choose_batch(kv_tokens: int, mean_prompt_len: float, mean_output_len: float, max_request_len: int,
                 max_dense_batch: int = 4096) -> tuple[int, int]:
    """(dense batch, max decode) for a trace's lengths and a cache of kv_tokens.

    Admission reserves each request's prompt + max_tokens, so about kv_tokens / (mean prompt + mean
    output) requests run at once (never fewer than one of the longest). In steady state each of them
    needs its prompt prefilled once per output_len iterations, so a balanced iteration carries
    concurrency x (1 + prompt/output) tokens: all decode rows plus the prefill that replaces the
    requests finishing.
    """
    per_request = max(1.0, mean_prompt_len + mean_output_len)
    concurrency = max(1, int(kv_tokens / per_request))
    if kv_tokens < max_request_len:
        concurrency = 1
    max_decode = _round_up(min(concurrency, max_dense_batch), 16)
    dense = concurrency * (1.0 + mean_prompt_len / max(1.0, mean_output_len))
    dense_batch = min(max_dense_batch, max(64, _round_up(int(dense), 64)))
    return dense_batch, min(max_decode, dense_batch)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple
