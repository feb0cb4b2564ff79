"""The torch paged-KV ops (kernels/paged_attention_torch.py) against naive dense attention on
contiguous K/V: scattered pages, GQA, odd lengths, a cached prefix + a chunk, padded slots and segments.
The Triton kernels are checked against these on the GPU (tests/gpu/test_paged_attention.py)."""

import math

import pytest

torch = pytest.importorskip("torch")

from nfsearch.runtime.kernels.paged_attention import (
    paged_decode_attention_torch,
    paged_prefill_attention_torch,
    write_kv,
    write_kv_torch,
)


def dense_attention(q, k, v, scale, first_pos=None):
    """float64 loops: q [M, Hq, D], k/v [N, Hkv, D]; row i sees keys 0..first_pos+i (all if None)."""
    M, HQ, _ = q.shape
    G = HQ // k.shape[1]
    out = torch.zeros(M, HQ, q.shape[2], dtype=torch.float64)
    for i in range(M):
        n = k.shape[0] if first_pos is None else first_pos + i + 1
        for h in range(HQ):
            w = torch.softmax((k[:n, h // G].double() @ q[i, h].double()) * scale, dim=0)
            out[i, h] = w @ v[:n, h // G].double()
    return out


def paged(k_list, v_list, page_size, num_pages, seed=0):
    """Scatter each request's contiguous K/V [L, Hkv, D] over random pages of fresh caches.
    Returns (k_cache, v_cache, page_tables [R, max_pages] int32 padded with -1)."""
    gen = torch.Generator().manual_seed(seed)
    Hkv, D = k_list[0].shape[1:]
    k_cache = torch.randn(num_pages, page_size, Hkv, D, generator=gen)   # junk where nothing is written
    v_cache = torch.randn(num_pages, page_size, Hkv, D, generator=gen)
    free = torch.randperm(num_pages, generator=gen).tolist()
    need = [-(-k.shape[0] // page_size) for k in k_list]
    tables = torch.full((len(k_list), max(need) + 1), -1, dtype=torch.int32)
    for r, (k, v) in enumerate(zip(k_list, v_list)):
        for j in range(need[r]):
            page = free.pop()
            tables[r, j] = page
            rows = slice(j * page_size, min((j + 1) * page_size, k.shape[0]))
            n = rows.stop - rows.start
            k_cache[page, :n], v_cache[page, :n] = k[rows], v[rows]
    return k_cache, v_cache, tables


def test_decode_by_hand():
    # one request, two tokens, one head, D = 2: weights e^(s)/(e^(s) + 1) with s = scale * q.k0
    q = torch.tensor([[[2.0, 0.0]]])
    k = torch.tensor([[[1.0, 0.0]], [[0.0, 5.0]]])
    v = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    kc, vc, pt = paged([k], [v], page_size=1, num_pages=4)
    out = paged_decode_attention_torch(q, kc, vc, pt, torch.tensor([2]), torch.empty(1, 1, 2), 0.5)
    w0 = math.exp(1.0) / (math.exp(1.0) + 1.0)
    assert out[0, 0].tolist() == pytest.approx([w0, 1.0 - w0], rel=1e-6)


@pytest.mark.parametrize("page_size", [4, 16])
def test_decode_matches_dense(page_size):
    torch.manual_seed(1)
    HQ, HKV, D, lens = 8, 2, 16, [1, 17, 0, 33, 16]      # GQA 4, odd lengths, a padded slot
    ks = [torch.randn(max(L, 1), HKV, D) for L in lens]
    vs = [torch.randn(max(L, 1), HKV, D) for L in lens]
    kc, vc, pt = paged(ks, vs, page_size, num_pages=40)
    q = torch.randn(len(lens), HQ, D)
    out = torch.full((len(lens), HQ, D), float("nan"))
    paged_decode_attention_torch(q, kc, vc, pt, torch.tensor(lens, dtype=torch.int32), out, 0.25)
    for r, L in enumerate(lens):
        want = torch.zeros(1, HQ, D, dtype=torch.float64) if L == 0 else dense_attention(q[r:r + 1], ks[r], vs[r], 0.25)
        torch.testing.assert_close(out[r].double(), want[0], rtol=1e-5, atol=1e-5)


def test_decode_bf16_cache_close_to_fp32():
    torch.manual_seed(2)
    ks, vs = [torch.randn(21, 2, 32)], [torch.randn(21, 2, 32)]
    kc, vc, pt = paged(ks, vs, 16, num_pages=5)
    q = torch.randn(1, 4, 32)
    lens = torch.tensor([21])
    ref = paged_decode_attention_torch(q, kc, vc, pt, lens, torch.empty(1, 4, 32), 0.2)
    out = paged_decode_attention_torch(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), pt, lens,
                                       torch.empty(1, 4, 32, dtype=torch.bfloat16), 0.2)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_prefill_matches_dense():
    torch.manual_seed(3)
    HQ, HKV, D, page_size = 6, 2, 16, 4
    # (first row, chunk rows, cached prefix); a padded segment last
    segs = [(2, 5, 0), (7, 9, 11), (16, 1, 6), (0, 0, 0)]
    T = 20                                                  # rows 0-1 and 17-19 belong to no chunk
    ks = [torch.randn(max(p + n, 1), HKV, D) for _, n, p in segs]
    vs = [torch.randn(max(p + n, 1), HKV, D) for _, n, p in segs]
    kc, vc, pt = paged(ks, vs, page_size, num_pages=30)
    q = torch.randn(T, HQ, D)
    out = torch.full((T, HQ, D), float("nan"))
    starts, lens, prefixes = (torch.tensor(c, dtype=torch.int32) for c in zip(*segs))
    paged_prefill_attention_torch(q, kc, vc, pt, starts, lens, prefixes, out, 0.3)
    for s, (start, n, p) in enumerate(segs):
        if n:
            want = dense_attention(q[start:start + n], ks[s], vs[s], 0.3, first_pos=p)
            torch.testing.assert_close(out[start:start + n].double(), want, rtol=1e-5, atol=1e-5)
    assert out[[0, 1, 17, 18, 19]].isnan().all(), "rows outside every chunk were written"


def test_prefill_in_two_chunks_equals_one_chunk():
    torch.manual_seed(4)
    k, v = torch.randn(13, 2, 8), torch.randn(13, 2, 8)
    kc, vc, pt = paged([k], [v], 4, num_pages=8)
    q = torch.randn(13, 4, 8)
    whole = paged_prefill_attention_torch(q, kc, vc, pt, torch.tensor([0]), torch.tensor([13]), torch.tensor([0]),
                                          torch.empty(13, 4, 8), 0.35)
    parts = torch.empty(13, 4, 8)
    pts = pt.repeat(2, 1)
    paged_prefill_attention_torch(q, kc, vc, pts, torch.tensor([0, 7]), torch.tensor([7, 6]), torch.tensor([0, 7]),
                                  parts, 0.35)
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-6)
    # the last row of the last chunk sees every key: equal to decode of that query over 13 tokens
    dec = paged_decode_attention_torch(q[12:13], kc, vc, pt, torch.tensor([13]), torch.empty(1, 4, 8), 0.35)
    torch.testing.assert_close(dec[0], whole[12], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [write_kv_torch, write_kv])
def test_write_kv_skips_padding(fn):
    torch.manual_seed(5)
    kc, vc = torch.randn(3, 4, 2, 8), torch.randn(3, 4, 2, 8)
    before_k, before_v = kc.clone(), vc.clone()
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([-1, 5, -1, 0, 11])
    fn(k, v, kc, vc, slots)
    want_k, want_v = before_k.view(-1, 2, 8).clone(), before_v.view(-1, 2, 8).clone()
    want_k[[5, 0, 11]], want_v[[5, 0, 11]] = k[[1, 3, 4]], v[[1, 3, 4]]
    assert torch.equal(kc.view(-1, 2, 8), want_k) and torch.equal(vc.view(-1, 2, 8), want_v)


def test_write_kv_all_padding_changes_nothing():
    kc, vc = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8)
    before_k, before_v = kc.clone(), vc.clone()
    write_kv_torch(torch.randn(3, 1, 8), torch.randn(3, 1, 8), kc, vc, torch.tensor([-1, -1, -1]))
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


def test_write_kv_from_strided_views_into_bf16_cache():
    # k and v as views of a fused qkv row [T, (Hq + 2 Hkv) * D], the cache in bf16
    qkv = torch.randn(3, (4 + 2 + 2) * 8)
    k = qkv[:, 32:48].view(3, 2, 8)
    v = qkv[:, 48:64].view(3, 2, 8)
    kc = torch.zeros(2, 2, 2, 8, dtype=torch.bfloat16)
    vc = torch.zeros(2, 2, 2, 8, dtype=torch.bfloat16)
    write_kv_torch(k, v, kc, vc, torch.tensor([3, -1, 1]))
    assert torch.equal(kc.view(-1, 2, 8)[3], k[0].bfloat16()) and torch.equal(vc.view(-1, 2, 8)[1], v[2].bfloat16())
    assert kc.view(-1, 2, 8)[[0, 2]].abs().sum() == 0
