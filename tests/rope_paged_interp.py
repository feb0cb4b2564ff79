"""The fused RoPE + paged KV write kernel (kernels/rope_paged.py) in Triton's interpreter, against
rope_write_kv_torch (run by tests/test_rope_paged.py in a child process with TRITON_INTERPRET=1, which
must be set before the kernels are defined). $ROPE_PAGED_CASES: "fast" (default) or "slow" (larger
shapes). Prints one JSON object {case: {check: bool or number}}."""

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from nfsearch.runtime.kernels.rope_paged import rope_write_kv_torch, rope_write_kv_triton  # noqa: E402
from nfsearch.runtime.kernels.torch_ops import rope_cos_sin  # noqa: E402

FP8 = torch.float8_e4m3fn


def caches(num_pages, page_size, hkv, d, dtype):
    """(k cache, v cache, k scales, v scales) filled with junk, so untouched entries are seen to stay."""
    gen = torch.Generator().manual_seed(1)
    kc = (torch.randn(num_pages, page_size, hkv, d, generator=gen) * 3).to(dtype)
    vc = (torch.randn(num_pages, page_size, hkv, d, generator=gen) * 3).to(dtype)
    ks = torch.rand(num_pages, page_size, hkv, generator=gen) + 0.5
    return kc, vc, ks, ks.clone() * 2


def same(a, b) -> bool:
    if a.dtype == FP8:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def run_case(T, hq, hkv, d, cache_dtype, num_pads, page_size=16, num_pages=12, qkv_dtype=torch.bfloat16,
             seed=0) -> dict:
    """Triton vs torch on shuffled slots across pages, num_pads padding rows (slot -1)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, (hq + 2 * hkv) * d, generator=gen)
           * torch.logspace(-2, 1, T)[:, None]).to(qkv_dtype)      # rows of different magnitudes
    cos, sin = rope_cos_sin(4096, d, theta=10000.0)
    positions = torch.randint(0, 4096, (T,), generator=gen, dtype=torch.int32)
    slots = torch.randperm(num_pages * page_size, generator=gen)[:T].to(torch.int32)
    pads = torch.randperm(T, generator=gen)[:num_pads]
    slots[pads] = -1
    tri, ref = caches(num_pages, page_size, hkv, d, cache_dtype), caches(num_pages, page_size, hkv, d, cache_dtype)
    before = caches(num_pages, page_size, hkv, d, cache_dtype)
    scales = lambda c: {"k_scales": c[2], "v_scales": c[3]} if cache_dtype == FP8 else {}  # noqa: E731
    q_tri = torch.full((T, hq, d), float("nan"), dtype=qkv_dtype)
    q_ref = torch.zeros((T, hq, d), dtype=qkv_dtype)
    rope_write_kv_triton(qkv, positions, cos, sin, q_tri, tri[0], tri[1], slots, 2, **scales(tri))
    rope_write_kv_torch(qkv, positions, cos, sin, q_ref, ref[0], ref[1], slots, **scales(ref))
    written = torch.zeros(num_pages * page_size, dtype=torch.bool)
    written[slots[slots >= 0].long()] = True
    untouched = all(same(t.view(-1, *t.shape[2:])[~written], b.view(-1, *b.shape[2:])[~written])
                    for t, b in zip(tri, before))
    out = {"q_equal": same(q_tri, q_ref), "k_equal": same(tri[0], ref[0]), "v_equal": same(tri[1], ref[1]),
           "scales_equal": same(tri[2], ref[2]) and same(tri[3], ref[3]), "untouched": untouched,
           "num_written": int(written.sum()),
           "q_close": torch.allclose(q_tri.float(), q_ref.float(), rtol=1e-6, atol=1e-6),
           "k_close": torch.allclose(tri[0].float(), ref[0].float(), rtol=1e-6, atol=1e-6)}
    return out


CASES = {
    "fast": {
        "bf16_gqa_odd": dict(T=37, hq=8, hkv=2, d=64, cache_dtype=torch.bfloat16, num_pads=5),
        "fp8_gqa_odd": dict(T=37, hq=8, hkv=2, d=64, cache_dtype=FP8, num_pads=5),
        "bf16_all_padding": dict(T=7, hq=8, hkv=2, d=64, cache_dtype=torch.bfloat16, num_pads=7),
        "fp32_cache": dict(T=9, hq=4, hkv=1, d=32, cache_dtype=torch.float32, num_pads=2, seed=3),
        "fp32_qkv": dict(T=9, hq=4, hkv=2, d=32, cache_dtype=torch.float32, num_pads=1, qkv_dtype=torch.float32,
                         seed=6),
    },
    "slow": {
        "bf16_mha_pages8": dict(T=101, hq=6, hkv=6, d=128, cache_dtype=torch.bfloat16, num_pads=9, page_size=8,
                                num_pages=20, seed=4),
        "fp8_gqa4_pages8": dict(T=101, hq=12, hkv=3, d=128, cache_dtype=FP8, num_pads=9, page_size=8,
                                num_pages=20, seed=5),
    },
}


if __name__ == "__main__":
    torch.manual_seed(0)
    cases = CASES[os.environ.get("ROPE_PAGED_CASES", "fast")]
    json.dump({name: run_case(**kw) for name, kw in cases.items()}, sys.stdout)
