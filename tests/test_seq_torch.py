"""seq-torch (runtime.baselines.torch_forward) is the straightforward layer of docs/workloads.md: the
same output as the executor's torch reference, with runs of equal-length prompts batched into one
SDPA, only the decode rows appended to the KV cache, and RoPE without copies of q, k or v."""

import pytest

torch = pytest.importorskip("torch")

from nfsearch.cost import make_problem
from nfsearch.roofline import analytic_profile
from nfsearch.runtime import baselines, executor, launch
from nfsearch.runtime.kernels import torch_ops
from nfsearch.runtime.model import ModelInstance, rel_error
from nfsearch.search.baselines import sequential_plan
from nfsearch.specs import ModelSpec, Workload, load_gpu

MODEL = ModelSpec("tiny", 256, 4, 2, 64, 512, 2, 1000)


def _reference(model, workload, seed=1):
    s = sequential_plan(make_problem(model, workload, analytic_profile(model, workload, load_gpu("h100-sxm")), 2,
                                     allow_extrapolation=True))
    m = ModelInstance(model, workload, s.num_layers, device="cpu", seed=seed)
    with executor.ExecContext("cpu") as ctx:
        correctness, ref_out = executor.check(ctx, m, launch.build(s))
    assert correctness.passed
    return m, ref_out


def test_equal_length_runs_batch_consecutive_prompts():
    assert torch_ops.equal_length_runs([4, 12, 20, 28, 33, 38, 40]) == [(4, 3, 8), (28, 2, 5), (38, 1, 2)]
    assert torch_ops.equal_length_runs([0, 5, 5, 9]) == [(0, 1, 5), (5, 1, 4)]
    assert torch_ops.equal_length_runs([0]) == []


@pytest.mark.parametrize("workload", [Workload("eq", 4, 24, (8, 8, 8, 5)), Workload("pre", 0, 1, (16, 16)),
                                      Workload("dec", 8, 16)])
def test_seq_torch_equals_the_reference_and_appends_only_decode_rows(workload):
    m, ref_out = _reference(MODEL, workload)
    # the reference wrote the new tokens' K/V at [r, context - 1]; clear them, seq-torch writes them again
    caches = [(kc.clone(), vc.clone()) for kc, vc in m.kv_cache] if workload.num_decode else []
    for kc, vc in m.kv_cache:
        if kc is not None:
            kc[:, -1].zero_()
            vc[:, -1].zero_()
    out = baselines.torch_forward(m)(m.x0)
    assert rel_error(out, ref_out) < 1e-2
    for (kc, vc), (k_ref, v_ref) in zip(m.kv_cache, caches):
        assert rel_error(kc, k_ref) < 1e-2 and rel_error(vc, v_ref) < 1e-2
        assert torch.equal(kc[:, :-1], k_ref[:, :-1])        # nothing but the appended entries changed


def test_one_sdpa_per_run_of_equal_prompts(monkeypatch):
    m, ref_out = _reference(MODEL, Workload("eq", 4, 24, (8, 8, 8, 5)))
    calls = []
    original = torch_ops._sdpa
    monkeypatch.setattr(torch_ops, "_sdpa", lambda q, k, v, **kw: calls.append(q.shape) or original(q, k, v, **kw))
    out = baselines.torch_forward(m)(m.x0)
    assert rel_error(out, ref_out) < 1e-2
    assert calls == [(3, 4, 8, 64), (1, 4, 5, 64)] * m.num_layers


def test_rope_views_share_storage_and_match_the_op():
    gen = torch.Generator().manual_seed(0)
    T, hq, hkv, d = 5, 4, 2, 64
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=gen).bfloat16()
    cos, sin = torch_ops.rope_cos_sin(16, d)
    pos = torch.tensor([3, 0, 1, 2, 7], dtype=torch.int32)
    q, k, v = torch_ops.rope_qkv_torch(qkv, *torch_ops.rope_tables(cos, sin, pos, qkv.dtype), hq, d)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()      # one rotated tensor, no copies
    assert v.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()    # v is a view of qkv
    q_ref, k_ref, v_ref = torch.empty(T, hq, d).bfloat16(), torch.empty(T, hkv, d).bfloat16(), torch.empty(T, hkv, d).bfloat16()
    torch_ops.rope_append_torch(qkv, pos, cos, sin, q_ref, None, None, None, k_out=k_ref, v_out=v_ref)
    assert rel_error(q, q_ref) < 1e-2 and rel_error(k, k_ref) < 1e-2 and torch.equal(v, v_ref)
