"""Torch versions of the paged-KV ops: the engine's CPU path and the GPU kernels' reference.

KV cache per layer: ``k_cache, v_cache [num_pages, page_size, Hkv, D]``; a request's token at
position ``p`` lives in page ``page_table[p // page_size]`` at offset ``p % page_size``.

The attention references loop over requests on the host (reading the lengths syncs the host on a
GPU), gather each request's pages into contiguous K/V and compute softmax in fp32, whatever the
cache dtype. ``write_kv_torch`` syncs nothing and can be captured in a CUDA graph.
"""

from __future__ import annotations

from ._common import torch


def write_kv_torch(k, v, k_cache, v_cache, slot_mapping):
    """k_cache.view(-1, Hkv, D)[slot_mapping[t]] = k[t] (same for v); rows whose slot is -1 are skipped.

    k, v [T, Hkv, D]; slot_mapping [T] (int). No host sync: a skipped row is sent to the first valid
    row's slot carrying that row's own values (duplicate indices with equal values are deterministic);
    when no row is valid, every row rewrites slot 0 with what it already holds."""
    if k.shape[0] == 0:
        return
    for src, cache in ((k, k_cache), (v, v_cache)):
        flat = cache.view(-1, *cache.shape[2:])          # [num_pages * page_size, Hkv, D]
        valid = slot_mapping >= 0                         # [T]
        first = torch.argmax(valid.to(torch.int32)).view(1)   # first valid row, 0 if none
        any_valid = valid.any()
        # index_select, not t[first]: a 0-d tensor index is read on the host, which a capture refuses
        anchor_slot = torch.where(any_valid, slot_mapping.index_select(0, first)[0], 0).to(torch.long)
        anchor_val = torch.where(any_valid, src.index_select(0, first)[0].to(cache.dtype), flat[0])
        idx = torch.where(valid, slot_mapping.to(torch.long), anchor_slot)
        vals = torch.where(valid[:, None, None], src.to(cache.dtype), anchor_val[None])
        flat.index_copy_(0, idx, vals)


def gather_kv(cache, page_table, num_tokens: int):
    """The first ``num_tokens`` tokens of one request, contiguous: [num_tokens, Hkv, D]."""
    page_size = cache.shape[1]
    num_pages = -(-num_tokens // page_size)
    pages = page_table[:num_pages].to(device=cache.device, dtype=torch.long)
    return cache[pages].reshape(-1, *cache.shape[2:])[:num_tokens]


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


def paged_decode_attention_torch(q, k_cache, v_cache, page_tables, context_lens, out, scale, num_sms=None):
    """out[b] = attention of q[b] [Hq, D] over the first context_lens[b] tokens of request b's pages.

    page_tables [B, max_pages]; context_lens [B] (0: a padded slot, its out row is zeros)."""
    lens = _host_ints(context_lens)
    for b, num_tokens in enumerate(lens):
        if num_tokens <= 0:
            out[b] = 0
            continue
        k = gather_kv(k_cache, page_tables[b], num_tokens)
        v = gather_kv(v_cache, page_tables[b], num_tokens)
        out[b] = attend(q[b:b + 1], k, v, scale)[0].to(out.dtype)
    return out


def paged_prefill_attention_torch(q, k_cache, v_cache, page_tables, chunk_starts, chunk_lens, prefix_lens, out,
                                  scale, num_sms=None):
    """Chunk s owns rows [chunk_starts[s], +chunk_lens[s]) of q [T, Hq, D]; its row i sits at position
    prefix_lens[s] + i and attends to keys 0..that position of its request (page_tables[s]).
    Rows outside every chunk are not written; chunk_lens[s] == 0 is a padded segment."""
    starts, lens, prefixes = _host_ints(chunk_starts), _host_ints(chunk_lens), _host_ints(prefix_lens)
    for s, (start, num_rows, prefix) in enumerate(zip(starts, lens, prefixes)):
        if num_rows <= 0:
            continue
        num_keys = prefix + num_rows
        k = gather_kv(k_cache, page_tables[s], num_keys)
        v = gather_kv(v_cache, page_tables[s], num_keys)
        pos = prefix + torch.arange(num_rows, device=q.device)
        mask = torch.arange(num_keys, device=q.device)[None, :] <= pos[:, None]   # [rows, keys]
        out[start:start + num_rows] = attend(q[start:start + num_rows], k, v, scale, mask).to(out.dtype)
    return out
