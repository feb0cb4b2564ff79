"""The "paged" impl (kernels/paged_adapters.py: the engine's paged Triton kernels behind the contiguous
signatures) against the contiguous impls, bf16, LLaMA-3-8B head shapes, on the whole GPU and on 32
SMs: decode against triton and torch; prefill of whole prompts against triton and torch; prefill of
chunks over a cached prefix against the torch paged reference on the adapter's own copy. The
"paged_fp8kv" impl (the engine's fp8 KV cache) the same way: against the torch paged reference on its
own fp8 copy and scales, and within fp8 error of the bf16 impls. Decode page tables as wide as a
bucket's context cap (1536 for a 1000-token pool): the same output, the split count of that width.
And the profiler's path: a copy made before capture replays in a CUDA graph; one made inside a
capture is refused. Skipped without a CUDA GPU or triton."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from paged_util import rel_error

from nfsearch.runtime.kernels import IMPLS
from nfsearch.runtime.kernels import paged_adapters as pa
from nfsearch.runtime.kernels.paged_attention import DECODE_CONFIG, decode_splits
from nfsearch.runtime.kernels.paged_attention_torch import (
    paged_decode_attention_torch,
    paged_prefill_attention_torch,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DT, HQ, HKV, D = torch.bfloat16, 32, 8, 128
FP8_TOL = 8e-2          # an fp8 cache against bf16 K/V (e4m3: 3 mantissa bits), as tests/gpu/test_fp8_kv_gpu.py


def _sms():
    if not torch.cuda.is_available():          # collected (then skipped) on a machine without CUDA
        return [32]
    return [torch.cuda.get_device_properties(0).multi_processor_count, 32]


def _randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=DT)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(hash(request.node.name) % (2**31))


@pytest.mark.parametrize("num_sms", _sms())
def test_paged_decode_matches_the_contiguous_impls(num_sms):
    pool_k, pool_v = _randn(96, 1000, HKV, D), _randn(96, 1000, HKV, D)
    k, v, q = pool_k[16:80], pool_v[16:80], _randn(64, HQ, D)        # rows of a pool, as the profiler slices
    lens = torch.randint(1, 1001, (64,), device="cuda", dtype=torch.int32)
    got = IMPLS["decode_attn"]["paged"](q, k, v, lens, torch.full_like(q, float("nan")), num_sms)
    for impl in ("triton", "torch"):
        want = IMPLS["decode_attn"][impl](q, k, v, lens, torch.empty_like(q), num_sms)
        rel_error(got, want)


@pytest.mark.parametrize("num_sms", _sms())
def test_paged_prefill_of_whole_prompts_matches_the_contiguous_impls(num_sms):
    q, k, v = _randn(600, HQ, D), _randn(600, HKV, D), _randn(600, HKV, D)
    cu = [0, 300, 600]
    got = IMPLS["prefill_attn"]["paged"](q, k, v, torch.tensor(cu, dtype=torch.int32), torch.full_like(q, float("nan")),
                                         num_sms)
    rel_error(got, IMPLS["prefill_attn"]["triton"](q, k, v, torch.tensor(cu, dtype=torch.int32, device="cuda"),
                                                   torch.empty_like(q), num_sms))
    rel_error(got, IMPLS["prefill_attn"]["torch"](q, k, v, cu, torch.empty_like(q), num_sms))


@pytest.mark.parametrize("num_sms", _sms())
def test_paged_prefill_over_a_cached_prefix_matches_its_torch_reference(num_sms):
    q, k, v = _randn(625, HQ, D), _randn(625, HKV, D), _randn(625, HKV, D)
    cu, prefixes = torch.tensor([0, 300, 625], dtype=torch.int32), [355, 355]    # E1's top bucket's chunks
    got = IMPLS["prefill_attn"]["paged"](q, k, v, cu, torch.full_like(q, float("nan")), num_sms, prefix_lens=prefixes)
    kv = pa.prefill_kv(k, v, cu, prefixes)
    want = paged_prefill_attention_torch(q, kv.k, kv.v, kv.page_tables, kv.chunk_starts, kv.chunk_lens,
                                         kv.prefix_lens, torch.empty_like(q), D ** -0.5)
    rel_error(got, want)
    lens, pre = pa.prefill_chunks(625, 625 + 2 * 355)                # the profile row of one such chunk
    assert lens == [625] and pre == [355]


def test_a_prepared_copy_replays_in_a_graph_and_none_is_made_inside_a_capture():
    k, v, q = _randn(64, 512, HKV, D), _randn(64, 512, HKV, D), _randn(64, HQ, D)
    lens = torch.full((64,), 512, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    f = IMPLS["decode_attn"]["paged"]
    f.prepare(q, k, v, lens, out, 32)
    f(q, k, v, lens, out, 32)                      # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        f(q, k, v, lens, out, 32)
    out.fill_(float("nan"))
    graph.replay()
    rel_error(out, IMPLS["decode_attn"]["torch"](q, k, v, lens, torch.empty_like(q), 32))
    fresh = _randn(64, 512, HKV, D)
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture"), torch.cuda.graph(torch.cuda.CUDAGraph()):
        f(q, fresh, v, lens, out, 32)


@pytest.mark.parametrize("num_sms", _sms())
def test_paged_fp8kv_decode_matches_its_reference_and_the_bf16_impls(num_sms):
    pool_k, pool_v = _randn(96, 1000, HKV, D), _randn(96, 1000, HKV, D)
    k, v, q = pool_k[16:80], pool_v[16:80], _randn(64, HQ, D)
    lens = torch.randint(1, 1001, (64,), device="cuda", dtype=torch.int32)
    got = IMPLS["decode_attn"]["paged_fp8kv"](q, k, v, lens, torch.full_like(q, float("nan")), num_sms,
                                              max_context=1536)
    kv, first = pa.decode_kv(k, v, "fp8", 1536)
    assert kv.k.dtype == torch.float8_e4m3fn and kv.page_tables.shape[1] == 96
    want = paged_decode_attention_torch(q, kv.k, kv.v, kv.page_tables[first:first + 64], lens, torch.empty_like(q),
                                        D ** -0.5, **kv.scale_kwargs)
    rel_error(got, want)
    rel_error(got, IMPLS["decode_attn"]["triton"](q, k, v, lens, torch.empty_like(q), num_sms), FP8_TOL)


@pytest.mark.parametrize("num_sms", _sms())
def test_paged_fp8kv_prefill_over_a_cached_prefix_matches_its_reference_and_bf16(num_sms):
    q, k, v = _randn(625, HQ, D), _randn(625, HKV, D), _randn(625, HKV, D)
    cu, prefixes = torch.tensor([0, 300, 625], dtype=torch.int32), [355, 355]
    got = IMPLS["prefill_attn"]["paged_fp8kv"](q, k, v, cu, torch.full_like(q, float("nan")), num_sms,
                                               prefix_lens=prefixes)
    kv = pa.prefill_kv(k, v, cu, prefixes, "fp8")
    want = paged_prefill_attention_torch(q, kv.k, kv.v, kv.page_tables, kv.chunk_starts, kv.chunk_lens,
                                         kv.prefix_lens, torch.empty_like(q), D ** -0.5, **kv.scale_kwargs)
    rel_error(got, want)
    bf16 = IMPLS["prefill_attn"]["paged"](q, k, v, cu, torch.empty_like(q), num_sms, prefix_lens=prefixes)
    rel_error(got, bf16, FP8_TOL)


@pytest.mark.parametrize("impl", ["paged", "paged_fp8kv"])
def test_decode_tables_at_the_buckets_cap_keep_the_output_and_take_its_split_count(impl):
    pool_k, pool_v = _randn(16, 384, HKV, D), _randn(16, 384, HKV, D)
    q, f = _randn(16, HQ, D), IMPLS["decode_attn"][impl]
    narrow = f(q, pool_k, pool_v, None, None, 132)
    wide = f(q, pool_k, pool_v, None, None, 132, max_context=1536)
    rel_error(wide, narrow, 1e-2)
    # 16 requests x 8 kv heads on 132 x 3 programs: 6 splits of 64 over 384 tokens, 12 of 128 over 1536
    assert decode_splits(16, HKV, 384, 396, DECODE_CONFIG) == (6, 64)
    assert decode_splits(16, HKV, pa.decode_kv(pool_k, pool_v, None, 1536)[0].page_tables.shape[1] * 16, 396,
                         DECODE_CONFIG) == (12, 128)


def test_an_fp8kv_copy_made_before_capture_replays_in_a_graph():
    k, v, q = _randn(64, 512, HKV, D), _randn(64, 512, HKV, D), _randn(64, HQ, D)
    lens = torch.full((64,), 512, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    f = IMPLS["decode_attn"]["paged_fp8kv"]
    f.prepare(q, k, v, lens, out, 32, max_context=1024)
    f(q, k, v, lens, out, 32, max_context=1024)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        f(q, k, v, lens, out, 32, max_context=1024)
    out.fill_(float("nan"))
    graph.replay()
    rel_error(out, IMPLS["decode_attn"]["torch"](q, k, v, lens, torch.empty_like(q), 32), FP8_TOL)
