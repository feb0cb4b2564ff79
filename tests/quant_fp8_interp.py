"""The fused FP8 quantization kernels (kernels/quant_fp8.py) in Triton's interpreter against their torch
references (run by tests/test_quant_fp8.py in a child process with TRITON_INTERPRET=1, which must be
set before the kernels are defined). Prints one JSON object: per case, how many e4m3 bytes and scales
differ, and a tiny FP8 PagedModel's logits with the Triton kernels against the torch ones."""

import json
import os
import sys
from functools import partial
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quant_fp8_model import fp8_tiny_logits

from nfsearch.runtime.kernels import quant_fp8 as qf

FP8 = torch.float8_e4m3fn
TINY = str(Path(__file__).parent / "fixtures" / "engine-tiny" / "config.json")


def rows(T, W, dtype, seed, is_huge=False):
    """Rows of very different magnitudes, a zero row, a row of one large value and (is_huge: for the
    plain quantizer, whose input is not squared or exponentiated) a row near the dtype's largest."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, W, generator=gen) * torch.logspace(-4, 4, T)[:, None]
    if T > 3:
        x[1] = 0
        x[2] = 0
        x[2, W // 3] = -3e4
        if is_huge:
            x[3] = x[3].sign() * 3e38
    return x.to(dtype)


def diff(got, want) -> dict:
    (q1, s1), (q2, s2) = (got.data, got.scale), (want.data, want.scale)
    return {"bytes": int((q1.view(torch.uint8) != q2.view(torch.uint8)).sum()),
            "scales": int((s1 != s2).sum()), "scale_rel": float(((s1 - s2) / s2).abs().max()),
            "max_q": float(q1.float().abs().max())}


def run(fn_tri, fn_ref, x, W, *args, **kw):
    outs = []
    for fn in (fn_tri, fn_ref):
        q, s = torch.full((x.shape[0], W), float("nan"), dtype=torch.float32).to(FP8), torch.zeros(x.shape[0], 1)
        outs.append(fn(x, *args[:1], q, s, 3, *args[1:], **kw))
    return diff(*outs)


def kernels() -> dict:
    out = {}
    cases = [(torch.bfloat16, T, W) for T, W in ((1, 64), (13, 200), (5, 4096))] + [(torch.float32, 13, 200)]
    for dtype, T, W in cases:
        dn = str(dtype).split(".")[1]
        x = rows(T, W, dtype, T + W)
        w = (torch.rand(W, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)
        out[f"norm_{dn}_{T}x{W}"] = run(qf.rmsnorm_quant_triton, qf.rmsnorm_quant_torch, x, W, w, 1e-5)
        r = rows(T, W, dtype, 7) / 3
        tri_h, ref_h = torch.empty_like(x), torch.empty_like(x)
        d = run(qf.rmsnorm_quant_triton, qf.rmsnorm_quant_torch, x, W, w, 1e-5, residual=r, residual_out=tri_h)
        qf.rmsnorm_quant_torch(x, w, torch.empty(T, W, dtype=FP8), torch.empty(T, 1), 0, 1e-5, residual=r,
                               residual_out=ref_h)
        out[f"norm_res_{dn}_{T}x{W}"] = d | {"h_equal": torch.equal(tri_h, ref_h)}
        xs = rows(T, 2 * W, dtype, T) / 1e3
        out[f"silu_{dn}_{T}x{W}"] = run(qf.silu_mul_quant_triton, qf.silu_mul_quant_torch, xs, W)
        xh = rows(T, W, dtype, T + W, is_huge=True)
        out[f"rows_{dn}_{T}x{W}"] = run(qf.quantize_rows_triton, qf.quantize_rows_torch, xh, W)
    # the two-pass path (rows wider than max_one_pass), forced on small rows
    two_pass = qf.RowsConfig(max_one_pass=64, chunk=32, num_warps=1, programs_per_sm=3)
    x = rows(11, 2 * 150, torch.bfloat16, 5) / 1e3
    out["silu_two_pass"] = run(partial(qf.silu_mul_quant_triton, config=two_pass), qf.silu_mul_quant_torch, x, 150)
    out["rows_two_pass"] = run(partial(qf.quantize_rows_triton, config=two_pass), qf.quantize_rows_torch, x, 300)
    # in-place residual: residual_out aliases x (what PagedModel's norm1 does)
    x, r = rows(5, 64, torch.bfloat16, 2), rows(5, 64, torch.bfloat16, 3)
    want = (x.float() + r.float()).bfloat16()
    qf.rmsnorm_quant_triton(x, torch.ones(64, dtype=torch.bfloat16), torch.empty(5, 64, dtype=FP8),
                            torch.empty(5, 1), 2, residual=r, residual_out=x)
    out["in_place_residual"] = torch.equal(x, want)
    return out


def model_logits() -> dict:
    """Tiny FP8 PagedModel: fused path with the Triton kernels vs the torch references vs unfused."""
    got = {}
    for name, is_fused, is_triton in (("triton", True, True), ("torch", True, False), ("unfused", False, False)):
        qf.INTERPRET = is_triton
        got[name] = fp8_tiny_logits(TINY, torch.bfloat16, is_fused, num_steps=1)   # (the interpreter is slow)
    qf.INTERPRET = True
    ref = got["torch"]
    return {"model_triton_vs_torch": float((got["triton"] - ref).abs().max()),
            "model_triton_vs_unfused_rel": float((got["triton"] - got["unfused"]).norm() / got["unfused"].norm())}


if __name__ == "__main__":
    print(json.dumps(kernels() | model_logits()))
