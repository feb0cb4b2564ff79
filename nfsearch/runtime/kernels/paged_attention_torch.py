"""Torch versions of the paged-KV ops: the engine's CPU path and the GPU kernels' reference.

KV cache per layer: ``k_cache, v_cache [num_pages, page_size, Hkv, D]``; a request's token at
position ``p`` lives in page ``page_table[p // page_size]`` at offset ``p % page_size``.

The attention references loop over requests on the host (reading the lengths syncs the host on a
GPU), gather each request's pages into contiguous K/V and compute softmax in fp32, whatever the
cache dtype. ``write_kv_torch`` syncs nothing and can be captured in a CUDA graph.

FP8 caches (``torch.float8_e4m3fn``) carry one float32 scale per (token, kv head) for K and one for
V: ``k_scales, v_scales [num_pages, page_size, Hkv]`` (any strides; ``new_kv_scales`` allocates them),
value = fp8 element x scale. Why this grain:
a scale per page (or per page and head) would change as decode appends tokens to a page, so every
append would have to requantize the page's earlier tokens (or fix the scale on its first token and
saturate later, larger ones); a static per-layer scale needs calibration data the engine does not
have (random weights, any checkpoint), and one outlier token (attention-sink keys are often 10-100x
the rest) either saturates or pushes every other token of the layer into e4m3's subnormals. A
per-token-head scale is set once, when the token is written, from that row's own max |x| (which
lands exactly on 448, so nothing saturates in the cache's own writes); it costs 4 bytes per
``D``-byte row (3% at D = 128: an fp8 token takes 0.52x the bytes of a bf16 one, not 0.5x), and the
kernels apply it once per score column (K) and per probability column (V), never per element.
"""

from __future__ import annotations

from ._common import torch


FP8_DTYPE = torch.float8_e4m3fn if torch is not None else None
FP8_MAX = 448.0          # the largest finite float8_e4m3fn


def is_fp8(cache) -> bool:
    return cache.dtype == FP8_DTYPE


def fp8_scales(x):
    """One float32 scale per row of x [..., D]: max |x| / 448 (1.0 for an all-zero row) [...]. The 448
    is a tensor on x's device: torch on a GPU divides by a Python number as a multiplication by its
    rounded reciprocal, one ulp off the IEEE quotient the kernels and the CPU compute for some rows."""
    amax = x.float().abs().amax(-1)
    return torch.where(amax > 0, amax / amax.new_full((), FP8_MAX), torch.ones_like(amax))


def to_fp8(x, scales):
    """x [..., D] / scales [...] rounded to float8_e4m3fn, saturating at +-448 (never NaN from range)."""
    return (x.float() / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8(x):
    """(fp8 [..., D], float32 scales [...]) with x ~= fp8.float() * scales[..., None]."""
    scales = fp8_scales(x)
    return to_fp8(x, scales), scales


def new_kv_scales(num_pages: int, page_size: int, num_kv_heads: int, *, lead=(), device=None):
    """Ones [*lead, num_pages, page_size, Hkv] float32 (a zeroed fp8 row dequantizes to 0), stored
    head-major ([..., Hkv, page_size] in memory): attention reads one kv head's scales of a page, which
    this layout keeps contiguous."""
    return torch.ones((*lead, num_pages, num_kv_heads, page_size), device=device,
                      dtype=torch.float32).transpose(-1, -2)


def dequantize_fp8(q, scales):
    return q.float() * scales[..., None].float()


def write_kv_torch(k, v, k_cache, v_cache, slot_mapping, k_scales=None, v_scales=None):
    """k_cache.view(-1, Hkv, D)[slot_mapping[t]] = k[t] (same for v); rows whose slot is -1 are skipped.

    k, v [T, Hkv, D]; slot_mapping [T] (int). FP8 caches get quantize_fp8(k[t]): the fp8 row in the
    cache and its scales in k_scales [num_pages, page_size, Hkv] (same for v). No host sync."""
    if k.shape[0] == 0:
        return
    for src, cache, scales in ((k, k_cache, k_scales), (v, v_cache, v_scales)):
        if is_fp8(cache):
            if scales is None:
                raise ValueError("an fp8 KV cache needs its scale tensors")
            q, s = quantize_fp8(src)
            _scatter_rows(q.view(torch.uint8), cache.view(torch.uint8), slot_mapping)
            _scatter_rows(s, scales, slot_mapping)
        else:
            _scatter_rows(src.to(cache.dtype), cache, slot_mapping)


def _scatter_rows(src, cache, slot_mapping):
    """cache[slot // page_size, slot % page_size] = src[t] for valid slots, src [T, *row] in cache's
    dtype; cache [num_pages, page_size, *row] with any strides (a view is written in place).

    A skipped row is sent to the first valid row's slot carrying that row's own values (duplicate
    indices with equal values are deterministic); when no row is valid, every row rewrites slot 0
    with what it already holds."""
    page_size = cache.shape[1]
    valid = slot_mapping >= 0                             # [T]
    first = torch.argmax(valid.to(torch.int32)).view(1)   # first valid row, 0 if none
    any_valid = valid.any()
    # index_select, not t[first]: a 0-d tensor index is read on the host, which a capture refuses
    anchor_slot = torch.where(any_valid, slot_mapping.index_select(0, first)[0], 0).to(torch.long)
    anchor_val = torch.where(any_valid, src.index_select(0, first)[0], cache[0, 0])
    idx = torch.where(valid, slot_mapping.to(torch.long), anchor_slot)
    vals = torch.where(valid.view(-1, *[1] * (src.dim() - 1)), src, anchor_val[None])
    cache.index_put_((idx // page_size, idx % page_size), vals)


def gather_kv(cache, page_table, num_tokens: int):
    """The first ``num_tokens`` tokens of one request, contiguous: [num_tokens, Hkv, D]."""
    page_size = cache.shape[1]
    num_pages = -(-num_tokens // page_size)
    pages = page_table[:num_pages].to(device=cache.device, dtype=torch.long)
    return cache[pages].reshape(-1, *cache.shape[2:])[:num_tokens]


def gather_kv_float(cache, scales, page_table, num_tokens: int):
    """gather_kv, dequantized to float32 when the cache is fp8 (scales [num_pages, page_size, Hkv])."""
    if not is_fp8(cache):
        return gather_kv(cache, page_table, num_tokens)
    if scales is None:
        raise ValueError("an fp8 KV cache needs its scale tensors")
    q = gather_kv(cache.view(torch.uint8), page_table, num_tokens).view(FP8_DTYPE)
    return dequantize_fp8(q, gather_kv(scales, page_table, num_tokens))


def attend(q, k, v, scale: float, mask=None):
    """fp32 softmax attention with GQA: q [M, Hq, D], k/v [N, Hkv, D], mask [M, N] (True = visible)."""
    group = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(group, dim=1)       # [N, Hq, D]
    vv = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q.float(), kk) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hmn,nhd->mhd", torch.softmax(scores, dim=-1), vv)   # [M, Hq, D]


def _host_ints(t) -> list[int]:
    return [int(x) for x in (t.tolist() if hasattr(t, "tolist") else t)]


def paged_decode_attention_torch(q, k_cache, v_cache, page_tables, context_lens, out, scale, num_sms=None, *,
                                 k_scales=None, v_scales=None):
    """out[b] = attention of q[b] [Hq, D] over the first context_lens[b] tokens of request b's pages.

    page_tables [B, max_pages]; context_lens [B] (0: a padded slot, its out row is zeros); k_scales,
    v_scales with an fp8 cache (module docstring)."""
    lens = _host_ints(context_lens)
    for b, num_tokens in enumerate(lens):
        if num_tokens <= 0:
            out[b] = 0
            continue
        k = gather_kv_float(k_cache, k_scales, page_tables[b], num_tokens)
        v = gather_kv_float(v_cache, v_scales, page_tables[b], num_tokens)
        out[b] = attend(q[b:b + 1], k, v, scale)[0].to(out.dtype)
    return out


def paged_prefill_attention_torch(q, k_cache, v_cache, page_tables, chunk_starts, chunk_lens, prefix_lens, out,
                                  scale, num_sms=None, *, k_scales=None, v_scales=None):
    """Chunk s owns rows [chunk_starts[s], +chunk_lens[s]) of q [T, Hq, D]; its row i sits at position
    prefix_lens[s] + i and attends to keys 0..that position of its request (page_tables[s]).
    Rows outside every chunk are not written; chunk_lens[s] == 0 is a padded segment."""
    starts, lens, prefixes = _host_ints(chunk_starts), _host_ints(chunk_lens), _host_ints(prefix_lens)
    for s, (start, num_rows, prefix) in enumerate(zip(starts, lens, prefixes)):
        if num_rows <= 0:
            continue
        num_keys = prefix + num_rows
        k = gather_kv_float(k_cache, k_scales, page_tables[s], num_keys)
        v = gather_kv_float(v_cache, v_scales, page_tables[s], num_keys)
        pos = prefix + torch.arange(num_rows, device=q.device)
        mask = torch.arange(num_keys, device=q.device)[None, :] <= pos[:, None]   # [rows, keys]
        out[start:start + num_rows] = attend(q[start:start + num_rows], k, v, scale, mask).to(out.dtype)
    return out
