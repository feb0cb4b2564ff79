"""FP8 GEMMs on the CPU: the quantizers (runtime.fp8), the "fp8" GEMM impl against float32 matmuls, FP8
checkpoints of three HuggingFace formats written here with safetensors, the engine end to end with
--quantization fp8, and the FP8-vs-float32 logits of the transformers-equivalence checkpoints.

The CPU runs the same quantization as the GPU; only the GEMM differs (a float32 matmul of the
dequantized e4m3 values here, torch._scaled_mm with float32 accumulation and a bf16 output there):
tests/gpu/test_fp8_gpu.py checks that part.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ENGINE_TINY

from nfsearch.errors import NfsearchError
from nfsearch.runtime import fp8
from nfsearch.runtime.kernels import IMPLS, gemm_fp8, profiled_impls, weight_for
from nfsearch.runtime.kernels.gemm_fp8 import scaled_mm_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ULP_REL = 2.0 ** -4          # e4m3: 3 mantissa bits, round to nearest -> relative error <= 2^-4 (normals)
SUB_ABS = 2.0 ** -10         # half the subnormal spacing (2^-9), in units of the scale


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the quantizers
def test_round_trip_error_bound():
    x = _randn(64, 256) * torch.logspace(-3, 1, 64)[:, None]          # rows of very different ranges
    q, s = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 1) and s.dtype == torch.float32
    back = fp8.dequantize(q, s)
    err = (back - x).abs()
    assert bool((err <= ULP_REL * x.abs() + SUB_ABS * s).all())
    rel = (err / x.abs().clamp_min(1e-30))[x.abs() > s * 2.0 ** -6]
    assert 2.0 ** -6 < float(rel.max()) <= ULP_REL                   # quantized for real, and within the bound


def test_per_token_scales_are_row_amax_over_448():
    x = _randn(8, 32, seed=1)
    x[3] = 0.0                                                        # a padding row
    q, s = fp8.quantize_rows(x.bfloat16())
    want = x.bfloat16().float().abs().amax(dim=1, keepdim=True) / 448.0
    assert torch.equal(s[[0, 1, 2, 4, 5, 6, 7]], want[[0, 1, 2, 4, 5, 6, 7]])
    assert bool(torch.isfinite(s).all()) and float(s[3]) > 0 and not q[3].float().any()
    assert torch.equal(q.float().abs().amax(dim=1)[[0, 1, 2]], torch.full((3,), 448.0))


def test_per_channel_weight_scales_and_layout():
    w = _randn(48, 80, seed=2)                                        # [K, N]: x @ w
    qw = fp8.quantize_weight(w)
    assert qw.data.shape == (80, 48) and qw.data.is_contiguous() and qw.shape == (48, 80)
    assert qw.scale.shape == (1, 80) and qw.mat2.shape == (48, 80) and qw.mat2.stride() == (1, 48)
    assert torch.equal(qw.scale, w.abs().amax(dim=0, keepdim=True) / 448.0)
    assert torch.equal(qw.data.float().abs().amax(dim=1), torch.full((80,), 448.0))   # each column's max -> 448
    assert bool(((qw.dequantize() - w).abs() <= ULP_REL * w.abs() + SUB_ABS * qw.scale).all())
    assert qw.num_bytes == 80 * 48 + 80 * 4


def test_per_tensor_weight_scale():
    w = _randn(32, 16, seed=3)
    qw = fp8.quantize_weight(w, scheme="tensor")
    assert qw.scheme == "tensor" and torch.equal(qw.scale, torch.full((1, 16), float(w.abs().max()) / 448.0))
    with pytest.raises(ValueError):
        fp8.quantize_weight(w, scheme="block")


def test_saturation_at_448():
    x = torch.tensor([1000.0, -1000.0, 448.0, 500.0, -449.0, 3.0])
    q = fp8.to_fp8(x, torch.tensor(1.0))                              # a static scale too small for x
    assert q.float().tolist() == [448.0, -448.0, 448.0, 448.0, -448.0, 3.0]
    assert fp8.quantize_tensor(x)[0].float().abs().max() == 448.0


# ------------------------------------------------------------------------------ the GEMM impl
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_fp8_within_the_fp8_bound(dtype):
    a, w = _randn(40, 96, seed=4).to(dtype), (_randn(96, 64, seed=5) / 10).to(dtype)
    res = _randn(40, 64, seed=6).to(dtype)
    ref = a.float() @ w.float()
    # each product a_k w_k carries at most (1 + 2^-4)^2 - 1 relative error (normals; the subnormal
    # floor adds a little), so |y - ref| <= (2^-3 + 2^-8) (|a| @ |w|) + subnormal slack
    bound = (2.0 ** -3 + 2.0 ** -8) * (a.float().abs() @ w.float().abs()) + 1e-3
    out = torch.empty(40, 64, dtype=dtype)
    y = IMPLS["kqv"]["fp8"](a, fp8.quantize_weight(w), out, 132)
    assert y is out
    slack = 0.0 if dtype == torch.float32 else 2.0 ** -8 * ref.abs()   # the bf16 output's own rounding
    assert bool(((y.float() - ref).abs() <= bound + slack).all())
    err = float((y.float() - ref).abs().mean() / ref.abs().mean())
    assert 1e-3 < err < 0.05                                           # fp8-sized, not bf16-sized, error
    tol = {"rtol": 2.0 ** -7, "atol": 2.0 ** -7} if dtype == torch.bfloat16 else {"atol": 1e-5}   # bf16: 1 ulp
    y2 = gemm_fp8(a, fp8.quantize_weight(w), torch.empty_like(out), 132, residual=res)
    assert torch.allclose(y2.float(), y.float() + res.float(), **tol)
    bias = _randn(64, seed=7).to(dtype)
    y3 = gemm_fp8(a, fp8.quantize_weight(w), None, 0, residual=bias.expand(40, 64))
    assert y3.dtype == dtype and torch.allclose(y3.float(), y.float() + bias.float(), **tol)


def test_cpu_path_is_scaled_mm_rowwise():
    """The float32 path states what torch._scaled_mm computes with scale_a [M, 1], scale_b [1, N]."""
    a, w = _randn(16, 64, seed=8), _randn(64, 48, seed=9)
    qw = fp8.quantize_weight(w)
    q_a, s_a = fp8.quantize_rows(a)
    try:
        lib = scaled_mm_reference(q_a, s_a, qw)
    except (RuntimeError, NotImplementedError):
        pytest.skip("this torch has no CPU _scaled_mm")
    ours = gemm_fp8(a, qw, None, 0)
    assert torch.allclose(lib, ours, rtol=1e-5, atol=1e-5)


def test_plain_weight_is_quantized_once_and_requantized_after_a_write():
    a, w = _randn(8, 32, seed=10), _randn(32, 16, seed=11)
    assert weight_for("fp8", w) is weight_for("fp8", w)               # cached for the tensor
    assert weight_for("torch", w) is w
    assert torch.equal(gemm_fp8(a, w, None, 0), gemm_fp8(a, fp8.quantize_weight(w), None, 0))
    first = weight_for("fp8", w)
    w.mul_(2.0)
    assert weight_for("fp8", w) is not first
    assert torch.allclose(gemm_fp8(a, w, None, 0), gemm_fp8(a, fp8.quantize_weight(w), None, 0))


def test_fp8_is_opt_in_for_the_gemms():
    from nfsearch.cli.profiling import _opt_in_impls
    from nfsearch.plan import OPT_IN_IMPLS, RUNTIME_IMPLS
    assert "fp8" in OPT_IN_IMPLS <= RUNTIME_IMPLS
    assert not any("fp8" in v for v in profiled_impls().values())
    asked = profiled_impls(("fp8",))
    assert {op for op, v in asked.items() if "fp8" in v} == {"kqv", "o", "ug", "d"}
    assert _opt_in_impls("fp8,cublaslt") == ("fp8", "cublaslt")
    with pytest.raises(NfsearchError):
        _opt_in_impls("fp16")


# ------------------------------------------------------------------------------ the engine end to end
def test_bench_tiny_engine_with_fp8(capsys):
    from nfsearch.runtime.bench_engine import BenchOptions, format_report, run_bench
    opts = BenchOptions(ENGINE_TINY, "const:24:6", 6, dense_batch=64, device="cpu", quantization="fp8")
    report = run_bench(opts, echo=lambda line: None, progress=False)
    assert report["gemm"] == "fp8-e4m3 w8a8 per-channel/per-token" and report["quantization"] == "fp8"
    assert report["weights_source"] == "quantized on load"
    assert report["summary"]["num_finished"] == 6 and report["summary"]["output_tokens"] == 36
    assert "GEMMs" in format_report(report) and "fp8-e4m3 w8a8" in format_report(report)
    plain = run_bench(BenchOptions(ENGINE_TINY, "const:24:6", 2, dense_batch=64, device="cpu"),
                      echo=lambda line: None, progress=False)
    assert plain["gemm"] == "fp32" and plain["quantization"] is None
    assert report["weights_bytes"] < plain["weights_bytes"]          # e4m3 GEMM weights, fp32 embedding/head


def test_engine_refuses_an_unknown_quantization():
    from nfsearch.runtime.engine import Engine
    with pytest.raises(NfsearchError, match="quantization"):
        Engine(ENGINE_TINY, device="cpu", dtype="fp32", quantization="int4", num_pages=8)


def test_cli_bench_quantization_fp8(tmp_path):
    from click.testing import CliRunner

    from nfsearch.cli import main
    out = tmp_path / "b.json"
    result = CliRunner().invoke(main, ["bench", "--model", ENGINE_TINY, "--trace", "const:16:4", "--num-requests",
                                       "3", "--device", "cpu", "--dense-batch", "64", "--quantization", "fp8",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["gemm"] == "fp8-e4m3 w8a8 per-channel/per-token"
    assert "fp8-e4m3 w8a8 per-channel/per-token" in result.output
