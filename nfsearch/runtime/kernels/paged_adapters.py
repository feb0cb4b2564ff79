"""The engine's paged attention behind the contiguous impls' call signatures: the "paged" impls.

The serving engine runs attention over its paged KV cache (paged_attention.py, whatever a plan names);
`nfsearch profile` times impls through the contiguous signatures (kernels/__init__.py). These adapters
take the contiguous inputs, copy their K/V once into a paged cache of the engine's page size (16
tokens; pages in a shuffled order, so the page tables are not the identity) and call the engine's
kernels with the given ``num_sms`` (the SM share): the Triton kernels on a CUDA tensor, the torch
references (paged_attention_torch.py) elsewhere. The copy is cached per input tensor (its storage,
layout and version: an input written in place is copied again) and dropped with the tensor, so the
timed calls run the engine's kernel alone; ``f.prepare`` (the same arguments) makes the copy without
running the kernel, which the profiler does before any timing or graph capture (a copy cannot be
made inside a capture: RuntimeError).

* ``decode_attn``: ``f(q, k_cache, v_cache, context_lens, out, num_sms, scale=None, max_context=None)``,
  k_cache [R, C, Hkv, D]: request r's C cached tokens in ceil(C / 16) pages; a row slice of a larger
  pool (as the profiler passes) reads the pool's one paged copy through its own rows of the page
  table. The page tables are ceil(max_context / 16) pages wide (default: C; padding entries page 0,
  never read): the engine's are as wide as its bucket's context cap (runtime/step_inputs.py), and the
  decode kernel picks its split count from that width (paged_attention.decode_splits), so the
  profiler passes the bucket's cap to time the split the engine runs.
* ``prefill_attn``: ``f(q, k, v, cu_seqlens, out, num_sms, scale=None, prefix_lens=None)``: chunk p is
  rows cu_seqlens[p]:cu_seqlens[p+1] of q/k/v (host ints or a CPU tensor: the offsets are read on the
  host), and sits after ``prefix_lens[p]`` tokens of its request already cached (0: a whole prompt, the
  contiguous impls' case): the paged cache holds, per chunk, that many prefix tokens of random K/V
  (seeded) and then the chunk's own K/V; each query row attends to its request's keys up to itself.

Two impls (plan.ENGINE_IMPLS): "paged" keeps the inputs' dtype in the cache (bf16 on a GPU, as the
engine with ``--kv-cache-dtype auto``); "paged_fp8kv" is the engine with ``--kv-cache-dtype fp8``: an
e4m3 cache with one float32 scale per (token, kv head) for K and for V (``k_scales, v_scales
[num_pages, 16, Hkv]``), written by the engine's own quantizing write (paged_attention_torch
.write_kv_torch), and the kernels called with those scales.

`prefill_chunks` is what a profile row of the paged prefill means (the profiler builds its inputs so).
"""

from __future__ import annotations

import weakref
from itertools import pairwise

from ._common import HAVE_TRITON, torch
from .paged_attention import paged_decode_attention, paged_prefill_attention
from .paged_attention_torch import (
    FP8_DTYPE,
    new_kv_scales,
    paged_decode_attention_torch,
    paged_prefill_attention_torch,
    write_kv_torch,
)

PAGE_SIZE = 16              # serving.pages.DEFAULT_PAGE_SIZE: the engine's pages
SEED = 1234                 # page order and prefix K/V are deterministic
KV_DTYPES = {"paged": None, "paged_fp8kv": "fp8"}    # impl -> the cache's dtype (None: the inputs')


def prefill_chunks(num_tokens: int, context: int) -> tuple[list[int], list[int]]:
    """(chunk lengths, cached prefixes) of the paged prefill's profile row (num_tokens, context).

    `context` is the pair-weighted prompt length of the cost model (specs.Workload.prefill_context:
    the c at which T tokens in prompts of c tokens have the batch's causal pairs). Where c >= T: one
    chunk of T tokens over a prefix of (c - T) // 2 tokens, whose pairs are T (c + 1) / 2 (exactly
    when c - T is even): a chunk of C tokens over a prefix of P is the row (C, C + 2P). Where c < T:
    prompts of c tokens (the last one shorter) with no prefix, as the contiguous impls' rows."""
    if num_tokens <= 0 or context <= 0:
        raise ValueError(f"a prefill row needs tokens and a context, not ({num_tokens}, {context})")
    if context >= num_tokens:
        return [num_tokens], [(context - num_tokens) // 2]
    lens = [context] * (num_tokens // context) + ([num_tokens % context] if num_tokens % context else [])
    return lens, [0] * len(lens)


class PagedKv:
    """A paged copy: k, v [num_pages, page_size, Hkv, D] and page_tables [requests, max_pages] int32,
    the scales of an fp8 cache (k_scales, v_scales [num_pages, page_size, Hkv] float32; None for
    bf16), plus what the kernels read beside them (context_lens for decode; chunk fields for prefill)."""

    def __init__(self, k, v, page_tables, k_scales=None, v_scales=None, **fields):
        self.k, self.v, self.page_tables = k, v, page_tables
        self.k_scales, self.v_scales = k_scales, v_scales
        self.__dict__.update(fields)

    @property
    def scale_kwargs(self) -> dict:
        """The kernels' keyword arguments for the cache's scales ({} for a bf16 cache)."""
        return {} if self.k_scales is None else {"k_scales": self.k_scales, "v_scales": self.v_scales}


_CACHE: dict[tuple, tuple[tuple, PagedKv]] = {}


def _owner(t):
    """The tensor whose storage `t` views (itself if none): the cache entry lives as long as it."""
    return t if t._base is None else t._base


def _cached(tensors, extra: tuple, build) -> PagedKv:
    """build() once per (tensors' storage, layout) and `extra`; again when a tensor was written since."""
    key = tuple((id(_owner(t)), t.data_ptr(), tuple(t.shape), t.stride(), str(t.dtype), str(t.device))
                for t in tensors) + (extra,)
    versions = tuple(t._version for t in tensors)
    got = _CACHE.get(key)
    if got is not None and got[0] == versions:
        return got[1]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the paged adapter copies its inputs into a paged KV cache, which cannot be done "
                           "inside a CUDA graph capture: call it (or its .prepare) once before capturing")
    paged = build()
    if got is None:
        for owner in {id(_owner(t)): _owner(t) for t in tensors}.values():
            weakref.finalize(owner, _CACHE.pop, key, None)
    _CACHE[key] = (versions, paged)
    return paged


def _page_tables(pages_per_request: list[int], device):
    """Page tables [requests, max pages] int32 over a shuffled order of all pages (padding: page 0)."""
    total = sum(pages_per_request)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(SEED))
    tables = torch.zeros(len(pages_per_request), max(pages_per_request, default=0) or 1, dtype=torch.int32)
    start = 0
    for r, n in enumerate(pages_per_request):
        tables[r, :n] = order[start:start + n]
        start += n
    return tables.to(device), total


def _slots(tables, lengths: list[int]):
    """The cache slots [sum(lengths)] of request r's tokens 0..lengths[r]-1 through tables[r]."""
    ps, pages = PAGE_SIZE, tables.long()
    if len(set(lengths)) == 1:          # every request as long (decode): one gather for all
        pos = torch.arange(lengths[0], device=tables.device)
        return (pages[:, pos // ps] * ps + pos % ps).reshape(-1)
    spans = [torch.arange(n, device=tables.device) for n in lengths]
    return torch.cat([pages[r, pos // ps] * ps + pos % ps for r, pos in enumerate(spans)])


def _paged_copy(tables, num_pages: int, lengths: list[int], k, v, kv_dtype: str | None, **fields) -> PagedKv:
    """A PagedKv of k, v [sum(lengths), Hkv, D] written as the engine writes its cache (write_kv_torch:
    an fp8 cache gets each (token, kv head) row quantized with its own scale)."""
    dtype = FP8_DTYPE if kv_dtype == "fp8" else k.dtype
    shape = (num_pages, PAGE_SIZE, *k.shape[-2:])
    kc, vc = (torch.zeros(shape, device=k.device, dtype=dtype) for _ in range(2))
    ks = vs = None
    if kv_dtype == "fp8":
        ks, vs = (new_kv_scales(*shape[:3], device=k.device) for _ in range(2))
    if lengths and sum(lengths):
        write_kv_torch(k, v, kc, vc, _slots(tables, lengths), ks, vs)
    return PagedKv(kc, vc, tables, ks, vs, **fields)


# ------------------------------------------------------------------------------------------------ decode
def _pool_rows(t):
    """(pool, first row) where `t` is rows [first, first + len(t)) of a larger tensor of the same row
    layout (the profiler's slices of one pool), else (t, 0)."""
    base = t._base
    if base is None or base.dim() != t.dim() or tuple(base.shape[1:]) != tuple(t.shape[1:]) or \
            base.stride() != t.stride():
        return t, 0
    offset = t.storage_offset() - base.storage_offset()
    if offset % base.stride(0):
        return t, 0
    return base, offset // base.stride(0)


def table_pages(context: int, max_context: int | None = None) -> int:
    """Pages per decode page table: those of `context` tokens, or of the context cap where it is larger
    (the engine's tables: ceil(bucket.max_context / page_size), runtime/step_inputs.py)."""
    return max(-(-context // PAGE_SIZE), -(-(max_context or 0) // PAGE_SIZE), 1)


def decode_kv(k_cache, v_cache, kv_dtype: str | None = None, max_context: int | None = None) -> tuple[PagedKv, int]:
    """The paged copy of the requests' caches k_cache/v_cache [R, C, Hkv, D] (that of their pool where
    both are the same rows of pools) with page tables of table_pages(C, max_context) pages (entries past
    a request's own pages: page 0, never read), and the first of their rows in its page tables."""
    (kp, first), (vp, vfirst) = _pool_rows(k_cache), _pool_rows(v_cache)
    if first != vfirst or kp.shape != vp.shape:
        (kp, first), vp = (k_cache, 0), v_cache
    R, C = kp.shape[:2]
    width = table_pages(C, max_context)

    def build() -> PagedKv:
        own, total = _page_tables([-(-C // PAGE_SIZE)] * R, kp.device)
        tables = torch.zeros(R, width, dtype=torch.int32, device=kp.device)
        tables[:, :own.shape[1]] = own
        lens = torch.full((R,), C, dtype=torch.int32, device=kp.device)
        return _paged_copy(tables, total, [C] * R, kp.reshape(R * C, *kp.shape[2:]), vp.reshape(R * C, *vp.shape[2:]),
                           kv_dtype, context_lens=lens)

    return _cached((kp, vp), ("decode", kv_dtype, width), build), first


def _decode_impl(kv_dtype: str | None):
    """The decode_attn impl over a paged cache of `kv_dtype` (module doc), with its `prepare`."""
    def attn(q, k_cache, v_cache, context_lens, out, num_sms, scale=None, max_context=None):
        kv, first = decode_kv(k_cache, v_cache, kv_dtype, max_context)
        R, D = q.shape[0], q.shape[2]
        tables = kv.page_tables[first:first + R]
        lens = kv.context_lens[first:first + R] if context_lens is None else context_lens
        out = torch.empty_like(q) if out is None else out
        fn = paged_decode_attention if HAVE_TRITON and q.is_cuda else paged_decode_attention_torch
        return fn(q, kv.k, kv.v, tables, lens, out, D ** -0.5 if scale is None else scale, num_sms=num_sms or None,
                  **kv.scale_kwargs)

    def prepare(q, k_cache, v_cache, context_lens, out, num_sms, scale=None, max_context=None) -> None:
        decode_kv(k_cache, v_cache, kv_dtype, max_context)

    attn.prepare = prepare
    return attn


paged_decode_attn = _decode_impl(None)
paged_decode_attn.__doc__ = """decode_attn through the engine's paged kernel on a cache of the inputs' dtype (module doc);
context_lens None: every request's whole cache. Returns out."""
paged_fp8kv_decode_attn = _decode_impl("fp8")
paged_fp8kv_decode_attn.__doc__ = "paged_decode_attn over an fp8 cache with per-(token, kv head) scales."


# ------------------------------------------------------------------------------------------------ prefill
def _host_ints(x) -> tuple[int, ...]:
    return tuple(int(c) for c in (x.tolist() if hasattr(x, "tolist") else x))


def prefill_kv(k, v, cu_seqlens, prefix_lens=None, kv_dtype: str | None = None) -> PagedKv:
    """The paged copy (cache of `kv_dtype`) of the chunks k/v [T, Hkv, D] (chunk p: rows cu[p]:cu[p+1])
    after their requests' prefixes (random K/V, seeded), with the kernels' chunk fields (chunk_starts,
    chunk_lens, prefix_lens)."""
    cu = _host_ints(cu_seqlens)
    lens = [b - a for a, b in pairwise(cu)]
    prefixes = _host_ints(prefix_lens) if prefix_lens is not None else (0,) * len(lens)
    if len(prefixes) != len(lens) or min(prefixes, default=0) < 0 or min(lens, default=0) < 0:
        raise ValueError(f"prefix_lens {prefixes} do not fit the {len(lens)} chunks of cu_seqlens {cu}")

    def build() -> PagedKv:
        totals = [p + n for p, n in zip(prefixes, lens)]
        tables, num_pages = _page_tables([-(-n // PAGE_SIZE) for n in totals], k.device)
        g = torch.Generator().manual_seed(SEED + 1)
        srcs = []
        for src in (k, v):
            parts = []
            for (a, b), p in zip(pairwise(cu), prefixes):
                parts.append(torch.randn(p, *src.shape[1:], generator=g).to(src.device, src.dtype))
                parts.append(src[a:b])
            srcs.append(torch.cat(parts) if parts else src[:0])
        as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device=k.device)
        return _paged_copy(tables, num_pages, totals, *srcs, kv_dtype, chunk_starts=as_int(cu[:-1]),
                           chunk_lens=as_int(lens), prefix_lens=as_int(prefixes))

    return _cached((k, v), ("prefill", cu, prefixes, kv_dtype), build)


def _prefill_impl(kv_dtype: str | None):
    """The prefill_attn impl over a paged cache of `kv_dtype` (module doc), with its `prepare`."""
    def attn(q, k, v, cu_seqlens, out, num_sms, scale=None, prefix_lens=None):
        kv = prefill_kv(k, v, cu_seqlens, prefix_lens, kv_dtype)
        out = torch.empty_like(q) if out is None else out
        fn = paged_prefill_attention if HAVE_TRITON and q.is_cuda else paged_prefill_attention_torch
        return fn(q, kv.k, kv.v, kv.page_tables, kv.chunk_starts, kv.chunk_lens, kv.prefix_lens, out,
                  q.shape[2] ** -0.5 if scale is None else scale, num_sms=num_sms or None, **kv.scale_kwargs)

    def prepare(q, k, v, cu_seqlens, out, num_sms, scale=None, prefix_lens=None) -> None:
        prefill_kv(k, v, cu_seqlens, prefix_lens, kv_dtype)

    attn.prepare = prepare
    return attn


paged_prefill_attn = _prefill_impl(None)
paged_prefill_attn.__doc__ = """prefill_attn through the engine's paged chunked-prefill kernel on a cache of the inputs'
dtype (module doc). Returns out."""
paged_fp8kv_prefill_attn = _prefill_impl("fp8")
paged_fp8kv_prefill_attn.__doc__ = "paged_prefill_attn over an fp8 cache with per-(token, kv head) scales."

__all__ = ["KV_DTYPES", "PAGE_SIZE", "PagedKv", "decode_kv", "paged_decode_attn", "paged_fp8kv_decode_attn",
           "paged_fp8kv_prefill_attn", "paged_prefill_attn", "prefill_chunks", "prefill_kv", "table_pages"]
