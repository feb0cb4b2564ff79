"""The Triton paged-KV kernels on fp8 caches in Triton's interpreter (run by tests/test_fp8_kv.py in a
child process with TRITON_INTERPRET=1, which must be set before the kernels are defined). Prints one
JSON object: the largest differences against the torch references."""

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from nfsearch.runtime.kernels import paged_attention as pa  # noqa: E402

FP8 = torch.float8_e4m3fn


def fp8_caches(num_pages, page_size, hkv, d, is_head_major=False):
    """(K, V, K scales, V scales); scales contiguous [pages, page_size, Hkv], or the engine's head-major
    layout (new_kv_scales)."""
    kc = torch.zeros(num_pages, page_size, hkv, d, dtype=FP8)
    if is_head_major:
        return kc, kc.clone(), pa.new_kv_scales(num_pages, page_size, hkv), pa.new_kv_scales(num_pages, page_size, hkv)
    ks = torch.ones(num_pages, page_size, hkv)
    return kc, kc.clone(), ks, ks.clone()


def bytes_equal(a, b) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def main() -> dict:
    torch.manual_seed(0)
    P, PS, HKV, D, HQ = 14, 16, 2, 32, 8
    T = 90
    # rows of very different magnitudes (and one zero row) so the per-row scales differ
    k = torch.randn(T, HKV, D) * torch.logspace(-3, 2, T)[:, None, None]
    v = torch.randn(T, HKV, D) * torch.rand(T, HKV, 1) * 4
    k[5] = 0
    k[8, :, :3] = -1e-6 * k[8].abs().max()       # negatives that round to zero: stored as -0, as torch's
    slots = torch.randperm(P * PS)[:T]
    slots[3], slots[40] = -1, -1
    # the Triton write into head-major scales, torch's into contiguous ones: same values either way
    tri, ref = fp8_caches(P, PS, HKV, D, is_head_major=True), fp8_caches(P, PS, HKV, D)
    pa.write_kv_triton(k, v, tri[0], tri[1], slots, 2, k_scales=tri[2], v_scales=tri[3])
    pa.write_kv_torch(k, v, ref[0], ref[1], slots, ref[2], ref[3])
    out = {"write_bytes_equal": bytes_equal(tri[0], ref[0]) and bytes_equal(tri[1], ref[1]),
           "write_scales_equal": torch.equal(tri[2], ref[2]) and torch.equal(tri[3], ref[3])}

    kc, vc, ks, vs = ref
    pt = torch.randperm(P).to(torch.int32).view(2, 7)
    scales = {"k_scales": ks, "v_scales": vs}
    head_major = {"k_scales": tri[2], "v_scales": tri[3]}      # the kernels read the engine's layout
    # fp32 queries only: the interpreter's bf16 dot is wrong for the bf16 cache too (GPU tests cover bf16)
    for name, dt, in (("fp32", torch.float32),):
        q = torch.randn(3, HQ, D).to(dt)
        lens = torch.tensor([33, 0, 100], dtype=torch.int32)
        tables = torch.cat([pt, pt[:1]])
        want = pa.paged_decode_attention_torch(q, kc, vc, tables, lens, torch.empty_like(q), 0.2, **scales)
        worst = 0.0
        # the fp8 default (V staged as fp16) and the bf16 default (V loaded as bytes): both ways of widening V
        configs = (None, pa.DECODE_CONFIG)
        for num_splits, config in [(n, c) for n in (None, 1, 3) for c in configs]:
            got = pa.paged_decode_attention(q, kc, vc, tables, lens, torch.full_like(q, float("nan")), 0.2,
                                            num_sms=2, num_splits=num_splits, config=config, **head_major)
            worst = max(worst, float(((got.float() - want.float()).norm() / want.float().norm())))
        out[f"decode_{name}_rel"] = worst
        qp = torch.randn(24, HQ, D).to(dt)
        starts, clen, pre = (torch.tensor(x, dtype=torch.int32) for x in ([0, 9], [9, 15], [5, 60]))
        want = pa.paged_prefill_attention_torch(qp, kc, vc, pt, starts, clen, pre, torch.zeros_like(qp), 0.2,
                                                **scales)
        got = pa.paged_prefill_attention(qp, kc, vc, pt, starts, clen, pre, torch.zeros_like(qp), 0.2, num_sms=2,
                                         **head_major)
        out[f"prefill_{name}_rel"] = float(((got.float() - want.float()).norm() / want.float().norm()))
    return out


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
