"""The fused FP8 quantization kernels (kernels/quant_fp8.py) on a GPU: against their torch references at
LLaMA-3-8B/70B widths, _scaled_mm's bias epilogue, the tiny FP8 PagedModel fused vs unfused and under
a CUDA graph, and (printed) one 8B layer's dense ops at 900 tokens under a CUDA graph in bf16, FP8 with
the quantization in the GEMM (unfused) and FP8 fused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("FP8 GEMMs need compute capability >= 8.9 (Ada, Hopper)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import ENGINE_TINY
from quant_fp8_model import run_steps, steps, tiny_model

from nfsearch.runtime import fp8
from nfsearch.runtime.kernels import gemm_fp8, gemm_torch, quant_fp8, rmsnorm, silu_and_mul
from nfsearch.runtime.kernels.quant_fp8 import Fp8Rows

FP8 = torch.float8_e4m3fn
SMS = torch.cuda.get_device_properties(0).multi_processor_count
T_8B = 900
H, Q, KV, I = 4096, 4096, 1024, 14336          # LLaMA-3-8B


def _randn(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator("cuda").manual_seed(seed), device="cuda") * scale)


def _bufs(T, W):
    return torch.empty(T, W, device="cuda", dtype=FP8), torch.empty(T, 1, device="cuda")


def _agree(got: Fp8Rows, want: Fp8Rows) -> tuple[float, float]:
    """(fraction of e4m3 bytes that differ, largest relative scale difference)."""
    bad = (got.data.view(torch.uint8) != want.data.view(torch.uint8)).float().mean()
    return float(bad), float(((got.scale - want.scale) / want.scale).abs().max())


@pytest.mark.parametrize("T", [1, 37, 900])
def test_kernels_match_the_torch_references(T):
    """The activation is rounded to bf16 before quantizing, in both; the GPU's rsqrt sum order and exp
    can move it by one bf16 ulp now and then, which may flip an e4m3 rounding or the row's amax."""
    x, r = _randn(T, H, seed=1, scale=3).bfloat16(), _randn(T, H, seed=2).bfloat16()
    x[T // 2] = 0
    w = (_randn(H, seed=3) * 0.2 + 1).bfloat16()
    cases = {
        "norm": (quant_fp8.rmsnorm_quant_triton, quant_fp8.rmsnorm_quant_torch, (x, w), H, {"eps": 1e-5}),
        "norm+res": (quant_fp8.rmsnorm_quant_triton, quant_fp8.rmsnorm_quant_torch, (x, w), H,
                     {"eps": 1e-5, "residual": r}),
        "silu": (quant_fp8.silu_mul_quant_triton, quant_fp8.silu_mul_quant_torch,
                 (_randn(T, 2 * I, seed=4, scale=2).bfloat16(),), I, {}),
        "silu 70B (two-pass)": (quant_fp8.silu_mul_quant_triton, quant_fp8.silu_mul_quant_torch,
                                (_randn(T, 2 * 28672, seed=5, scale=2).bfloat16(),), 28672, {}),
        "rows": (quant_fp8.quantize_rows_triton, quant_fp8.quantize_rows_torch, (x,), H, {}),
    }
    for name, (tri, ref, args, W, kw) in cases.items():
        got = tri(*args, *_bufs(T, W), SMS, **kw)
        want = ref(*args, *_bufs(T, W), SMS, **kw)
        bad, scale_rel = _agree(got, want)
        assert bad < 1e-3 and scale_rel <= 2 ** -7, (name, bad, scale_rel)
        deq = got.data.float() * got.scale
        assert float((deq - want.data.float() * want.scale).abs().max()) <= 2 ** -3 * float(want.scale.max() * 448)
    h_tri, h_ref = torch.empty_like(x), torch.empty_like(x)
    quant_fp8.rmsnorm_quant_triton(x, w, *_bufs(T, H), SMS, residual=r, residual_out=h_tri)
    quant_fp8.rmsnorm_quant_torch(x, w, *_bufs(T, H), SMS, residual=r, residual_out=h_ref)
    assert torch.equal(h_tri, h_ref)


def test_bias_vector_in_the_scaled_mm_epilogue():
    a, w = _randn(64, 1024, seed=6).bfloat16(), fp8.quantize_weight(_randn(1024, 768, seed=7, scale=1 / 32).bfloat16())
    bias = _randn(768, seed=8).bfloat16()
    rows = Fp8Rows(*fp8.quantize_rows(a))
    out = torch.empty(64, 768, device="cuda", dtype=torch.bfloat16)
    got = gemm_fp8(rows, w, out, SMS, residual=bias.expand(64, 768)).float()
    plain = gemm_fp8(rows, w, torch.empty_like(out), SMS).float() + bias.float()
    assert float((got - plain).abs().max()) <= 2 ** -7 * float(plain.abs().max())


def test_tiny_model_fused_vs_unfused_and_graph_vs_eager():
    fused = tiny_model(ENGINE_TINY, torch.bfloat16, True, True, device="cuda")
    got, want = run_steps(fused), run_steps(tiny_model(ENGINE_TINY, torch.bfloat16, True, False, device="cuda"))
    assert float((got - want).norm() / want.norm()) < 0.08
    prefill, _ = steps("cuda")
    eager = fused._logits(prefill).clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused._logits(prefill)                                   # warm up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fused._logits(prefill)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


# ------------------------------------------------------------------------------------------ timing
def _layer_weights():
    shapes = {"wqkv": (H, Q + 2 * KV), "wo": (Q, H), "wug": (H, 2 * I), "wd": (I, H)}
    bf16 = {k: _randn(*s, seed=10 + j, scale=s[0] ** -0.5).bfloat16() for j, (k, s) in enumerate(shapes.items())}
    return bf16, {k: fp8.quantize_weight(v) for k, v in bf16.items()}


def _dense_fns(T):
    """The dense part of one 8B layer (norm1, kqv, o + residual, norm2, ug, act, d + residual) three ways;
    attention is left out (its output is a fixed input)."""
    wb, wq = _layer_weights()
    n1, n2 = (_randn(H, seed=20) * 0.1 + 1).bfloat16(), (_randn(H, seed=21) * 0.1 + 1).bfloat16()
    x, attn = _randn(T, H, seed=22).bfloat16(), _randn(T, Q, seed=23).bfloat16()
    # the fused path's layer input is the last layer's D output + its residual, summed by norm1
    d_prev, mid_prev = _randn(T, H, seed=24).bfloat16(), _randn(T, H, seed=25).bfloat16()
    e = lambda *s: torch.empty(*s, device="cuda", dtype=torch.bfloat16)
    h, qkv, mid, ug, act, y, xs = e(T, H), e(T, Q + 2 * KV), e(T, H), e(T, 2 * I), e(T, I), e(T, H), e(T, H)
    qbuf, sbuf = torch.empty(T * I, device="cuda", dtype=FP8), torch.empty(T, 1, device="cuda")
    qv = lambda K: (qbuf[:T * K].view(T, K), sbuf)

    def plain(gemm, w):
        rmsnorm(x, n1, h, SMS)
        gemm(h, w["wqkv"], qkv, SMS)
        gemm(attn, w["wo"], mid, SMS, residual=x)
        rmsnorm(mid, n2, h, SMS)
        gemm(h, w["wug"], ug, SMS)
        silu_and_mul(ug, act, SMS)
        gemm(act, w["wd"], y, SMS, residual=mid)

    def fused():                                    # what PagedModel._fp8_qkv / _fp8_mlp run
        a = quant_fp8.rmsnorm_quant(d_prev, n1, *qv(H), SMS, residual=mid_prev, residual_out=xs)
        gemm_fp8(a, wq["wqkv"], qkv, SMS)
        gemm_fp8(quant_fp8.quantize_rows_into(attn, *qv(Q), SMS), wq["wo"], mid, SMS)
        a = quant_fp8.rmsnorm_quant(mid, n2, *qv(H), SMS, residual=xs, residual_out=mid)
        gemm_fp8(a, wq["wug"], ug, SMS)
        gemm_fp8(quant_fp8.silu_mul_quant(ug, *qv(I), SMS), wq["wd"], y, SMS)
        # (y + mid: the next layer's norm1 adds it, as at the top of this one)

    return {"bf16": lambda: plain(gemm_torch, wb), "fp8 unfused": lambda: plain(gemm_fp8, wq), "fp8 fused": fused}


def _graph_ms(fn, reps=50):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def test_time_of_an_8b_layer_dense_ops(capsys):
    """Printed for the record; asserts only that fusing the quantization does not make the layer slower."""
    times = {name: _graph_ms(fn) for name, fn in _dense_fns(T_8B).items()}
    x = _randn(T_8B, H, seed=30).bfloat16()
    w = torch.ones(H, device="cuda", dtype=torch.bfloat16)
    h, (qb, sb) = torch.empty_like(x), _bufs(T_8B, H)
    ug, act = _randn(T_8B, 2 * I, seed=31).bfloat16(), torch.empty(T_8B, I, device="cuda", dtype=torch.bfloat16)
    qi, si = _bufs(T_8B, I)
    small = {"rmsnorm": lambda: rmsnorm(x, w, h, SMS),
             "rmsnorm + quantize_rows (torch ops)": lambda: fp8.quantize_rows(rmsnorm(x, w, h, SMS)),
             "rmsnorm_quant": lambda: quant_fp8.rmsnorm_quant(x, w, qb, sb, SMS),
             "silu_and_mul": lambda: silu_and_mul(ug, act, SMS),
             "silu_and_mul + quantize_rows (torch ops)": lambda: fp8.quantize_rows(silu_and_mul(ug, act, SMS)),
             "silu_mul_quant": lambda: quant_fp8.silu_mul_quant(ug, qi, si, SMS),
             "quantize_rows (torch ops)": lambda: fp8.quantize_rows(x),
             "quantize_rows_into": lambda: quant_fp8.quantize_rows_into(x, qb, sb, SMS)}
    small_ms = {name: _graph_ms(fn) for name, fn in small.items()}
    with capsys.disabled():
        print(f"\nLLaMA-3-8B layer dense ops (norms, 4 GEMMs, SiLU, residuals; no attention), T={T_8B}, "
              f"CUDA graph, {torch.cuda.get_device_name()}:")
        for name, ms in times.items():
            print(f"  {name:12s} {ms:.3f} ms  ({times['bf16'] / ms:.2f}x bf16)")
        print("  x 32 layers: " + ", ".join(f"{name} {32 * ms:.2f} ms" for name, ms in times.items()))
        for name, ms in small_ms.items():
            print(f"  {name:42s} {1000 * ms:.1f} us")
    assert times["fp8 fused"] <= 1.02 * times["fp8 unfused"], times


SILU_CONFIGS = [quant_fp8.RowsConfig(),                                           # one 16-warp program per row
                quant_fp8.RowsConfig(num_warps=8, programs_per_sm=2),
                quant_fp8.RowsConfig(max_one_pass=0, chunk=8192, num_warps=8, programs_per_sm=4),
                quant_fp8.RowsConfig(max_one_pass=0, chunk=4096, num_warps=4, programs_per_sm=8),
                quant_fp8.RowsConfig(max_one_pass=0, chunk=2048, num_warps=4, programs_per_sm=8),
                quant_fp8.RowsConfig(max_one_pass=0, chunk=2048, num_warps=4, programs_per_sm=16)]


def test_silu_mul_quant_configs_write_the_same_bytes(capsys):
    """The row quantizer's configs at the FP8 E1 top bucket's 1,728 rows (8B FFN): every config writes
    the default's bytes; their times are printed, for choosing the default."""
    T = 1728
    ug = _randn(T, 2 * I, seed=40, scale=2).bfloat16()
    outs, times = [], []
    for cfg in SILU_CONFIGS:
        q, s = _bufs(T, I)
        quant_fp8.silu_mul_quant_triton(ug, q, s, SMS, config=cfg)
        outs.append((q.view(torch.uint8).clone(), s.clone()))
        times.append(_graph_ms(lambda cfg=cfg, q=q, s=s: quant_fp8.silu_mul_quant_triton(ug, q, s, SMS, config=cfg)))
    with capsys.disabled():
        print(f"\nsilu_mul_quant, {T} x {I}, {torch.cuda.get_device_name()} (ideal at HBM: "
              f"{T * I * 5 / 3.35e9:.1f} us for its {T * I * 5 / 1e6:.0f} MB):")
        for cfg, ms in zip(SILU_CONFIGS, times):
            print(f"  {cfg}: {1000 * ms:.1f} us")
    for q, s in outs[1:]:
        assert torch.equal(q, outs[0][0]) and torch.equal(s, outs[0][1])
