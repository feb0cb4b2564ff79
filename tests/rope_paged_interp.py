"""The fused RoPE + paged KV write kernel (kernels/rope_paged.py) in Triton's interpreter, against
rope_write_kv_torch (run by tests/test_rope_paged.py in a child process with TRITON_INTERPRET=1, which
must be set before the kernels are defined). $ROPE_PAGED_CASES: "fast" (default), "slow" (larger
shapes) or "model" (the engine's tiny model with and without the fused kernel). Prints one JSON
object {case: {check: bool or number}}."""

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch

from nfsearch.runtime.kernels.rope_paged import rope_write_kv_torch, rope_write_kv_triton
from nfsearch.runtime.kernels.torch_ops import rope_cos_sin

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
    tri, ref, before = (caches(num_pages, page_size, hkv, d, cache_dtype) for _ in range(3))
    scales = lambda c: {"k_scales": c[2], "v_scales": c[3]} if cache_dtype == FP8 else {}
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


def run_model(kv_dtype) -> dict:
    """The engine's tiny model (bf16) with its torch RoPE + KV write against the same model running the
    fused kernel, over a prefill step (two chunks, padding rows) then a decode step: logits, q and caches."""
    from dataclasses import dataclass

    from nfsearch.runtime.paged_model import PagedModel, make_step_inputs
    from nfsearch.runtime.weights import random_weights
    from nfsearch.serving.model_config import load_model_config

    @dataclass(frozen=True)
    class Bucket:
        max_tokens: int = 16
        max_decode: int = 2
        max_segments: int = 2
        max_context: int = 32

    cfg = load_model_config(os.path.join(os.path.dirname(__file__), "fixtures", "engine-tiny", "config.json"))
    weights = random_weights(cfg, dtype=torch.bfloat16, seed=3)
    for w in weights.layers:                  # O(1) activations: 0.02-std weights give tiny q/k/v
        w.wqkv.mul_(20)
    models = [PagedModel(cfg, weights, num_pages=16, page_size=4, max_tokens=16, max_logit_rows=4,
                         kv_dtype=kv_dtype) for _ in range(2)]
    models[1].rope_write_kv = rope_write_kv_triton
    tables = [[5, 2, 9, 12], [7, 3]]
    slot = lambda r, pos: tables[r][pos // 4] * 4 + pos % 4
    prefill = {"input_ids": list(range(30, 44)), "positions": list(range(11)) + list(range(3)),
               "slot_mapping": [slot(0, p) for p in range(11)] + [slot(1, p) for p in range(3)],
               "chunk_starts": [0, 11], "chunk_lens": [11, 3], "prefix_lens": [0, 0], "page_tables": tables,
               "logit_rows": [10, 13]}
    decode = {"input_ids": [-1, -1], "prev_rows": [0, 1], "positions": [11, 3],
              "slot_mapping": [slot(0, 11), slot(1, 3)], "context_lens": [12, 4], "page_tables": tables,
              "logit_rows": [0, 1]}
    out = {"logits_equal": True}
    for fields in (prefill, decode):
        step = make_step_inputs(Bucket(), 4, "cpu", **fields)
        logits = [m.logits(step) for m in models]
        out["logits_equal"] &= torch.equal(*logits)
    out["q_equal"] = torch.equal(models[0].buf["q"], models[1].buf["q"])
    out["kv_equal"] = same(models[0].kv, models[1].kv)
    out["scales_equal"] = models[0].kv_scales is None or torch.equal(models[0].kv_scales, models[1].kv_scales)
    out["kv_nonzero"] = int((models[0].kv.float() != 0).sum())
    return out


BF16 = torch.bfloat16


def shape(T, hq, hkv, d, cache_dtype, num_pads, **kw) -> dict:
    return {"T": T, "hq": hq, "hkv": hkv, "d": d, "cache_dtype": cache_dtype, "num_pads": num_pads, **kw}


CASES = {
    "fast": {
        "bf16_gqa_odd": shape(37, 8, 2, 64, BF16, 5),
        "fp8_gqa_odd": shape(37, 8, 2, 64, FP8, 5),
        "bf16_all_padding": shape(7, 8, 2, 64, BF16, 7),
        "fp32_cache": shape(9, 4, 1, 32, torch.float32, 2, seed=3),
        "fp32_qkv": shape(9, 4, 2, 32, torch.float32, 1, qkv_dtype=torch.float32, seed=6),
    },
    "slow": {
        "bf16_mha_pages8": shape(101, 6, 6, 128, BF16, 9, page_size=8, num_pages=20, seed=4),
        "fp8_gqa4_pages8": shape(101, 12, 3, 128, FP8, 9, page_size=8, num_pages=20, seed=5),
    },
}


if __name__ == "__main__":
    torch.manual_seed(0)
    which = os.environ.get("ROPE_PAGED_CASES", "fast")
    if which == "model":
        json.dump({"model_bf16": run_model(None), "model_fp8": run_model(FP8)}, sys.stdout)
    else:
        json.dump({name: run_case(**kw) for name, kw in CASES[which].items()}, sys.stdout)
