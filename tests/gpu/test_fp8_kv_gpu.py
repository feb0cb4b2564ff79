"""The fp8 KV cache on a GPU: the Triton write kernel writes the torch path's bytes and scales, the
Triton decode and prefill kernels on fp8 caches match the torch references (bf16 queries), fp8
attention stays within fp8 error of bf16 attention on the same K/V, the whole write -> decode ->
prefill step captures in a CUDA graph and replays with new lengths, and the engine serves with
--kv-cache-dtype fp8 under CUDA graphs (tokens finish, about twice the pages of bf16)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from paged_util import capture, rel_error, scattered_tables
from nfsearch.runtime.kernels.paged_attention_torch import new_kv_scales

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DT = torch.bfloat16
FP8 = torch.float8_e4m3fn
FP8_TOL = 8e-2          # fp8 cache against a bf16 cache of the same random K/V (e4m3: 3 mantissa bits)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(hash(request.node.name) % (2**31))


def _fp8_cache(num_pages, page_size, hkv, d):
    """(bf16 K, bf16 V, fp8 K, fp8 V, K scales, V scales): random K/V written row by row by write_kv_torch."""
    from nfsearch.runtime.kernels.paged_attention import write_kv_torch
    kb = torch.randn(num_pages, page_size, hkv, d, device="cuda", dtype=DT) * 3
    vb = torch.randn_like(kb)
    k8 = torch.zeros(kb.shape, device="cuda", dtype=FP8)
    v8 = torch.zeros_like(k8)
    ks, vs = (new_kv_scales(*kb.shape[:3], device="cuda") for _ in range(2))
    slots = torch.arange(num_pages * page_size, device="cuda")
    write_kv_torch(kb.view(-1, hkv, d), vb.view(-1, hkv, d), k8, v8, slots, ks, vs)
    return kb, vb, k8, v8, ks, vs


def test_write_kv_fp8_matches_torch_bytes():
    from nfsearch.runtime.kernels.paged_attention import write_kv, write_kv_torch
    qkv = torch.randn(300, (32 + 16) * 128, device="cuda", dtype=DT) * torch.logspace(-3, 2, 300, device="cuda")[:, None].to(DT)
    k, v = qkv[:, 4096:5120].view(300, 8, 128), qkv[:, 5120:].view(300, 8, 128)
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    slots[::7] = -1
    caches = [[torch.zeros(64, 16, 8, 128, device="cuda", dtype=FP8) for _ in range(2)] +
              [torch.ones(64, 16, 8, device="cuda") for _ in range(2)] for _ in range(2)]
    (kc, vc, ks, vs), (kc2, vc2, ks2, vs2) = caches
    write_kv(k, v, kc, vc, slots, k_scales=ks, v_scales=vs)
    write_kv_torch(k, v, kc2, vc2, slots, ks2, vs2)
    assert torch.equal(kc.view(torch.uint8), kc2.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), vc2.view(torch.uint8))
    assert torch.equal(ks, ks2) and torch.equal(vs, vs2)


@pytest.mark.parametrize("num_sms", [None, 32])
@pytest.mark.parametrize("page_size,hq,hkv,d,lens", [
    (16, 32, 8, 128, [1, 0, 17, 1280, 1023, 64, 300]),
    (32, 28, 4, 128, [5, 2000, 33, 0]),
    (64, 8, 8, 64, [129, 64, 3000]),
])
def test_decode_fp8_matches_torch_and_bf16(num_sms, page_size, hq, hkv, d, lens):
    from nfsearch.runtime.kernels.paged_attention import (DECODE_CONFIG, paged_decode_attention,
                                                          paged_decode_attention_torch)
    max_pages = -(-max(lens) // page_size) + 3
    num_pages = sum(-(-n // page_size) for n in lens) + 7
    kb, vb, k8, v8, ks, vs = _fp8_cache(num_pages, page_size, hkv, d)
    pt = scattered_tables(lens, page_size, num_pages, max_pages)
    q = torch.randn(len(lens), hq, d, device="cuda", dtype=DT)
    cl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    scale = 1 / math.sqrt(d)
    ref = paged_decode_attention_torch(q, k8, v8, pt, cl, torch.empty_like(q), scale, k_scales=ks, v_scales=vs)
    bf16 = paged_decode_attention(q, kb, vb, pt, cl, torch.empty_like(q), scale, num_sms=num_sms)
    # the fp8 default (V staged as fp16) and the bf16 default's config (V loaded as bytes)
    for num_splits, config in [(n, c) for n in (None, 1, 5) for c in (None, DECODE_CONFIG)]:
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k8, v8, pt, cl, out, scale, num_sms=num_sms, num_splits=num_splits,
                               config=config, k_scales=ks, v_scales=vs)
        rel_error(out, ref)
        rel_error(out, bf16, FP8_TOL)
        assert out[cl == 0].abs().sum() == 0


@pytest.mark.parametrize("segs,num_rows", [
    ([(40, 600, 1024), (640, 1, 0), (641, 37, 17), (0, 0, 0)], 700),
    ([(0, 600, 0)], 600),
])
def test_prefill_fp8_matches_torch_and_bf16(segs, num_rows):
    from nfsearch.runtime.kernels.paged_attention import (
        paged_prefill_attention,
        paged_prefill_attention_torch,
    )
    page_size, hq, hkv, d = 16, 32, 8, 128
    kv_lens = [p + n for _, n, p in segs]
    max_pages = -(-max(kv_lens) // page_size) + 2
    num_pages = sum(-(-n // page_size) for n in kv_lens) + 5
    kb, vb, k8, v8, ks, vs = _fp8_cache(num_pages, page_size, hkv, d)
    pt = scattered_tables(kv_lens, page_size, num_pages, max_pages)
    q = torch.randn(num_rows, hq, d, device="cuda", dtype=DT)
    starts, lens, prefixes = (torch.tensor(c, dtype=torch.int32, device="cuda") for c in zip(*segs))
    scale = 1 / math.sqrt(d)
    ref = torch.full_like(q, float("nan"))
    paged_prefill_attention_torch(q, k8, v8, pt, starts, lens, prefixes, ref, scale, k_scales=ks, v_scales=vs)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k8, v8, pt, starts, lens, prefixes, out, scale, k_scales=ks, v_scales=vs)
    bf16 = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, kb, vb, pt, starts, lens, prefixes, bf16, scale)
    owned = ~ref.isnan()
    assert torch.equal(owned, ~out.isnan())
    rel_error(out[owned], ref[owned])
    rel_error(out[owned], bf16[owned], FP8_TOL)


def test_fp8_graph_replay_with_new_lengths():
    """write_kv -> decode -> prefill on fp8 caches captured once, replayed with new tables and data."""
    from nfsearch.runtime.kernels import paged_attention as pa
    ps, hq, hkv, d, B, S, T, max_pages, num_pages = 16, 32, 8, 128, 24, 3, 256, 40, 1200
    _, _, kc, vc, ks, vs = _fp8_cache(num_pages, ps, hkv, d)
    sc = {"k_scales": ks, "v_scales": vs}
    pt = torch.zeros(B + S, max_pages, dtype=torch.int32, device="cuda")
    cl = torch.zeros(B, dtype=torch.int32, device="cuda")
    starts, lens, prefixes = (torch.zeros(S, dtype=torch.int32, device="cuda") for _ in range(3))
    slots = torch.full((T,), -1, dtype=torch.int64, device="cuda")
    qd, qp = torch.randn(B, hq, d, device="cuda", dtype=DT), torch.randn(T, hq, d, device="cuda", dtype=DT)
    kn, vn = torch.randn(T, hkv, d, device="cuda", dtype=DT), torch.randn(T, hkv, d, device="cuda", dtype=DT)
    od, op = torch.zeros_like(qd), torch.zeros_like(qp)
    scale = 1 / math.sqrt(d)

    def step():
        pa.write_kv(kn, vn, kc, vc, slots, **sc)
        pa.paged_decode_attention(qd, kc, vc, pt[:B], cl, od, scale, **sc)
        pa.paged_prefill_attention(qp, kc, vc, pt[B:], starts, lens, prefixes, op, scale, **sc)

    graph = capture(step)
    for trial in range(3):
        dec_lens = torch.randint(1, max_pages * ps + 1, (B,))
        dec_lens[trial] = 0
        chunk = torch.randint(1, 80, (S,))
        pre = torch.randint(0, 200, (S,))
        first = torch.cumsum(chunk, 0) - chunk
        tables = scattered_tables(dec_lens.tolist() + (pre + chunk).tolist(), ps, num_pages, max_pages)
        new_slots = torch.full((T,), -1, dtype=torch.int64)
        for s in range(S):
            for i in range(int(chunk[s])):
                p = int(pre[s]) + i
                new_slots[int(first[s]) + i] = int(tables[B + s, p // ps]) * ps + p % ps
        for buf, val in ((pt, tables), (cl, dec_lens), (starts, first), (lens, chunk), (prefixes, pre),
                         (slots, new_slots), (qd, torch.randn_like(qd)), (qp, torch.randn_like(qp)),
                         (kn, torch.randn_like(kn)), (vn, torch.randn_like(vn))):
            buf.copy_(val)
        od.fill_(float("nan"))
        op.fill_(float("nan"))
        refs = [t.clone() for t in (kc, vc, ks, vs)]
        pa.write_kv_torch(kn, vn, *refs[:2], slots, *refs[2:])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(kc.view(torch.uint8), refs[0].view(torch.uint8)) and torch.equal(ks, refs[2])
        rel_error(od, pa.paged_decode_attention_torch(qd, kc, vc, pt[:B], cl, torch.empty_like(od), scale, **sc))
        ref = torch.full_like(op, float("nan"))
        pa.paged_prefill_attention_torch(qp, kc, vc, pt[B:], starts, lens, prefixes, ref, scale, **sc)
        owned = ~ref.isnan()
        assert torch.equal(owned, ~op.isnan())
        rel_error(op[owned], ref[owned])


def test_engine_fp8_kv_with_graphs():
    import gc

    from conftest import ENGINE_TINY

    from nfsearch.runtime.engine import Engine, TraceShape
    from nfsearch.serving.traces import Request
    reqs = [Request(i, 5 + (7 * i) % 57, 3 + (5 * i) % 23) for i in range(40)]
    pages = {}
    for kv in ("auto", "fp8"):
        engine = Engine(ENGINE_TINY, device="cuda", dtype="bf16", gpu_memory_utilization=0.9, dense_batch=128,
                        max_decode=32, trace_shape=TraceShape.of(reqs), memory_bytes=2 << 30, kv_cache_dtype=kv)
        assert engine.use_cuda_graphs
        run = engine.run(reqs)
        assert all(s.finish_reason == "length" and len(s.output_ids) == r.output_len
                   for s, r in zip(sorted(run.sequences, key=lambda s: s.seq_id), reqs))
        assert run.num_eager_launches == 0
        pages[kv] = (engine.num_pages, engine.kv_token_bytes)
        del engine, run
        gc.collect()
        torch.cuda.empty_cache()
    d = 16                                         # the tiny model's head dim
    assert pages["auto"][1] / pages["fp8"][1] == 2 * d / (d + 4)      # bytes per token: bf16 K/V, e4m3 + scales
    # pages: the same memory less what each engine's own buffers take (1.536 measured on an H100)
    assert abs(pages["fp8"][0] / pages["auto"][0] - 2 * d / (d + 4)) < 0.1
