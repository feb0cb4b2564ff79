"""GPU checks of every impl against the op's torch impl (kernels/torch_ops.py) run on float32
copies of the inputs (`_up`): the one torch version of each op, at a higher precision than bf16.

Fresh random inputs every test, outputs poisoned with NaN before each run, relative error
||out - ref|| / ||ref|| < 2e-2 (bf16), NaN fails. Every impl in IMPLS is checked (triton, torch in
bf16, and the TMA / flash / CuPy raw-CUDA ones). Skipped without torch or without a CUDA GPU.
"""

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = 2e-2
SMS = [16, 132]
DT = torch.bfloat16


def _impls(op):
    from nfsearch.runtime.kernels import IMPLS

    return list(IMPLS[op])


def _up(*tensors):
    """float32 copies of the floating-point tensors (None and integer tensors pass as they are)."""
    return [t.float() if t is not None and t.is_floating_point() else t for t in tensors]


def _rel(out, ref):
    out, ref = out.float(), ref.float()
    assert not torch.isnan(out).any(), "output has NaN (unwritten or broken)"
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < TOL, f"relative error {err:.3e}"
    return err


def _poison(shape, dtype=DT):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(hash(request.node.name) % (2**31))


@pytest.mark.parametrize("num_sms", SMS + [100, 124])
@pytest.mark.parametrize("M,K,N,res", [(128, 4096, 6144, False), (300, 4096, 4096, True), (2048, 1024, 2816, False),
                                       (1000, 14336, 4096, True), (512, 4096, 6144, False), (4096, 4096, 4096, True)])
def test_gemm(num_sms, M, K, N, res):
    from nfsearch.runtime.kernels import IMPLS, gemm_torch

    a = torch.randn(M, K, device="cuda", dtype=DT)
    w = torch.randn(K, N, device="cuda", dtype=DT) / K**0.5
    r = torch.randn(M, N, device="cuda", dtype=DT) if res else None
    ref = gemm_torch(*_up(a, w), residual=_up(r)[0])
    for impl in _impls("kqv"):
        for _ in range(2):  # twice: the stream-K counters must be left at zero by the first launch
            out = _poison((M, N))
            IMPLS["kqv"][impl](a, w, out, num_sms, residual=r)
            _rel(out, ref)


@pytest.mark.parametrize("num_sms", [8, 48, 100, 132])
@pytest.mark.parametrize("cfg", ["big", "big_sk", "mid"])
@pytest.mark.parametrize("M,K,N", [(512, 4096, 6144), (2048, 14336, 4096), (77, 512, 384)])
def test_gemm_tma_configs(num_sms, cfg, M, K, N):
    """Every table config, data-parallel and stream-K regions, any SM count."""
    from nfsearch.runtime.kernels import gemm_tma, gemm_torch
    from nfsearch.runtime.kernels.gemm_tma import CONFIGS

    a = torch.randn(M, K, device="cuda", dtype=DT)
    w = torch.randn(K, N, device="cuda", dtype=DT) / K**0.5
    ref = gemm_torch(*_up(a, w))
    for sk in (True, False):
        c = CONFIGS[cfg][:6] + (sk,) + CONFIGS[cfg][7:]
        out = _poison((M, N))
        gemm_tma(a, w, out, num_sms, config=c)
        _rel(out, ref)


def _decode_inputs(R, C, HQ, HKV, D):
    q = torch.randn(R, HQ, D, device="cuda", dtype=DT)
    k = torch.randn(R, C, HKV, D, device="cuda", dtype=DT)
    v = torch.randn(R, C, HKV, D, device="cuda", dtype=DT)
    lens = torch.randint(1, C + 1, (R,), device="cuda", dtype=torch.int32)
    lens[0] = C
    lens[-1] = 1
    return q, k, v, lens


@pytest.mark.parametrize("num_sms", [8, 48, 132])
@pytest.mark.parametrize("R,C", [(64, 1024), (3, 3000), (200, 77)])
def test_decode_attention(num_sms, R, C):
    from nfsearch.runtime.kernels import IMPLS, decode_attention_torch

    q, k, v, lens = _decode_inputs(R, C, 32, 8, 128)
    ref = decode_attention_torch(*_up(q, k, v), lens)
    for impl in _impls("decode_attn"):
        out = _poison(q.shape)
        IMPLS["decode_attn"][impl](q, k, v, lens, out, num_sms)
        _rel(out, ref)


@pytest.mark.parametrize("num_sms", [16, 48])
@pytest.mark.parametrize("pps", [1, 2, 4])
def test_decode_tma_never_reads_past_context(num_sms, pps):
    """Cache rows past each request's context hold NaN: the TMA kernel must not let them in."""
    from nfsearch.runtime.kernels import decode_attention_tma, decode_attention_torch

    q, k, v, lens = _decode_inputs(40, 700, 32, 8, 128)
    ref = decode_attention_torch(*_up(q, k, v), lens)
    pos = torch.arange(700, device="cuda")[None, :] >= lens[:, None].long()
    k[pos] = float("nan")
    v[pos] = float("nan")
    out = _poison(q.shape)
    decode_attention_tma(q, k, v, lens, out, num_sms, programs_per_sm=pps)
    _rel(out, ref)


@pytest.mark.parametrize("num_sms", SMS)
@pytest.mark.parametrize("lens", [[1000], [5, 300, 129, 1], [2048, 64, 700]])
def test_prefill_attention(num_sms, lens):
    from nfsearch.runtime.kernels import IMPLS, prefill_attention_torch

    T = sum(lens)
    q = torch.randn(T, 32, 128, device="cuda", dtype=DT)
    k = torch.randn(T, 8, 128, device="cuda", dtype=DT)
    v = torch.randn(T, 8, 128, device="cuda", dtype=DT)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda", dtype=torch.int32)
    ref = prefill_attention_torch(*_up(q, k, v), cu)
    for impl in _impls("prefill_attn"):
        for offsets in ((cu, cu.cpu()) if impl in ("torch", "flash") else (cu,)):  # device and host offsets
            out = _poison(q.shape)
            IMPLS["prefill_attn"][impl](q, k, v, offsets, out, num_sms)
            _rel(out, ref)


def test_prefill_sdpa_flash_only():
    from nfsearch.runtime.kernels import prefill_attention_sdpa, prefill_attention_torch

    lens = [700, 3, 1100]
    T = sum(lens)
    q = torch.randn(T, 32, 128, device="cuda", dtype=DT)
    k = torch.randn(T, 8, 128, device="cuda", dtype=DT)
    v = torch.randn(T, 8, 128, device="cuda", dtype=DT)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda", dtype=torch.int32)
    out = _poison(q.shape)
    prefill_attention_sdpa(q, k, v, cu, out, 132)
    _rel(out, prefill_attention_torch(*_up(q, k, v), cu))


@pytest.mark.parametrize("num_sms", SMS)
@pytest.mark.parametrize("fused", [False, True])
def test_rmsnorm(num_sms, fused):
    from nfsearch.runtime.kernels import IMPLS, rmsnorm_torch

    T, H = 777, 4096
    x = torch.randn(T, H, device="cuda", dtype=DT)
    w = torch.rand(H, device="cuda", dtype=DT) + 0.5
    res = torch.randn(T, H, device="cuda", dtype=DT) if fused else None
    ro_ref = torch.empty(T, H, device="cuda") if fused else None
    ref = rmsnorm_torch(*_up(x, w), residual=_up(res)[0], residual_out=ro_ref)
    for impl in _impls("norm1"):
        out = _poison((T, H))
        ro = _poison((T, H)) if fused else None
        IMPLS["norm1"][impl](x, w, out, num_sms, residual=res, residual_out=ro)
        _rel(out, ref)
        if fused:
            _rel(ro, ro_ref)


@pytest.mark.parametrize("num_sms", SMS)
def test_silu_and_mul(num_sms):
    from nfsearch.runtime.kernels import IMPLS, silu_and_mul_torch

    x = torch.randn(1000, 2 * 14336, device="cuda", dtype=DT)
    ref = silu_and_mul_torch(x.float())
    for impl in _impls("act"):
        out = _poison((1000, 14336))
        IMPLS["act"][impl](x, out, num_sms)
        _rel(out, ref)


@pytest.mark.parametrize("num_sms", SMS)
def test_rope_append(num_sms):
    from nfsearch.runtime.kernels import IMPLS, rope_append_torch, rope_cos_sin

    HQ, HKV, D, R, C = 32, 8, 128, 64, 512
    n_dec, n_pre = 64, 300
    T = n_dec + n_pre
    qkv = torch.randn(T, (HQ + 2 * HKV) * D, device="cuda", dtype=DT)
    cos, sin = rope_cos_sin(C, D, device="cuda")
    pos = torch.cat([torch.randint(0, C, (n_dec,), device="cuda"), torch.arange(n_pre, device="cuda")]).int()
    slot = torch.cat([torch.randperm(R, device="cuda")[:n_dec], torch.full((n_pre,), -1, device="cuda")]).int()
    kc0 = torch.randn(R, C, HKV, D, device="cuda", dtype=DT)
    vc0 = torch.randn(R, C, HKV, D, device="cuda", dtype=DT)
    kc_ref, vc_ref = _up(kc0, vc0)
    q_ref = torch.empty(T, HQ, D, device="cuda")
    ko_ref = torch.empty(T, HKV, D, device="cuda")
    vo_ref = torch.empty(T, HKV, D, device="cuda")
    rope_append_torch(qkv.float(), pos, cos, sin, q_ref, kc_ref, vc_ref, slot, k_out=ko_ref, v_out=vo_ref)
    for impl in _impls("rope_append"):
        kc, vc = kc0.clone(), vc0.clone()
        q = _poison((T, HQ, D))
        ko, vo = _poison((T, HKV, D)), _poison((T, HKV, D))
        IMPLS["rope_append"][impl](qkv, pos, cos, sin, q, kc, vc, slot, num_sms, k_out=ko, v_out=vo)
        for a, b in [(q, q_ref), (ko, ko_ref), (vo, vo_ref), (kc, kc_ref), (vc, vc_ref)]:
            _rel(a, b)
        # without k_out/v_out: only the caches and q are written
        kc, vc = kc0.clone(), vc0.clone()
        q = _poison((T, HQ, D))
        IMPLS["rope_append"][impl](qkv, pos, cos, sin, q, kc, vc, slot, num_sms)
        for a, b in [(q, q_ref), (kc, kc_ref), (vc, vc_ref)]:
            _rel(a, b)


@pytest.mark.parametrize("mode", ["green", "grid"])
def test_kernels_in_partitions(mode):
    """The kernels give the same result when launched on partition streams, disjoint split included."""
    from nfsearch.runtime.kernels import IMPLS
    from nfsearch.runtime.kernels import decode_attention_torch, gemm_torch, silu_and_mul_torch
    from nfsearch.runtime.partitions import SmPartitions

    parts = SmPartitions(mode=mode)
    try:
        assert parts.num_sms == torch.cuda.get_device_properties(0).multi_processor_count
        if mode == "green":
            assert parts.granularity >= 1 and parts.round(1) == parts.granularity
        a = torch.randn(512, 4096, device="cuda", dtype=DT)
        w = torch.randn(4096, 4096, device="cuda", dtype=DT) / 64
        q, k, v, lens = _decode_inputs(64, 1024, 32, 8, 128)
        g_ref, d_ref = gemm_torch(*_up(a, w)), decode_attention_torch(*_up(q, k, v), lens)
        (n1, s1), (n2, s2) = parts.split([84, 48])
        assert n1 + n2 == parts.num_sms
        g_out, d_out = _poison((512, 4096)), _poison(q.shape)
        cur = torch.cuda.current_stream()
        s1.wait_stream(cur)
        s2.wait_stream(cur)
        for gi, di in [("triton", "triton"), ("tma", "tma")] + ([("cublaslt", "tma")] if "cublaslt" in IMPLS["o"] else []):
            g_out, d_out = _poison((512, 4096)), _poison(q.shape)
            s1.wait_stream(cur)
            s2.wait_stream(cur)
            with torch.cuda.stream(s1):
                IMPLS["o"][gi](a, w, g_out, n1)
            with torch.cuda.stream(s2):
                IMPLS["decode_attn"][di](q, k, v, lens, d_out, n2)
            cur.wait_stream(s1)
            cur.wait_stream(s2)
            torch.cuda.synchronize()
            _rel(g_out, g_ref)
            _rel(d_out, d_ref)
        # the CuPy kernels launch on torch's current stream, so they run inside the partition too
        x = torch.randn(300, 2 * 1024, device="cuda", dtype=DT)
        x_out = _poison((300, 1024))
        s2.wait_stream(cur)
        with torch.cuda.stream(s2):
            IMPLS["act"]["cuda"](x, x_out, n2)
        cur.wait_stream(s2)
        torch.cuda.synchronize()
        _rel(x_out, silu_and_mul_torch(x.float()))
        st = parts.stream(20)
        out = _poison((512, 4096))
        st.wait_stream(cur)
        with torch.cuda.stream(st):
            IMPLS["o"]["triton"](a, w, out, parts.round(20))
        cur.wait_stream(st)
        torch.cuda.synchronize()
        _rel(out, g_ref)
    finally:
        parts.close()


def test_cublaslt_targets_the_partition_and_restores_torch_settings():
    """The SM-targeted cuBLASLt impl inside a CUDA graph on a partition: right result, and torch's BLAS
    backend and SM carve-out are what they were before (other torch matmuls must not inherit them)."""
    from nfsearch.runtime.kernels import IMPLS, gemm_torch
    if "cublaslt" not in IMPLS["o"]:
        pytest.skip("this torch has no SM carve-out for cuBLASLt")
    a = torch.randn(2048, 4096, device="cuda", dtype=DT)
    w = torch.randn(4096, 4096, device="cuda", dtype=DT) / 64
    r = torch.randn(2048, 4096, device="cuda", dtype=DT)
    ref = gemm_torch(*_up(a, w), residual=_up(r)[0])
    backend, carveout = torch.backends.cuda.preferred_blas_library(), torch._C._get_sm_carveout_experimental()
    out = _poison((2048, 4096))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        IMPLS["o"]["cublaslt"](a, w, out, 100, residual=r)           # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            IMPLS["o"]["cublaslt"](a, w, out, 100, residual=r)
    torch.cuda.current_stream().wait_stream(stream)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    _rel(out, ref)
    assert torch.backends.cuda.preferred_blas_library() == backend
    assert torch._C._get_sm_carveout_experimental() == carveout
