"""The Triton paged-KV kernels (kernels/paged_attention.py) against their torch references, bf16.

Fresh random caches with scattered pages, outputs poisoned with NaN, relative error < 2e-2; on the
whole GPU and on an SM share (32); and under CUDA-graph capture, replayed with new lengths, page
tables and queries copied into the static buffers. Skipped without a CUDA GPU or triton."""

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from paged_util import capture, rel_error, scattered_tables

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DT = torch.bfloat16


def _sms():
    if not torch.cuda.is_available():          # collected (then skipped) on a machine without CUDA
        return [32]
    return [torch.cuda.get_device_properties(0).multi_processor_count, 32]




def _cache(num_pages, page_size, hkv, d):
    k = torch.randn(num_pages, page_size, hkv, d, device="cuda", dtype=DT)
    return k, torch.randn_like(k)




@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(hash(request.node.name) % (2**31))


@pytest.mark.parametrize("num_sms", _sms())
@pytest.mark.parametrize("page_size,hq,hkv,d,lens", [
    (16, 32, 8, 128, [1, 0, 17, 1280, 1023, 64, 300]),     # LLaMA-3-8B heads, a padded slot
    (32, 28, 4, 128, [5, 2000, 33, 0]),                      # G = 7 (Qwen2-7B heads)
    (64, 8, 8, 64, [129, 64, 3000]),                         # G = 1, few requests: split KV
])
def test_decode_matches_torch(num_sms, page_size, hq, hkv, d, lens):
    from nfsearch.runtime.kernels.paged_attention import paged_decode_attention, paged_decode_attention_torch

    max_pages = -(-max(lens) // page_size) + 3
    num_pages = sum(-(-n // page_size) for n in lens) + 7
    kc, vc = _cache(num_pages, page_size, hkv, d)
    pt = scattered_tables(lens, page_size, num_pages, max_pages)
    q = torch.randn(len(lens), hq, d, device="cuda", dtype=DT)
    cl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    scale = 1 / math.sqrt(d)
    ref = paged_decode_attention_torch(q, kc, vc, pt, cl, torch.empty_like(q), scale)
    for num_splits in (None, 1, 5):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, kc, vc, pt, cl, out, scale, num_sms=num_sms, num_splits=num_splits)
        rel_error(out, ref)
        assert out[cl == 0].abs().sum() == 0, "a padded slot's row is not zero"


def _prefill_case(page_size, hq, hkv, d, segs, num_rows):
    """segs: (first row, rows, prefix) per segment (rows 0 = padded). Random q, cache, tables."""
    kv_lens = [p + n for _, n, p in segs]
    max_pages = -(-max(kv_lens) // page_size) + 2
    num_pages = sum(-(-n // page_size) for n in kv_lens) + 5
    kc, vc = _cache(num_pages, page_size, hkv, d)
    pt = scattered_tables(kv_lens, page_size, num_pages, max_pages)
    q = torch.randn(num_rows, hq, d, device="cuda", dtype=DT)
    starts, lens, prefixes = (torch.tensor(c, dtype=torch.int32, device="cuda") for c in zip(*segs))
    return q, kc, vc, pt, starts, lens, prefixes


@pytest.mark.parametrize("num_sms", _sms())
@pytest.mark.parametrize("page_size,hq,hkv,d,segs,num_rows", [
    (16, 32, 8, 128, [(40, 600, 1024), (640, 1, 0), (641, 37, 17), (0, 0, 0)], 700),   # decode rows 0-39 untouched
    (16, 32, 8, 128, [(0, 600, 0)], 600),
    (32, 28, 4, 128, [(3, 100, 31), (103, 250, 0)], 360),     # G = 7: rows of a block not a power of two
    (64, 8, 8, 64, [(0, 129, 64), (129, 70, 1000)], 199),
    (16, 32, 8, 128, [(0, 0, 0), (5, 50, 300), (0, 0, 0), (55, 7, 0), (0, 0, 0)], 64),   # padding between
    (16, 32, 8, 128, [(0, 0, 0), (0, 0, 0)], 16),                                         # nothing to do
])
def test_prefill_matches_torch(num_sms, page_size, hq, hkv, d, segs, num_rows):
    from nfsearch.runtime.kernels.paged_attention import (
        paged_prefill_attention,
        paged_prefill_attention_torch,
    )

    q, kc, vc, pt, starts, lens, prefixes = _prefill_case(page_size, hq, hkv, d, segs, num_rows)
    scale = 1 / math.sqrt(d)
    ref = torch.full_like(q, float("nan"))
    paged_prefill_attention_torch(q, kc, vc, pt, starts, lens, prefixes, ref, scale)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, kc, vc, pt, starts, lens, prefixes, out, scale, num_sms=num_sms)
    owned = ~ref.isnan()
    assert torch.equal(owned, ~out.isnan()), "rows written differ from the chunks' rows"
    rel_error(out[owned], ref[owned])


def test_write_kv_matches_torch():
    from nfsearch.runtime.kernels.paged_attention import write_kv, write_kv_torch

    qkv = torch.randn(300, (32 + 16) * 128, device="cuda", dtype=DT)
    k, v = qkv[:, 4096:5120].view(300, 8, 128), qkv[:, 5120:].view(300, 8, 128)
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    slots[::7] = -1
    kc, vc = _cache(64, 16, 8, 128)
    kc2, vc2 = kc.clone(), vc.clone()
    write_kv(k, v, kc, vc, slots)
    write_kv_torch(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)




@pytest.mark.parametrize("num_sms", _sms())
def test_graph_replay_with_new_lengths(num_sms):
    """write_kv -> decode -> prefill captured once; each replay gets new tables, lengths and queries."""
    from nfsearch.runtime.kernels import paged_attention as pa

    ps, hq, hkv, d, B, S, T, max_pages, num_pages = 16, 32, 8, 128, 24, 3, 256, 40, 1200
    kc, vc = _cache(num_pages, ps, hkv, d)
    pt = torch.zeros(B + S, max_pages, dtype=torch.int32, device="cuda")
    cl = torch.zeros(B, dtype=torch.int32, device="cuda")
    starts, lens, prefixes = (torch.zeros(S, dtype=torch.int32, device="cuda") for _ in range(3))
    slots = torch.full((T,), -1, dtype=torch.int64, device="cuda")
    qd, qp = torch.randn(B, hq, d, device="cuda", dtype=DT), torch.randn(T, hq, d, device="cuda", dtype=DT)
    kn, vn = torch.randn(T, hkv, d, device="cuda", dtype=DT), torch.randn(T, hkv, d, device="cuda", dtype=DT)
    od, op = torch.zeros_like(qd), torch.zeros_like(qp)
    scale = 1 / math.sqrt(d)

    def step():
        pa.write_kv(kn, vn, kc, vc, slots)
        pa.paged_decode_attention(qd, kc, vc, pt[:B], cl, od, scale, num_sms=num_sms)
        pa.paged_prefill_attention(qp, kc, vc, pt[B:], starts, lens, prefixes, op,
                                   scale, num_sms=num_sms)

    graph = capture(step)
    for trial in range(3):
        dec_lens = torch.randint(0, max_pages * ps + 1, (B,))
        dec_lens[trial] = 0
        chunk = torch.randint(0, 80, (S,))
        chunk[trial % S] = 0
        pre = torch.randint(0, 200, (S,))
        first = torch.cumsum(chunk, 0) - chunk
        tables = scattered_tables(dec_lens.tolist() + (pre + chunk).tolist(), ps, num_pages, max_pages)
        new_slots = torch.full((T,), -1, dtype=torch.int64)
        for s in range(S):                   # the chunk's own K/V are written by the same step
            for i in range(int(chunk[s])):
                p = int(pre[s]) + i
                new_slots[int(first[s]) + i] = int(tables[B + s, p // ps]) * ps + p % ps
        for buf, val in ((pt, tables), (cl, dec_lens), (starts, first), (lens, chunk), (prefixes, pre),
                         (slots, new_slots), (qd, torch.randn_like(qd)), (qp, torch.randn_like(qp)),
                         (kn, torch.randn_like(kn)), (vn, torch.randn_like(vn))):
            buf.copy_(val)
        od.fill_(float("nan"))
        op.fill_(float("nan"))
        kc_ref, vc_ref = kc.clone(), vc.clone()
        pa.write_kv_torch(kn, vn, kc_ref, vc_ref, slots)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
        rel_error(od, pa.paged_decode_attention_torch(qd, kc, vc, pt[:B], cl, torch.empty_like(od), scale))
        ref = torch.full_like(op, float("nan"))
        pa.paged_prefill_attention_torch(qp, kc, vc, pt[B:], starts, lens, prefixes, ref, scale)
        owned = ~ref.isnan()
        assert torch.equal(owned, ~op.isnan())
        rel_error(op[owned], ref[owned])


def test_write_kv_torch_captures():
    from nfsearch.runtime.kernels.paged_attention import write_kv_torch

    kc, vc = _cache(8, 16, 2, 64)
    k, v = torch.randn(5, 2, 64, device="cuda", dtype=DT), torch.randn(5, 2, 64, device="cuda", dtype=DT)
    slots = torch.tensor([-1, 3, -1, 100, 7], device="cuda")
    graph = capture(lambda: write_kv_torch(k, v, kc, vc, slots))
    for new in ([9, -1, -1, 2, 127], [-1, -1, -1, -1, -1]):
        slots.copy_(torch.tensor(new))
        kc_ref, vc_ref = kc.clone(), vc.clone()
        for t, s in enumerate(new):
            if s >= 0:
                kc_ref.view(-1, 2, 64)[s], vc_ref.view(-1, 2, 64)[s] = k[t], v[t]
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
