"""The fused RoPE + paged KV write (kernels/rope_paged.py) on a GPU at E1's batch shape (896 rows,
LLaMA-3-8B heads: Hq 32, Hkv 8, D 128, page size 16, the engine's own cos/sin tables): the same bytes
as the torch definition (rope_append_torch + write_kv_torch) for q, the bf16 cache and the fp8
scales (the fp8 cache: the same values, _assert_same says why not bytes), padding rows leaving the
cache as it was, on the whole GPU and on a share; captured in a CUDA graph and replayed with new
rows, positions and slots; and its time against the engine's earlier two-call path (torch RoPE into
q/k/v buffers, then the Triton write_kv), printed in microseconds."""

from __future__ import annotations

import statistics

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from paged_util import capture

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DT = torch.bfloat16
FP8 = torch.float8_e4m3fn
T, HQ, HKV, D, PAGE_SIZE, NUM_PAGES, MAX_POS = 896, 32, 8, 128, 16, 2048, 8192


def _sms():
    if not torch.cuda.is_available():          # collected (then skipped) on a machine without CUDA
        return [32]
    return [torch.cuda.get_device_properties(0).multi_processor_count, 32]


@pytest.fixture(scope="module")
def tables():
    from nfsearch.runtime.paged_model import rope_tables
    from nfsearch.serving.model_config import load_model_config
    return rope_tables(load_model_config("llama-3-8b"), MAX_POS, "cuda")


def _inputs(seed: int):
    """(qkv, positions, slots): O(1)-O(10) rows, random positions, shuffled slots over the pages, the last
    40 rows padding (slot -1, position 0) as in a bucket's tail, a few padding rows inside too."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(T, (HQ + 2 * HKV) * D, device="cuda", dtype=DT, generator=gen)
    qkv *= torch.rand(T, 1, device="cuda", generator=gen).to(DT) * 10
    positions = torch.randint(0, MAX_POS, (T,), device="cuda", dtype=torch.int32, generator=gen)
    slots = torch.randperm(NUM_PAGES * PAGE_SIZE, device="cuda", generator=gen)[:T].to(torch.int32)
    slots[-40:] = -1
    positions[-40:] = 0
    slots[torch.randint(0, T - 40, (9,), device="cuda", generator=gen)] = -1
    return qkv, positions, slots


def _caches(kv_dtype):
    """(k cache, v cache, scale kwargs) with junk everywhere, so an unwanted write shows."""
    k = (torch.randn(NUM_PAGES, PAGE_SIZE, HKV, D, device="cuda") * 2).to(kv_dtype)
    v = (torch.randn(NUM_PAGES, PAGE_SIZE, HKV, D, device="cuda") * 2).to(kv_dtype)
    if kv_dtype != FP8:
        return k, v, {}
    scales = torch.rand(NUM_PAGES, PAGE_SIZE, HKV, device="cuda") + 0.5
    return k, v, {"k_scales": scales, "v_scales": scales.clone() * 2}


def _clone(caches):
    k, v, scales = caches
    return k.clone(), v.clone(), {name: t.clone() for name, t in scales.items()}


def _bytes_equal(a, b) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _assert_same(got, want):
    """Caches (bf16 or fp8) and scales equal byte for byte."""
    for a, b in zip(got[:2], want[:2]):
        num_bytes = (a.view(torch.uint8) != b.view(torch.uint8)).sum().item()
        assert num_bytes == 0, f"{num_bytes} cache bytes differ"
    for name in got[2]:
        assert torch.equal(got[2][name], want[2][name]), name


@pytest.mark.parametrize("num_sms", _sms())
@pytest.mark.parametrize("kv_dtype", [DT, FP8], ids=["bf16", "fp8"])
def test_fused_writes_the_torch_bytes(tables, num_sms, kv_dtype):
    from nfsearch.runtime.kernels.rope_paged import rope_write_kv, rope_write_kv_torch
    cos, sin = tables
    qkv, positions, slots = _inputs(1)
    ref = _caches(kv_dtype)
    got = _clone(ref)
    q_ref = rope_write_kv_torch(qkv, positions, cos, sin, torch.empty(T, HQ, D, device="cuda", dtype=DT),
                                ref[0], ref[1], slots, **ref[2])
    q = torch.full((T, HQ, D), float("nan"), device="cuda", dtype=DT)
    rope_write_kv(qkv, positions, cos, sin, q, got[0], got[1], slots, num_sms, **got[2])
    torch.cuda.synchronize()
    assert _bytes_equal(q, q_ref), f"{(q != q_ref).sum().item()} q elements differ"
    _assert_same(got, ref)


def test_fused_captures_and_replays_new_rows(tables):
    from nfsearch.runtime.kernels.rope_paged import rope_write_kv, rope_write_kv_torch
    cos, sin = tables
    qkv, positions, slots = _inputs(2)
    got = _caches(FP8)
    q = torch.empty(T, HQ, D, device="cuda", dtype=DT)
    graph = capture(lambda: rope_write_kv(qkv, positions, cos, sin, q, got[0], got[1], slots, **got[2]))
    for seed in (3, 4):
        for buf, new in zip((qkv, positions, slots), _inputs(seed)):
            buf.copy_(new)
        ref = _clone(got)
        q_ref = torch.empty_like(q)
        rope_write_kv_torch(qkv, positions, cos, sin, q_ref, ref[0], ref[1], slots, **ref[2])
        graph.replay()
        torch.cuda.synchronize()
        assert _bytes_equal(q, q_ref)
        _assert_same(got, ref)


def _graph_us(fn, num_calls: int = 20, num_replays: int = 50) -> float:
    """Median time of one call, in microseconds: num_calls calls captured in one graph, each replay timed
    by CUDA events (the same inputs every call, so the 11 MB qkv row block is L2-warm for both paths)."""
    graph = capture(lambda: [fn() for _ in range(num_calls)])
    times = []
    for _ in range(num_replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / num_calls)
    return statistics.median(times)


@pytest.mark.parametrize("kv_dtype", [DT, FP8], ids=["bf16", "fp8"])
def test_fused_time_against_two_calls(tables, kv_dtype):
    from nfsearch.runtime.kernels import paged_attention as pa
    from nfsearch.runtime.kernels.rope_paged import rope_write_kv
    from nfsearch.runtime.kernels.torch_ops import rope_append_torch
    cos, sin = tables
    qkv, positions, slots = _inputs(5)
    kc, vc, scales = _caches(kv_dtype)
    q = torch.empty(T, HQ, D, device="cuda", dtype=DT)
    k, v = torch.empty(T, HKV, D, device="cuda", dtype=DT), torch.empty(T, HKV, D, device="cuda", dtype=DT)

    def two_calls():                 # what PagedModel._layer ran before the fused kernel
        rope_append_torch(qkv, positions, cos, sin, q, None, None, None, k_out=k, v_out=v)
        pa.write_kv(k, v, kc, vc, slots, **scales)

    fused_us = _graph_us(lambda: rope_write_kv(qkv, positions, cos, sin, q, kc, vc, slots, **scales))
    two_us = _graph_us(two_calls)
    name = "bf16" if kv_dtype == DT else "fp8"
    print(f"\nRoPE + paged KV write, T={T} Hq={HQ} Hkv={HKV} D={D}, {name} cache, "
          f"{torch.cuda.get_device_name()}: fused {fused_us:.1f} us, two-call path {two_us:.1f} us "
          f"({two_us / fused_us:.2f}x); x32 layers: {32 * fused_us / 1e3:.3f} ms vs "
          f"{32 * two_us / 1e3:.3f} ms per iteration")
    assert fused_us < two_us
