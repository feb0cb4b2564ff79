"""The fp8 KV cache (--kv-cache-dtype fp8): e4m3 K/V with one float32 scale per (token, kv head).

The quantizer (round trip, scales, saturation), the torch write path (padding, scales beside the
rows), decode and chunk-over-prefix prefill attention on fp8 caches against fp32 attention on the
unquantized K/V, the Triton kernels against the torch references in Triton's interpreter (a child
process: TRITON_INTERPRET must be set before the kernels are defined), the engine end to end on the
CPU (capacity, no page leak) and the logits of tiny transformers-built checkpoints with an fp8 cache
against the same model with an fp32 cache (KL and top-1 agreement, teacher forced).

What a random-weight check can show: that quantization error stays at the e4m3 level through every
layer and does not flip most argmaxes. It cannot show a real model's accuracy: trained K/V have
outlier channels and attention sinks whose effect on fp8 only a real checkpoint measures.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import run_interpreted
from test_engine_model import llama, qwen2  # noqa: E402,F401 (the tiny transformers checkpoints)

from nfsearch.runtime import engine_memory as mem  # noqa: E402
from nfsearch.runtime.kernels.paged_attention_torch import (  # noqa: E402
    FP8_MAX,
    dequantize_fp8,
    paged_decode_attention_torch,
    paged_prefill_attention_torch,
    quantize_fp8,
    to_fp8,
    write_kv_torch,
)

FP8 = torch.float8_e4m3fn
# e4m3 keeps 3 mantissa bits: a normal value rounds within 2^-4 of itself; below 2^-6 x scale
# (subnormals) the step is 2^-9 x scale
REL_STEP = 2.0 ** -4
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(n=64, hkv=2, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mags = torch.logspace(-4, 3, n)[:, None, None]                     # 1e-4 .. 1e3 per row
    return torch.randn(n, hkv, d, generator=gen) * mags


def test_round_trip_within_half_a_step():
    x = _rows()
    q, s = quantize_fp8(x)
    assert q.dtype == FP8 and s.shape == x.shape[:2] and s.dtype == torch.float32
    back = dequantize_fp8(q, s)
    bound = torch.maximum(x.abs() * REL_STEP, s[..., None] * 2.0 ** -10) * 1.0001
    assert ((back - x).abs() <= bound).all()
    # the scale puts each row's max |x| on 448 exactly, so nothing saturates and the max survives
    assert torch.equal(q.float().abs().amax(-1), torch.full(s.shape, FP8_MAX))
    torch.testing.assert_close(back.abs().amax(-1), x.abs().amax(-1), rtol=1e-6, atol=0)
    rel = ((back - x).norm() / x.norm()).item()
    assert 1e-3 < rel < 0.04, rel                     # really quantized, at the e4m3 level


def test_zero_rows_and_saturation():
    q, s = quantize_fp8(torch.zeros(3, 2, 16))
    assert torch.equal(s, torch.ones(3, 2)) and q.float().abs().sum() == 0
    # a fixed scale too small for the values saturates at +-448, never NaN or inf
    x = torch.tensor([[1000.0, -1e6, 448.5, -449.0, 3.0, 0.0]])
    y = to_fp8(x, torch.ones(1)).float()
    assert y.tolist() == [[448.0, -448.0, 448.0, -448.0, 3.0, 0.0]]
    huge = torch.full((1, 1, 8), 3e38)
    q, s = quantize_fp8(huge)
    assert torch.isfinite(dequantize_fp8(q, s)).all()


def _fp8_caches(num_pages=6, page_size=4, hkv=2, d=16):
    kc = torch.zeros(num_pages, page_size, hkv, d, dtype=FP8)
    return kc, kc.clone(), torch.ones(num_pages, page_size, hkv), torch.ones(num_pages, page_size, hkv)


def test_write_kv_fp8_rows_and_scales_skip_padding():
    kc, vc, ks, vs = _fp8_caches()
    k, v = _rows(5, 2, 16, seed=1), _rows(5, 2, 16, seed=2)
    slots = torch.tensor([-1, 5, -1, 0, 23])
    write_kv_torch(k, v, kc, vc, slots, ks, vs)
    for src, cache, scales in ((k, kc, ks), (v, vc, vs)):
        want_q, want_s = quantize_fp8(src[[1, 3, 4]])
        flat, flat_s = cache.view(-1, 2, 16), scales.view(-1, 2)
        assert torch.equal(flat[[5, 0, 23]].view(torch.uint8), want_q.view(torch.uint8))
        assert torch.equal(flat_s[[5, 0, 23]], want_s)
        untouched = [i for i in range(24) if i not in (5, 0, 23)]
        assert flat[untouched].float().abs().sum() == 0 and (flat_s[untouched] == 1).all()
    before = kc.clone(), ks.clone()
    write_kv_torch(k, v, kc, vc, torch.full((5,), -1), ks, vs)           # all padding: nothing changes
    assert torch.equal(kc.view(torch.uint8), before[0].view(torch.uint8)) and torch.equal(ks, before[1])
    with pytest.raises(ValueError, match="scale"):
        write_kv_torch(k, v, kc, vc, slots)


def _paged_fp8(seqs_k, seqs_v, page_size, num_pages, seed=0):
    """Each request's fp32 K/V [L, Hkv, D] written into shuffled pages of an fp8 cache by write_kv_torch.
    Returns (kc, vc, ks, vs, page tables [R, max_pages] int32)."""
    gen = torch.Generator().manual_seed(seed)
    hkv, d = seqs_k[0].shape[1:]
    kc, vc, ks, vs = _fp8_caches(num_pages, page_size, hkv, d)
    free = torch.randperm(num_pages, generator=gen).tolist()
    need = [-(-k.shape[0] // page_size) for k in seqs_k]
    tables = torch.zeros(len(seqs_k), max(need) + 1, dtype=torch.int32)
    for r, (k, v) in enumerate(zip(seqs_k, seqs_v)):
        tables[r, :need[r]] = torch.tensor([free.pop() for _ in range(need[r])], dtype=torch.int32)
        pos = torch.arange(k.shape[0])
        slots = tables[r, pos // page_size].long() * page_size + pos % page_size
        write_kv_torch(k, v, kc, vc, slots, ks, vs)
    return kc, vc, ks, vs, tables


def _dense(q, k, v, scale, first_pos=None):
    """fp32 attention on contiguous K/V: q [M, Hq, D], k/v [N, Hkv, D]; row i sees keys <= first_pos + i."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    sc = torch.einsum("mhd,nhd->hmn", q, kk) * scale
    if first_pos is not None:
        mask = torch.arange(k.shape[0])[None, :] <= first_pos + torch.arange(q.shape[0])[:, None]
        sc = sc.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hmn,nhd->mhd", sc.softmax(-1), vv)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_decode_on_fp8_cache_close_to_fp32_attention():
    torch.manual_seed(3)
    hq, hkv, d, lens = 8, 2, 32, [1, 17, 33, 50]
    ks_ = [torch.randn(n, hkv, d) * 2 for n in lens]
    vs_ = [torch.randn(n, hkv, d) for n in lens]
    kc, vc, ks, vs, pt = _paged_fp8(ks_, vs_, 4, 40)
    q = torch.randn(len(lens) + 1, hq, d)
    pt = torch.cat([pt, pt[:1]])
    cl = torch.tensor(lens + [0], dtype=torch.int32)                        # and a padded slot
    out = paged_decode_attention_torch(q, kc, vc, pt, cl, torch.full_like(q, float("nan")), d ** -0.5,
                                       k_scales=ks, v_scales=vs)
    assert out[-1].abs().sum() == 0
    worst = 0.0
    for r, n in enumerate(lens):
        exact = _dense(q[r:r + 1], ks_[r], vs_[r], d ** -0.5)[0]
        # the reference on the dequantized values is the same computation: equal to fp32 rounding
        deq = _dense(q[r:r + 1], dequantize_fp8(*quantize_fp8(ks_[r])), dequantize_fp8(*quantize_fp8(vs_[r])),
                     d ** -0.5)[0]
        torch.testing.assert_close(out[r], deq, rtol=1e-5, atol=1e-5)
        worst = max(worst, _rel(out[r], exact))
    assert 1e-4 < worst < 0.05, worst


def test_prefill_over_fp8_prefix_close_to_fp32_attention():
    torch.manual_seed(4)
    hq, hkv, d = 6, 2, 16
    segs = [(0, 7, 0), (7, 9, 11), (16, 1, 30)]             # (first row, rows, cached prefix)
    ks_ = [torch.randn(p + n, hkv, d) for _, n, p in segs]
    vs_ = [torch.randn(p + n, hkv, d) for _, n, p in segs]
    kc, vc, ks, vs, pt = _paged_fp8(ks_, vs_, 4, 40)
    q = torch.randn(17, hq, d)
    starts, lens, prefixes = (torch.tensor(c, dtype=torch.int32) for c in zip(*segs))
    out = paged_prefill_attention_torch(q, kc, vc, pt, starts, lens, prefixes, torch.empty_like(q), 0.3,
                                        k_scales=ks, v_scales=vs)
    for s, (start, n, p) in enumerate(segs):
        exact = _dense(q[start:start + n], ks_[s], vs_[s], 0.3, first_pos=p)
        assert _rel(out[start:start + n], exact) < 0.05
    # the last row of a chunk sees every key: decode of the same query over the same cache agrees
    dec = paged_decode_attention_torch(q[15:16], kc, vc, pt[1:2], torch.tensor([20]), torch.empty(1, hq, d), 0.3,
                                       k_scales=ks, v_scales=vs)
    torch.testing.assert_close(dec[0], out[15], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- Triton interpreter
@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted("fp8_kv_interp.py")


def test_interpreted_write_kv_writes_the_torch_bytes(interpreted):
    assert interpreted["write_bytes_equal"] and interpreted["write_scales_equal"]


def test_interpreted_attention_matches_torch_on_fp8_cache(interpreted):
    # the kernels take fp8 tiles into fp16 dots (q and the scaled probabilities rounded to fp16's 11
    # bits, 2^-12 relative each), the reference computes in fp32: a few 1e-4, not 1e-2
    for key in ("decode_fp32_rel", "prefill_fp32_rel"):
        assert interpreted[key] < 1e-3, (key, interpreted[key])


# ---------------------------------------------------------------------------------- memory and engine
def test_fp8_token_bytes_and_plan_capacity_for_llama3_8b():
    from nfsearch.specs import load_model
    spec = load_model("llama-3-8b")
    bf16 = mem.kv_bytes_per_token(spec, 2)
    fp8 = mem.kv_bytes_per_token(spec, 1, mem.FP8_SCALE_BYTES)
    assert bf16 == 2 * 32 * 1024 * 2 and fp8 == 2 * 32 * (1024 + 8 * 4)
    plans = [mem.estimate_plan(spec, 2, False, 80 << 30, 0.9, 1 << 30, 2048, 512, 16, 1, "x", kv_token_bytes=b)
             for b in (None, fp8)]
    assert plans[0].bytes_per_page == bf16 * 16 and plans[1].bytes_per_page == fp8 * 16
    ratio = plans[1].kv_tokens / plans[0].kv_tokens
    assert abs(ratio - bf16 / fp8) < 1e-3 and ratio > 1.93        # 2 x 128 / (128 + 4)


def test_fp8_gemm_weights_size_the_batch_for_the_cache_they_leave():
    """The engine on an H100 80GB printed weights of 14.99 GiB (bf16) and 8.49 GiB (FP8 GEMMs) and, at
    utilization 0.9, a 71.26 GiB budget; with FP8 GEMMs + FP8 KV its E1 batch was sized as if the
    weights were bf16 (576 decode slots for a cache that holds 632 requests)."""
    from nfsearch.serving.model_config import load_model_config
    cfg = load_model_config("llama-3-8b")
    spec = cfg.spec
    assert abs(mem.weights_bytes(spec, 2, False) / mem.GIB - 14.99) < 0.05
    assert abs(mem.weights_bytes(spec, 2, False, is_fp8_gemms=True) / mem.GIB - 8.49) < 0.05
    e1 = mem.TraceShape(1024, 512, 1536)
    kv_fp8 = mem.kv_bytes_per_token(spec, 1, mem.FP8_SCALE_BYTES)
    total = int(71.26 / 0.9 * mem.GIB)
    sized = {fp8: mem.size_batch(cfg, e1, total, dtype_bytes=2, kv_token_bytes=kv_fp8, other_bytes=int(0.67 * mem.GIB),
                                 is_fp8_gemms=fp8) for fp8 in (False, True)}
    assert sized[True].plan.weights_bytes < 0.6 * sized[False].plan.weights_bytes
    concurrency = sized[True].num_pages * 16 // (1024 + 512)
    assert sized[True].max_decode >= concurrency > sized[False].max_decode
    assert sized[True].dense_batch >= 3 * concurrency       # decode rows + the prefill that replaces them


def _tiny_engine(kv_cache_dtype, **kw):
    from nfsearch.runtime.engine import Engine
    from tests.conftest import ENGINE_TINY
    return Engine(ENGINE_TINY, device="cpu", dtype="bf16", dense_batch=64, max_decode=16,
                  kv_cache_dtype=kv_cache_dtype, **kw)


def test_engine_fp8_capacity_at_the_same_memory():
    engines = {d: _tiny_engine(d, memory_bytes=300 << 20) for d in ("auto", "fp8")}
    auto, fp8 = engines["auto"], engines["fp8"]
    assert auto.model.kv.dtype == torch.bfloat16 and fp8.model.kv.dtype == FP8
    assert fp8.model.kv_scales.shape == (*fp8.model.kv.shape[:-1],)
    assert fp8.kv_token_bytes == fp8.model.kv_bytes_per_token and auto.kv_token_bytes == auto.model.kv_bytes_per_token
    d = fp8.cfg.spec.head_dim                                   # 16: the scale costs 4 of every 20 bytes
    want = 2 * d / (d + mem.FP8_SCALE_BYTES)
    assert abs(fp8.num_pages / auto.num_pages - want) < 0.02
    assert fp8.model.kv_num_bytes <= fp8.plan.kv_bytes
    assert "KV cache fp8" in fp8.describe()


def test_engine_fp8_serves_a_trace_without_leaks():
    from nfsearch.serving.traces import load_trace
    engine = _tiny_engine("fp8", num_pages=40)
    requests = load_trace("const:40:12", 6).requests
    run = engine.run(requests)                                  # run() checks the pages for leaks
    assert all(s.finish_reason == "length" and len(s.output_ids) == 12 for s in run.sequences)
    assert run.peak_used_pages <= 40 and engine.model.kv_scales.abs().sum() > 0


def test_engine_refuses_an_unknown_kv_cache_dtype():
    from nfsearch.errors import NfsearchError
    with pytest.raises(NfsearchError, match="kv cache dtype"):
        _tiny_engine("int4", num_pages=8)


# ---------------------------------------------------------------------------------- logits accuracy
def _teacher_forced(hf_pair, kv_dtype):
    from test_engine_model import BUCKET, PAGE_SIZE, Driver, _requests

    from nfsearch.runtime.paged_model import PagedModel
    from nfsearch.runtime.weights import load_weights
    from nfsearch.serving.model_config import load_model_config
    _, folder = hf_pair
    cfg = load_model_config(folder)
    weights = load_weights(cfg, folder, device="cpu", dtype=torch.float32)
    model = PagedModel(cfg, weights, num_pages=48, page_size=PAGE_SIZE, device="cpu", dtype=torch.float32,
                       max_tokens=BUCKET.max_tokens, max_logit_rows=BUCKET.max_decode + BUCKET.max_segments,
                       kv_dtype=kv_dtype)
    reqs, driver, rows = _requests(), Driver(model), {}
    for it in range(200):
        if all(r.num_cached == len(r.ids) for r in reqs):
            break
        owners, logits, _ = driver.step(reqs, it)
        for j, (r, pos) in enumerate(owners):
            rows[(reqs.index(r), pos)] = logits[j]
    assert sorted(driver.free) == list(range(model.num_pages))      # every page came back
    return rows


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_fp8_cache_logits_against_fp32_cache(which, request):
    """Mean KL(fp32-cache || fp8-cache) and top-1 agreement over every teacher-forced logit row
    (89 positions of 5 requests, prefill chunks and decode steps, 3 layers)."""
    pytest.importorskip("transformers")
    hf_pair = request.getfixturevalue(which)
    ref, got = _teacher_forced(hf_pair, None), _teacher_forced(hf_pair, FP8)
    keys = sorted(ref)
    assert len(keys) >= 32
    p = torch.stack([ref[k] for k in keys]).log_softmax(-1)
    q = torch.stack([got[k] for k in keys]).log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    top1 = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    assert kl.mean().item() < 5e-3 and kl.max().item() < 0.1, (kl.mean().item(), kl.max().item())
    assert top1 >= 0.95, top1
    assert kl.mean().item() > 0                                  # the fp8 cache really was used
    print(f"{which}: fp8 KV vs fp32 KV over {len(keys)} rows: mean KL {kl.mean():.2e}, max {kl.max():.2e}, "
          f"top-1 {100 * top1:.1f}%")
