"""Roofline analysis against the figures measured and recorded in shared/GPU_FACTS.md (H100)."""

import pytest

from conftest import FIXTURES
from nfsearch.roofline import layer_work, roofline
from nfsearch.specs import load_gpu, load_model, load_workload

# workload -> (T_compute ms, T_mem ms) from the GPU_FACTS.md standard-workload table
FACTS = {"W1": (0.299, 0.915), "W2": (1.170, 1.059), "W3": (2.322, 1.250)}


@pytest.mark.parametrize("wid", sorted(FACTS))
def test_llama3_8b_on_h100_matches_facts(wid):
    r = roofline(load_model("llama-3-8b"), load_workload(wid), load_gpu("h100-sxm"))
    compute, mem = FACTS[wid]
    assert r.compute_ms == pytest.approx(compute, rel=0.01)
    assert r.mem_ms == pytest.approx(mem, rel=0.04)
    assert r.net_ms == 0 and r.net_bytes == 0
    assert r.bound_ms == max(r.compute_ms, r.mem_ms)
    assert r.ratio == pytest.approx(r.mem_ms / r.compute_ms)
    assert r.num_tokens == load_workload(wid).num_tokens and r.num_layers == 32
    assert r.tokens_per_s == pytest.approx(r.num_tokens / (r.bound_ms * 1e-3 * 32))


def test_bound_kinds():
    gpu, model = load_gpu("h100-sxm"), load_model("llama-3-8b")
    assert roofline(model, load_workload("W1"), gpu).ratio > 2          # decode-heavy: memory bound
    assert roofline(model, load_workload("W3"), gpu).ratio < 0.7        # prefill-heavy: compute bound
    assert 0.8 < roofline(model, load_workload("W2"), gpu).ratio < 1.1  # balanced


def test_w2_flops_by_hand():
    """GEMM FLOPs of W2 worked out by hand: 2 * tokens * K * N summed over KQV, O, UG, D."""
    w = layer_work(load_model("llama-3-8b"), load_workload("W2"))
    gemm = 2 * 2048 * (4096 * 6144 + 4096 * 4096 + 4096 * 28672 + 14336 * 4096)
    # attention: decode 4 * 512 * 1024 * 32 * 128; prefill causal 4 * 1536 * 513/2 * 32 * 128
    attn = 4 * 512 * 1024 * 32 * 128 + 4 * 1536 * 513 / 2 * 32 * 128
    # elementwise: norms 2 * 4*n*h, rope 6*n*(q+kv), act 4*n*inter
    elem = 2 * 4 * 2048 * 4096 + 6 * 2048 * (4096 + 1024) + 4 * 2048 * 14336
    assert w.flops == pytest.approx(gemm + attn + elem, rel=1e-12)


@pytest.mark.parametrize("wid", ["W4", "W5"])
def test_tp_workloads_have_network_bytes(wid):
    w = load_workload(wid)
    r = roofline(load_model(w.model), w, load_gpu("h100-sxm"))
    assert r.net_bytes > 0 and r.net_ms > 0
    # two ring all-reduces of tokens x hidden bf16 activations
    hidden = load_model(w.model).hidden_size
    volume = 2 * w.num_tokens * hidden
    assert r.net_bytes == pytest.approx(2 * 2 * (w.tp_degree - 1) / w.tp_degree * volume)


def test_moe_and_hf_config():
    gpu, w = load_gpu("h100-sxm"), load_workload("W2")
    dense = roofline(load_model("llama-3-8b"), w, gpu)
    moe = roofline(load_model("mixtral-8x7b"), w, gpu)
    assert moe.num_bytes > dense.num_bytes         # 8 experts' weights are read
    hf = roofline(load_model(str(FIXTURES / "hf" / "Meta-Llama-3-8B" / "config.json")), w, gpu)
    assert hf.flops == dense.flops and hf.num_bytes == dense.num_bytes
    hf_moe = roofline(load_model(str(FIXTURES / "hf" / "Mixtral-8x7B-v0.1" / "config.json")), w, gpu)
    assert hf_moe.flops == moe.flops and hf_moe.num_bytes == moe.num_bytes
