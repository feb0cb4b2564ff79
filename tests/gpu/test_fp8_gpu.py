"""FP8 GEMMs on a GPU (H100: e4m3 tensor cores): torch._scaled_mm with rowwise scales against the CPU's
float32 statement of the same quantization, CUDA-graph capture of the quantize + GEMM and of a whole
FP8 engine, and (printed, not asserted) the time of LLaMA-3-8B's four GEMMs in bf16 and FP8."""

from __future__ import annotations

import importlib

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("FP8 GEMMs need compute capability >= 8.9 (Ada, Hopper)", allow_module_level=True)

from conftest import ENGINE_TINY as TINY

from nfsearch.runtime import fp8
from nfsearch.runtime.kernels import gemm_fp8, gemm_torch

gemm_fp8_module = importlib.import_module("nfsearch.runtime.kernels.gemm_fp8")  # kernels.gemm_fp8 is the function

# LLaMA-3-8B's GEMMs (K, N): kqv, o, ug, d
SHAPES_8B = {"kqv": (4096, 6144), "o": (4096, 4096), "ug": (4096, 28672), "d": (14336, 4096)}


def _randn(*shape, seed=0, device="cuda"):
    return torch.randn(*shape, generator=torch.Generator(device).manual_seed(seed), device=device)


@pytest.mark.parametrize("fast_accum", [True, False])
@pytest.mark.parametrize("m", [1, 17, 256, 2048])
def test_scaled_mm_matches_the_cpu_statement(m, fast_accum, monkeypatch):
    """The GPU's answer against the CPU path's float32 matmul of the same e4m3 values: the same
    quantized operands (bit for bit), then only accumulation order and the bf16 output differ."""
    monkeypatch.setattr(gemm_fp8_module, "USE_FAST_ACCUM", fast_accum)
    K, N = 4096, 1024
    a, w = _randn(m, K, seed=1).bfloat16(), (_randn(K, N, seed=2) / 64).bfloat16()
    res = _randn(m, N, seed=3).bfloat16()
    qw = fp8.quantize_weight(w)
    q_a, s_a = fp8.quantize_rows(a)
    q_cpu, s_cpu = fp8.quantize_rows(a.cpu())
    assert torch.equal(s_a.cpu(), s_cpu)
    assert (q_a.cpu().float() != q_cpu.float()).float().mean() < 1e-4      # same rounding, barring ties
    out = torch.empty(m, N, device="cuda", dtype=torch.bfloat16)
    got = gemm_fp8(a, qw, out, 132, residual=res)
    want = gemm_fp8(a.cpu().float(), fp8.Fp8Weight(qw.data.cpu(), qw.scale.cpu()), None, 0) + res.cpu().float()
    err = (got.float().cpu() - want).abs()
    assert float(err.max()) <= 2.0 ** -7 * float(want.abs().max()) + 0.05, float(err.max())
    exact = a.float() @ w.float() + res.float()
    rel = float((got.float() - exact).abs().mean() / exact.abs().mean())
    assert rel < 0.05, rel                                                   # fp8-sized error against exact


def test_fp8_forward_captures_in_a_cuda_graph():
    a = _randn(512, 4096, seed=4).bfloat16()
    qw = fp8.quantize_weight((_randn(4096, 2048, seed=5) / 64).bfloat16())
    out = torch.empty(512, 2048, device="cuda", dtype=torch.bfloat16)
    gemm_fp8(a, qw, out, 132)                                               # warm up (cuBLAS/CUTLASS handles)
    eager = out.clone()
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        gemm_fp8(a, qw, out, 132)
    out.zero_()
    a.mul_(2.0)                                                              # new values, same buffers
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out.float(), 2 * eager.float(), rtol=2.0 ** -7, atol=1e-2)


def test_engine_with_fp8_gemms_graphs_equal_eager():
    """A whole engine with FP8 GEMMs: CUDA graphs + async give the tokens of eager + sync."""
    from nfsearch.runtime.engine import Engine, TraceShape
    from nfsearch.serving.traces import Request
    reqs = [Request(i, 5 + (7 * i) % 57, 3 + (5 * i) % 23) for i in range(24)]
    runs = []
    for graphs in (True, False):
        eng = Engine(TINY, device="cuda", dtype="bf16", gpu_memory_utilization=0.25, dense_batch=128,
                     max_decode=32, trace_shape=TraceShape.of(reqs), quantization="fp8",
                     use_cuda_graphs=graphs, is_async=graphs)
        assert eng.gemm_numerics == "fp8-e4m3 w8a8 per-channel/per-token" and eng.weights.is_fp8
        assert eng.use_cuda_graphs == graphs and (not graphs or eng.runner.graphs)
        runs.append([s.output_ids for s in sorted(eng.run(reqs).sequences, key=lambda s: s.seq_id)])
        del eng
    assert runs[0] == runs[1]


def test_time_of_the_8b_gemms_bf16_and_fp8(capsys):
    """Printed for the record (one H100 number per GEMM at 2048 tokens); asserts only that FP8 is not
    slower than bf16 on the largest GEMM."""
    def time_ms(fn, reps=50):
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    lines, ratio = [], {}
    for op, (K, N) in SHAPES_8B.items():
        a, w = _randn(2048, K, seed=6).bfloat16(), (_randn(K, N, seed=7) / 64).bfloat16()
        out = torch.empty(2048, N, device="cuda", dtype=torch.bfloat16)
        qw = fp8.quantize_weight(w)
        q_a, s_a = fp8.quantize_rows(a)
        t_bf16 = time_ms(lambda a=a, w=w, out=out: gemm_torch(a, w, out))
        t_fp8 = time_ms(lambda a=a, qw=qw, out=out: gemm_fp8(a, qw, out, 132))
        t_quant = time_ms(lambda a=a: fp8.quantize_rows(a))
        t_tensorwise = time_ms(lambda q_a=q_a, s_a=s_a, qw=qw: torch._scaled_mm(
            q_a, qw.mat2, scale_a=s_a[:1, 0], scale_b=qw.scale[0, :1], out_dtype=torch.bfloat16, use_fast_accum=True))
        ratio[op] = t_bf16 / t_fp8
        lines.append(f"{op} 2048x{K}x{N}: bf16 {t_bf16:.3f} ms, fp8 (quantize + rowwise) {t_fp8:.3f} ms "
                     f"({t_bf16 / t_fp8:.2f}x), of which quantize {t_quant:.3f} ms; per-tensor _scaled_mm alone "
                     f"{t_tensorwise:.3f} ms")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert ratio["ug"] > 1.0
