"""The fused RoPE + paged KV write (kernels/rope_paged.py): its torch definition (rope_append_torch +
write_kv_torch) against the rotate-half formula, and the Triton kernel in Triton's interpreter (a
child process, tests/rope_paged_interp.py) against that definition, byte for byte: bf16, fp32 and
fp8 caches, GQA, odd T, shuffled slots over pages, padding rows (slot -1) leaving the cache as it was.
The GPU check is tests/gpu/test_rope_paged_gpu.py."""

import pytest

torch = pytest.importorskip("torch")

from conftest import run_interpreted

from nfsearch.runtime.kernels.rope_paged import rope_write_kv, rope_write_kv_torch
from nfsearch.runtime.kernels.torch_ops import rope_cos_sin


def rotate_half_reference(x, cos, sin, positions):
    """HF LLaMA's formula in float64: x * cos + rotate_half(x) * sin, cos/sin repeated over both halves."""
    c = torch.cat([cos[positions.long()]] * 2, -1).double()[:, None, :]
    s = torch.cat([sin[positions.long()]] * 2, -1).double()[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x.double() * c + rotated.double() * s


def test_torch_op_rotates_q_and_k_writes_v_raw_and_skips_padding():
    T, HQ, HKV, D, PS = 5, 4, 2, 8, 4
    qkv = torch.randn(T, (HQ + 2 * HKV) * D)
    cos, sin = rope_cos_sin(64, D, theta=10000.0)
    positions = torch.tensor([0, 7, 63, 3, 20], dtype=torch.int32)
    slots = torch.tensor([9, -1, 0, 15, 4], dtype=torch.int32)
    kc, vc = torch.full((4, PS, HKV, D), 7.0), torch.full((4, PS, HKV, D), 7.0)
    q = rope_write_kv(qkv, positions, cos, sin, torch.empty(T, HQ, D), kc, vc, slots)
    heads = qkv.view(T, HQ + 2 * HKV, D)
    torch.testing.assert_close(q.double(), rotate_half_reference(heads[:, :HQ], cos, sin, positions))
    want_k = rotate_half_reference(heads[:, HQ:HQ + HKV], cos, sin, positions)
    flat_k, flat_v = kc.view(-1, HKV, D), vc.view(-1, HKV, D)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            torch.testing.assert_close(flat_k[slot].double(), want_k[t])
            assert torch.equal(flat_v[slot], heads[t, HQ + HKV:])
    assert torch.equal(q[0], heads[0, :HQ])                   # position 0: no rotation
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[slots[slots >= 0].long()] = False
    assert (flat_k[untouched] == 7).all() and (flat_v[untouched] == 7).all()


def test_torch_op_fills_given_k_v_buffers_and_fp8_scales():
    T, HQ, HKV, D = 3, 2, 1, 16
    qkv = torch.randn(T, (HQ + 2 * HKV) * D).bfloat16()
    cos, sin = rope_cos_sin(32, D)
    kc = torch.zeros(2, 4, HKV, D, dtype=torch.float8_e4m3fn)
    ks, vs = torch.ones(2, 4, HKV), torch.ones(2, 4, HKV)
    k_out, v_out = torch.zeros(T, HKV, D, dtype=torch.bfloat16), torch.zeros(T, HKV, D, dtype=torch.bfloat16)
    q = torch.empty(T, HQ, D, dtype=torch.bfloat16)
    rope_write_kv_torch(qkv, torch.tensor([1, 2, 3]), cos, sin, q, kc, kc.clone(), torch.tensor([5, -1, 0]),
                        k_scales=ks, v_scales=vs, k_out=k_out, v_out=v_out)
    assert torch.equal(v_out, qkv.view(T, -1, D)[:, HQ + HKV:])
    assert ks.view(-1, HKV)[5, 0] == k_out[0].float().abs().max() / 448
    assert ks.view(-1, HKV)[1:5].eq(1).all()                  # the padding row wrote no scale


def test_triton_op_refuses_a_qkv_that_does_not_fit():
    pytest.importorskip("triton")
    from nfsearch.runtime.kernels.rope_paged import rope_write_kv_triton
    cos, sin = rope_cos_sin(8, 16)
    kc = torch.zeros(2, 4, 2, 16)
    with pytest.raises(ValueError, match="does not fit"):
        rope_write_kv_triton(torch.zeros(3, 5 * 16), torch.zeros(3, dtype=torch.int32), cos, sin,
                             torch.empty(3, 2, 16), kc, kc.clone(), torch.zeros(3, dtype=torch.int32))


# ---------------------------------------------------------------------------------- Triton interpreter
@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted("rope_paged_interp.py")


@pytest.mark.parametrize("case", ["bf16_gqa_odd", "fp8_gqa_odd", "fp32_cache"])
def test_interpreted_kernel_writes_the_torch_bytes(interpreted, case):
    r = interpreted[case]
    assert r["num_written"] > 0
    assert r["q_equal"] and r["k_equal"] and r["v_equal"] and r["scales_equal"], r
    assert r["untouched"], r                  # padding rows and unmapped slots keep their junk


def test_interpreted_all_padding_writes_nothing(interpreted):
    r = interpreted["bf16_all_padding"]
    assert r["num_written"] == 0 and r["untouched"] and r["q_equal"], r


def test_interpreted_fp32_qkv_within_an_ulp(interpreted):
    # fp32: torch's addcmul may round its product differently (no bf16 grid to land on)
    r = interpreted["fp32_qkv"]
    assert r["q_close"] and r["k_close"] and r["v_equal"] and r["untouched"], r


@pytest.fixture(scope="module")
def interpreted_model():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROPE_PAGED_CASES", "model")              # run_interpreted passes the environment on
        return run_interpreted("rope_paged_interp.py")


@pytest.mark.parametrize("kv", ["bf16", "fp8"])
def test_interpreted_kernel_in_the_engine_layer_changes_nothing(interpreted_model, kv):
    """PagedModel.rope_and_write_kv with the fused kernel (what the Triton attention path runs) against the
    torch RoPE + write_kv, a prefill step then a decode step of the tiny model: same logits, q and cache."""
    r = interpreted_model[f"model_{kv}"]
    assert r["kv_nonzero"] > 0
    assert r["logits_equal"] and r["q_equal"] and r["kv_equal"] and r["scales_equal"], r


@pytest.mark.slow
def test_interpreted_kernel_at_head_dim_128_and_page_size_8(monkeypatch):
    monkeypatch.setenv("ROPE_PAGED_CASES", "slow")          # run_interpreted passes the environment on
    for case, r in run_interpreted("rope_paged_interp.py").items():
        assert r["num_written"] > 0
        assert r["q_equal"] and r["k_equal"] and r["v_equal"], (case, r)
        assert r["scales_equal"] and r["untouched"], (case, r)
