"""FP8 quantization fused into the ops before the GEMMs (kernels/quant_fp8.py): the torch references
against runtime.fp8's quantizer, the Triton kernels in Triton's interpreter against the references
(bytes and scales), gemm_fp8 on pre-quantized rows, and PagedModel with FP8 weights: the fused path
against the unfused one (CPU; the GPU side is tests/gpu/test_quant_fp8_gpu.py)."""

import pytest

torch = pytest.importorskip("torch")

from conftest import ENGINE_TINY, run_interpreted
from quant_fp8_model import run_steps, tiny_model

from nfsearch.runtime import fp8
from nfsearch.runtime.kernels import gemm_fp8, quant_fp8
from nfsearch.runtime.kernels.gemm_fp8 import _split_bias
from nfsearch.runtime.kernels.quant_fp8 import Fp8Rows

FP8 = torch.float8_e4m3fn
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bufs(T, W):
    return torch.full((T, W), 7.0).to(FP8), torch.full((T, 1), float("nan"))


def _same_bytes(a, b) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---------------------------------------------------------------------------------- torch references
def test_rmsnorm_quant_reference_is_quantize_rows_of_the_norm():
    torch.manual_seed(0)
    x, w = torch.randn(9, 96).bfloat16() * 30, (torch.rand(96) + 0.5).bfloat16()
    x[4] = 0                                                  # a padding row
    got = quant_fp8.rmsnorm_quant_torch(x, w, *_bufs(9, 96), eps=1e-5)
    h = x.float()
    norm = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()).bfloat16()
    q, s = fp8.quantize_rows(norm)
    assert _same_bytes(got.data, q) and torch.equal(got.scale, s)
    amax = norm.float().abs().amax(-1, keepdim=True)
    assert torch.equal(got.scale, amax.clamp_min(fp8.MIN_AMAX) / 448)
    assert got.data.float().abs().amax(-1)[[0, 1, 8]].tolist() == [448.0] * 3      # each row's amax -> 448
    assert not got.data[4].float().any() and got.scale[4].item() == pytest.approx(1e-12 / 448)
    deq = got.data.float() * got.scale
    assert float((deq - norm.float()).abs().max()) <= 2.0 ** -4 * float(amax.max())


def test_rmsnorm_quant_residual_is_added_in_the_dtype_and_written_back():
    torch.manual_seed(1)
    x, r, w = torch.randn(5, 64).bfloat16(), torch.randn(5, 64).bfloat16(), torch.ones(64).bfloat16()
    want_h = (x.float() + r.float()).bfloat16()
    plain = quant_fp8.rmsnorm_quant_torch(want_h, w, *_bufs(5, 64))
    got = quant_fp8.rmsnorm_quant_torch(x, w, *_bufs(5, 64), residual=r, residual_out=x)    # in place
    assert torch.equal(x, want_h)
    assert _same_bytes(got.data, plain.data) and torch.equal(got.scale, plain.scale)


def test_silu_mul_and_rows_references():
    torch.manual_seed(2)
    x = torch.randn(7, 2 * 48).bfloat16() * 4
    act = (torch.nn.functional.silu(x[:, :48].float()) * x[:, 48:].float()).bfloat16()
    got = quant_fp8.silu_mul_quant_torch(x, *_bufs(7, 48))
    q, s = fp8.quantize_rows(act)
    assert (got.data.float() != q.float()).sum() <= 2       # silu's exp form vs torch's: rare 1-ulp flips
    torch.testing.assert_close(got.scale, s, rtol=2 ** -7, atol=0)
    plain = quant_fp8.quantize_rows_torch(x, *_bufs(7, 96))
    q, s = fp8.quantize_rows(x)
    assert _same_bytes(plain.data, q) and torch.equal(plain.scale, s)


def test_out_buffers_are_checked():
    """Through the dispatching entry point: the torch reference (no triton) checks as the kernel does."""
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="q_out"):
        quant_fp8.quantize_rows_into(x, torch.empty(4, 32), torch.empty(4, 1), 1)
    with pytest.raises(ValueError, match="scale_out"):
        quant_fp8.quantize_rows_into(x, torch.empty(4, 32, dtype=FP8), torch.empty(4), 1)


# ---------------------------------------------------------------------------------- gemm_fp8
def test_gemm_on_prequantized_rows_equals_quantizing_inside():
    torch.manual_seed(3)
    a, w = torch.randn(11, 64), fp8.quantize_weight(torch.randn(64, 48) / 8)
    res = torch.randn(11, 48)
    rows = Fp8Rows(*fp8.quantize_rows(a))
    assert torch.equal(gemm_fp8(rows, w, torch.empty(11, 48), 0, residual=res),
                       gemm_fp8(a, w, torch.empty(11, 48), 0, residual=res))
    assert gemm_fp8(rows, w).dtype == torch.bfloat16          # no out: bf16, like the GPU's _scaled_mm
    with pytest.raises(ValueError, match="Fp8Rows"):
        gemm_fp8(rows.data, w, torch.empty(11, 48))


def test_only_a_bias_vector_goes_into_scaled_mm():
    bias = torch.randn(48).bfloat16()
    assert _split_bias(bias, torch.bfloat16)[0] is bias
    vec, rest = _split_bias(bias.expand(11, 48), torch.bfloat16)           # PagedModel's bqkv view
    assert rest is None and vec.data_ptr() == bias.data_ptr() and vec.shape == (48,)
    full = torch.randn(11, 48).bfloat16()
    assert _split_bias(full, torch.bfloat16) == (None, full)               # _scaled_mm's bias is [N] only
    assert _split_bias(bias.float(), torch.bfloat16)[0] is None


# ---------------------------------------------------------------------------------- PagedModel
def test_fused_fp8_model_equals_unfused_in_float32():
    """float32 activations: the fused path computes the unfused path's values (the same quantized rows,
    the residual adds moved into the norms), up to float32 summation order."""
    fused, unfused = (run_steps(tiny_model(ENGINE_TINY, torch.float32, True, f)) for f in (True, False))
    assert fused.shape == (5, 256)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_fused_fp8_model_bf16_within_fp8_tolerance():
    """bf16: the unfused path's torch SiLU rounds silu(gate) to bf16 before the product, so the two
    differ by bf16 roundings; both stay as close to the bf16-weight model as each other."""
    fused, unfused, ref = (run_steps(tiny_model(ENGINE_TINY, torch.bfloat16, fp, f))
                           for fp, f in ((True, True), (True, False), (False, True)))
    rel = lambda a, b: float((a - b).norm() / b.norm())
    assert rel(fused, unfused) < 0.08
    assert rel(fused, ref) < 0.2 and rel(fused, ref) < 1.5 * rel(unfused, ref)
    assert (fused.argmax(-1) == unfused.argmax(-1)).float().mean() >= 0.8


def test_bf16_weights_keep_their_path():
    model = tiny_model(ENGINE_TINY, torch.float32, is_fp8=False)
    assert model.fp8_buf is None and not model.is_fp8_fused
    on = run_steps(model)
    off = run_steps(tiny_model(ENGINE_TINY, torch.float32, is_fp8=False, is_fused=False))
    assert torch.equal(on, off)


def test_fp8_buffers_are_static_and_used():
    model = tiny_model(ENGINE_TINY, torch.float32)
    m = model.cfg.spec
    assert model.fp8_buf.numel() == model.max_tokens * max(m.hidden_size, m.q_size, m.intermediate_size)
    ptrs = (model.fp8_buf.data_ptr(), model.fp8_scales.data_ptr())
    run_steps(model)
    assert (model.fp8_buf.data_ptr(), model.fp8_scales.data_ptr()) == ptrs
    assert model.fp8_buf.float().abs().sum() > 0 and (model.fp8_scales[:5] != 1).all()


# ---------------------------------------------------------------------------------- Triton interpreter
@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted("quant_fp8_interp.py")


def test_interpreted_kernels_write_the_reference_bytes(interpreted):
    cases = {k: v for k, v in interpreted.items() if isinstance(v, dict)}
    assert len(cases) == 18
    for name, d in cases.items():
        assert d["bytes"] == 0, (name, d)                     # every e4m3 byte, zero and odd rows included
        assert d["max_q"] == 448.0 or name.startswith("silu") and name.endswith("1x64"), (name, d)   # saturated
        assert d.get("h_equal", True), name
        if "float32" in name:                                 # reduction order: scales within 2 ulps
            assert d["scale_rel"] <= 2.5e-7, (name, d)
        else:
            assert d["scales"] == 0, (name, d)


def test_interpreted_in_place_residual(interpreted):
    assert interpreted["in_place_residual"]


def test_interpreted_model_equals_the_torch_path(interpreted):
    assert interpreted["model_triton_vs_torch"] == 0.0
    assert interpreted["model_triton_vs_unfused_rel"] < 0.08


def test_gemm_wrappers_with_the_plain_signature_pass_fp8_rows_through():
    """engine_tp wraps the O and D GEMMs as op(a, w, out, num_sms, residual=None) (all-reduce, then the
    residual): the fused path hands them one Fp8Rows `a` and no residual, so a wrapper works unchanged."""
    model = tiny_model(ENGINE_TINY, torch.float32)
    want = run_steps(model)
    seen = []

    def wrap(gemm):
        def op(a, w, out, num_sms, residual=None):
            seen.append((type(a).__name__, residual is None))
            gemm(a, w, out, num_sms)
            if residual is not None:
                out.add_(residual)
        return op

    model = tiny_model(ENGINE_TINY, torch.float32)
    model.ops = model.ops | {op: wrap(model.ops[op]) for op in ("o", "d")}
    torch.testing.assert_close(run_steps(model), want, rtol=0, atol=0)
    assert set(seen) == {("Fp8Rows", True)} and len(seen) == 3 * 2 * 2      # 3 forwards x 2 layers x o, d
