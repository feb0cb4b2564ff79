"""The executor on CPU tensors with the torch impls: nano-batched plan order == sequential reference;
the seq-torch forward computes the same layer; seq-same takes the profile's fastest impls."""

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")

from nfsearch.roofline import analytic_profile
from nfsearch.errors import NfsearchError
from nfsearch.search.baselines import equal_split_plan, sequential_plan
from nfsearch.cost import make_problem
from nfsearch.runtime import executor, launch
from nfsearch.runtime.model import rel_error
from nfsearch.runtime.model import ModelInstance
from nfsearch.runreport import RunReport
from nfsearch.specs import ModelSpec, Workload, load_gpu

MODEL = ModelSpec("tiny", 256, 4, 2, 64, 512, 2, 1000)
# 6 decode requests at context 40, then prompts of 20 and 13 tokens
WORKLOAD = Workload("tiny", 6, 40, (20, 13))


def plan(batches, workload=WORKLOAD, model=MODEL):
    p = make_problem(model, workload, analytic_profile(model, workload, load_gpu("h100-sxm")), 2,
                     allow_extrapolation=True)
    return equal_split_plan(p, batches) if batches else sequential_plan(p)


@pytest.mark.parametrize("batches", [0, 2, 3])
def test_plan_matches_sequential_reference(batches):
    report = executor.execute(plan(batches), device="cpu")
    assert isinstance(report, RunReport)
    assert report.correctness.passed, report.correctness
    assert report.correctness.max_rel_error < 1e-2
    assert report.timeline is None and report.gpu == "cpu" and report.mode == "cpu" and report.plan is None
    assert RunReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_prompt_split_mid_prompt_is_exact_enough():
    # 3 nano-batches split both prompts inside (prefix recompute path)
    s = plan(3)
    starts = {o.tokens[0] for o in s.nano_ops if o.op == "prefill_attn"}
    assert starts - {6, 26}, "expected a nano-batch that starts inside a prompt"
    report = executor.execute(s, device="cpu")
    errs = [e for e in report.correctness.per_op if e.op == "prefill_attn"]
    assert errs and max(e.rel_error for e in errs) < 1e-2


def test_qkv_bias_and_decode_only_and_prefill_only():
    biased = ModelSpec("tinyb", 256, 4, 2, 64, 512, 2, 1000, has_qkv_bias=True)
    for model, workload in ((biased, WORKLOAD), (MODEL, Workload("dec", 8, 16)), (MODEL, Workload("pre", 0, 1, (9, 7)))):
        report = executor.execute(plan(2, workload, model), device="cpu")
        assert report.correctness.passed, (model.name, workload.name, report.correctness)


def test_divergence_names_the_first_wrong_op(monkeypatch):
    original = ModelInstance.op_ug
    calls = {"n": 0}

    def broken(self, buf, w, layer, a, b, impl, n):
        original(self, buf, w, layer, a, b, impl, n)
        calls["n"] += 1
        if calls["n"] == 2:                       # the plan's second ug nano-op of layer 0
            buf["ug"][a:b].mul_(1.5)

    monkeypatch.setattr(ModelInstance, "op_ug", broken)
    with pytest.raises(executor.ExecutionMismatch, match=r"first at L0\.ug \(ug\)"):
        executor.execute(plan(2), device="cpu")
    assert issubclass(executor.ExecutionMismatch, NfsearchError)


def test_activations_stay_order_one():
    m = ModelInstance(MODEL, WORKLOAD, 2, device="cpu")
    bufs = m.new_buffers()
    for l in range(2):
        for op in ("norm1", "kqv", "rope_append", "decode_attn", "prefill_attn", "o", "norm2", "ug", "act", "d"):
            rng = (0, 6) if op == "decode_attn" else (6, 39) if op == "prefill_attn" else (0, 39)
            m.run(bufs, l, op, *rng, "torch", 0)
    out = bufs[-1]["out"].float()
    assert torch.isfinite(out).all() and 0.3 < out.std().item() < 5


def _upcast(*tensors):
    """float32 copies: the torch impls run on them are the higher-precision reference."""
    return [t.float() if t is not None and t.is_floating_point() else t for t in tensors]


def _rel(got, want):
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_torch_decode_and_prefill_match_their_float32_runs():
    # the model's bf16 torch path (decode unmasked: every context is the cache length) against the
    # same impls on float32 copies (decode masked by the context lengths)
    from nfsearch.runtime.kernels import decode_attention_torch, prefill_attention_torch
    m = ModelInstance(MODEL, WORKLOAD, 1, device="cpu", seed=3)
    bufs = m.new_buffers()
    for op, rng in (("norm1", (0, 39)), ("kqv", (0, 39)), ("rope_append", (0, 39)), ("decode_attn", (0, 6)),
                    ("prefill_attn", (6, 39))):
        m.run(bufs, 0, op, *rng, "torch", 0)
    kc, vc = m.kv_cache[0]
    want = decode_attention_torch(*_upcast(bufs[0]["q"][:6], kc, vc), m.context_lens)
    assert want.dtype == torch.float32 and _rel(bufs[0]["attn"][:6], want) < 1e-2
    for cu in ([0, 20, 33], torch.tensor([0, 20, 33], dtype=torch.int32)):
        want = prefill_attention_torch(*_upcast(bufs[0]["q"][6:], bufs[0]["k"][6:], bufs[0]["v"][6:]), cu)
        assert _rel(bufs[0]["attn"][6:], want) < 1e-2
    # a masked decode ignores the cache past each context: other values there change nothing
    lens = torch.tensor([40, 1, 17, 40, 3, 28], dtype=torch.int32)
    q, k, v = _upcast(bufs[0]["q"][:6], kc, vc)
    want = decode_attention_torch(q, k, v, lens)
    past = torch.arange(40)[None, :] >= lens[:, None]
    k[past], v[past] = 50.0, -70.0
    assert torch.allclose(decode_attention_torch(q, k, v, lens), want, atol=1e-6)
    assert _rel(decode_attention_torch(q, k, v, None), want) > 0.5


def _rope_inputs(T=9, HQ=4, HKV=2, D=8, R=3, C=6):
    from nfsearch.runtime.kernels import rope_cos_sin
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(T, (HQ + 2 * HKV) * D, generator=gen).bfloat16()
    cos, sin = rope_cos_sin(C, D)
    kc, vc = torch.randn(R, C, HKV, D, generator=gen).bfloat16(), torch.randn(R, C, HKV, D, generator=gen).bfloat16()
    return qkv, cos, sin, kc, vc, (HQ, HKV, D)


@pytest.mark.parametrize("slots", [[-1, 2, -1, 0, -1, -1, 1, -1, -1],     # appends among tokens that do not
                                   [-1, 2, 0, -1, -1, -1, 1, -1, -1],     # one that does not after one that does
                                   [-1] * 9,                              # nothing appends
                                   [0, 1, 2, -1, -1, -1, -1, -1, -1]])    # decode rows first (the layout)
def test_torch_rope_append_writes_exactly_the_appending_tokens(slots):
    from nfsearch.runtime.kernels import rope_append_torch
    qkv, cos, sin, kc0, vc0, (HQ, HKV, D) = _rope_inputs()
    T = qkv.shape[0]
    # positions collide with the appending tokens' entries: a stray write there would show
    pos = torch.tensor([5, 5, 0, 0, 1, 4, 3, 5, 2], dtype=torch.int32)
    slot = torch.tensor(slots, dtype=torch.int32)
    q, k, v = torch.empty(T, HQ, D).bfloat16(), torch.empty(T, HKV, D).bfloat16(), torch.empty(T, HKV, D).bfloat16()
    kc, vc = kc0.clone(), vc0.clone()
    assert rope_append_torch(qkv, pos, cos, sin, q, kc, vc, slot, 0, k_out=k, v_out=v) is q
    # the rotation, written out head by head in float64
    x = qkv.double().view(T, HQ + 2 * HKV, D)
    c, s = cos.double()[pos.long()][:, None], sin.double()[pos.long()][:, None]
    rot = torch.cat([x[..., :D // 2] * c - x[..., D // 2:] * s, x[..., D // 2:] * c + x[..., :D // 2] * s], -1)
    assert _rel(q, rot[:, :HQ]) < 1e-2 and _rel(k, rot[:, HQ:HQ + HKV]) < 1e-2
    assert torch.equal(v, qkv.view(T, HQ + 2 * HKV, D)[:, HQ + HKV:])
    want_k, want_v = kc0.clone(), vc0.clone()
    for t in range(T):
        if slots[t] >= 0:
            want_k[slots[t], pos[t]] = k[t]
            want_v[slots[t], pos[t]] = v[t]
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    # no slot mapping: the caches are not touched, q/k/v are the same
    kc, vc = kc0.clone(), vc0.clone()
    q2, k2 = torch.empty_like(q), torch.empty_like(k)
    rope_append_torch(qkv, pos, cos, sin, q2, kc, vc, None, k_out=k2)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0) and torch.equal(q2, q) and torch.equal(k2, k)


def test_torch_impls_write_out_or_return_a_new_tensor():
    from nfsearch.runtime.kernels import IMPLS
    gen = torch.Generator().manual_seed(2)
    x, r = torch.randn(7, 16, generator=gen).bfloat16(), torch.randn(7, 16, generator=gen).bfloat16()
    wt, w = torch.rand(16, generator=gen).bfloat16() + 0.5, torch.randn(16, 10, generator=gen).bfloat16()
    norm, gemm, act = IMPLS["norm1"]["torch"], IMPLS["kqv"]["torch"], IMPLS["act"]["torch"]
    h, out = norm(x, wt), torch.empty(7, 16).bfloat16()
    assert norm(x, wt, out, 0) is out and torch.equal(out, h)
    assert torch.equal(h, torch.nn.functional.rms_norm(x, (16,), wt, 1e-5))
    # the residual add lands in residual_out (here aliasing the residual) and is what gets normed
    h = x + r
    assert torch.equal(norm(x, wt, out, 0, residual=r, residual_out=r), norm(h, wt)) and torch.equal(r, h)
    y = torch.empty(7, 10).bfloat16()
    assert gemm(x, w, y, 0) is y and torch.equal(y, x @ w) and torch.equal(gemm(x, w), y)
    bias = torch.randn(10, generator=gen).bfloat16()
    assert torch.equal(gemm(x, w, residual=bias), torch.addmm(bias, x, w))
    a = torch.empty(7, 8).bfloat16()
    assert act(x, a, 0) is a and torch.equal(a, torch.nn.functional.silu(x[:, :8]) * x[:, 8:])


@pytest.mark.parametrize("workload", [WORKLOAD, Workload("dec", 8, 16), Workload("pre", 0, 1, (9, 7))])
def test_seq_torch_forward_computes_the_reference_layer_stack(workload):
    from nfsearch.runtime import baselines
    biased = ModelSpec("tinyb", 256, 4, 2, 64, 512, 2, 1000, has_qkv_bias=True)
    for model in (MODEL, biased):
        s = plan(2, workload, model)
        ctx = executor.ExecContext("cpu")
        m = ModelInstance(model, workload, s.num_layers, device="cpu", seed=1)
        ll = launch.build(s)
        correctness, ref_out = executor.check(ctx, m, ll)
        assert correctness.passed
        out = baselines.torch_forward(m)(m.x0)
        assert out.shape == ref_out.shape
        assert rel_error(out, ref_out) < 1e-2, (model.name, workload.name)
        # a broken forward is caught: the same stack with one norm weight changed differs
        m.layers[-1].norm2.mul_(1.3)
        assert rel_error(baselines.torch_forward(m)(m.x0), ref_out) > 3e-2


def test_torch_rmsnorm_is_one_bf16_rms_norm():
    # the seq-torch norm is F.rms_norm in the tensor's dtype (WORKLOADS.md), not a float32 multi-pass
    m = ModelInstance(MODEL, WORKLOAD, 1, device="cpu")
    bufs = m.new_buffers()
    m.run(bufs, 0, "norm1", 0, 39, "torch", 0)
    want = torch.nn.functional.rms_norm(m.x0, (256,), m.layers[0].norm1, 1e-5)
    assert torch.equal(bufs[0]["h1"], want)


def test_seq_same_takes_the_profiles_fastest_impl_of_each_op_at_the_full_gpu():
    from nfsearch.cost import default_profile
    from nfsearch.graph import build_layer, domain_range, op_context
    from nfsearch.runtime import baselines
    from nfsearch.specs import load_model, load_workload
    model, workload = load_model("llama-3-8b"), load_workload("W2")
    table = default_profile(model, workload)
    assert not table.is_analytic
    p = make_problem(model, workload, table, 2)
    s = equal_split_plan(p, 2)
    impls, notes = baselines.fastest_impls(s, 132, table)
    layer = build_layer(model, workload)
    for name in layer.nodes:
        op = layer.nodes[name]["op"]
        lo, hi = domain_range(op, workload)
        times = {i: table.time_ms(name, hi - lo, 132, op_context(op, workload), impl=i)[0]
                 for i in table.impls(name)}
        assert impls[name] == min(times, key=times.get), (name, times)
    assert not notes
    # the bundled profile stands in when none is given (the same table: no note)
    assert baselines.fastest_impls(s, 132)[0] == impls
    seq = baselines.seq_same(s, 132, impls)
    assert {l.op: l.impl for l in seq.launches} == impls and all(l.partition.is_whole for l in seq.launches)


def test_the_whole_timed_path_on_the_cpu_gives_a_full_report(tmp_path):
    # host-clock timing of the same variants the GPU run times: plan, seq-torch, seq-same
    from nfsearch.runreport import format_table
    from nfsearch.specs import Ceilings
    s = plan(2)
    r = executor.execute(s, device="cpu", time_on_cpu=True, iters=2, repeats=3, with_compiled=False,
                         ceilings=Ceilings(700.0, 3.0))
    assert r.correctness.passed and r.plan is not None and r.plan.how == "cpu"
    assert len(r.plan.repeat_layer_ms) == 3 and r.plan.min_layer_ms <= r.plan.layer_ms <= r.plan.max_layer_ms
    assert [b.label for b in r.baselines] == ["seq-torch", "seq-same"], r.baseline_failures
    assert "WRONG" not in r.baseline("seq-torch").note and "rel error" in r.baseline("seq-torch").note
    assert r.speedup("seq-torch") == pytest.approx(r.baseline("seq-torch").layer_ms / r.measured_layer_ms)
    assert r.bound is not None and r.bound.bound_ms > 0 and 0 < r.pct_of_bound
    # an analytic profile names no runtime impl: seq-same keeps the plan's, and says so
    assert any("seq-same" in n for n in r.notes)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["derived"]["speedup_vs_seq_same"] == pytest.approx(r.speedup("seq-same"))
    assert RunReport.from_dict(d) == r
    # tune's trials keep the report as the run wrote it (its table reads it back), the record names them
    from nfsearch import tune
    result = tune.pick_best([tune.Trial("plan", s, r.measured_layer_ms, d)])
    assert "plan" in format_table([t.report for t in result.trials])
    record = json.loads(tune.write_result(result, tmp_path / "best.json", "test").read_text())
    assert record["candidates"][0]["candidate"] == "plan" and record["best"] == "plan"
    table = format_table([r, {"workload": "W9", "error": "boom"}])
    assert "tiny" in table and "FAILED: boom" in table


def test_run_report_refuses_what_is_not_one():
    from nfsearch.runreport import Timing
    with pytest.raises(NfsearchError, match="repeat times"):
        Timing("plan", (1.0, float("nan"), 1.0), 5, "cuda-graph")
    with pytest.raises(NfsearchError, match="how must be"):
        Timing("plan", (1.0,), 5, "fast")
    r = executor.execute(plan(2), device="cpu")
    d = r.to_dict()
    with pytest.raises(NfsearchError, match="unknown keys"):
        RunReport.from_dict({**d, "bogus": 1})
    with pytest.raises(NfsearchError, match="not a run report"):
        RunReport.from_dict({k: v for k, v in d.items() if k != "launches"})
    bad = {**d, "baselines": {"x": Timing("seq-fast", (1.0,), 1, "cpu").to_dict()}}
    with pytest.raises(NfsearchError, match="baselines must be"):
        RunReport.from_dict(bad)


def test_cublaslt_impl_is_the_torch_gemm_on_the_cpu_and_leaves_torch_settings_alone():
    """The SM-targeted cuBLASLt GEMM (kernels/gemm_cublaslt.py) is registered for the four GEMMs where
    torch has the carve-out; on CPU tensors it is the torch GEMM, and it never leaves torch's BLAS
    backend or carve-out changed."""
    from nfsearch.plan import RUNTIME_IMPLS
    from nfsearch.runtime.kernels import HAVE_SM_TARGET, IMPLS, gemm_cublaslt, gemm_torch
    assert "cublaslt" in RUNTIME_IMPLS
    assert HAVE_SM_TARGET == all("cublaslt" in IMPLS[op] for op in ("kqv", "o", "ug", "d"))
    assert not any("cublaslt" in IMPLS[op] for op in ("norm1", "decode_attn", "act"))
    a, w, r = torch.randn(5, 8), torch.randn(8, 3), torch.randn(5, 3)
    carveout = torch._C._get_sm_carveout_experimental() if HAVE_SM_TARGET else None
    assert torch.equal(gemm_cublaslt(a, w, None, 16, residual=r), gemm_torch(a, w, None, 16, residual=r))
    out = torch.empty(5, 3)
    assert gemm_cublaslt(a, w, out, 16) is out and torch.equal(out, a @ w)
    if HAVE_SM_TARGET:
        assert torch._C._get_sm_carveout_experimental() == carveout


def test_profile_measures_opt_in_impls_only_when_asked():
    from nfsearch.plan import OPT_IN_IMPLS
    from nfsearch.runtime.kernels import HAVE_SM_TARGET, IMPLS, profiled_impls
    assert "cublaslt" in OPT_IN_IMPLS
    default, asked = profiled_impls(), profiled_impls(("cublaslt",))
    assert set(default) == set(IMPLS) and not any(set(v) & OPT_IN_IMPLS for v in default.values())
    assert ("cublaslt" in asked["kqv"]) == HAVE_SM_TARGET and asked["norm1"] == default["norm1"]


def test_plans_are_timed_against_each_other_in_interleaved_rounds():
    # host-clock timing on the CPU walks the path the GPU takes: one model, each plan checked, rounds
    seq, split = plan(0), plan(2)
    with executor.ExecContext("cpu", "green") as ctx:
        timings, notes = executor.time_plans({"seq": seq, "split2": split}, ctx, iters=2, repeats=3)
    assert not notes and set(timings) == {"seq", "split2"}
    assert all(len(t.repeat_layer_ms) == 3 and t.how == "cpu" for t in timings.values())
    assert dict(timings["split2"].impls).keys() >= {"kqv", "decode_attn"}
    other = plan(2, Workload("dec", 8, 16))
    with executor.ExecContext("cpu", "green") as ctx, pytest.raises(NfsearchError, match="another model, workload"):
        executor.time_plans({"seq": seq, "other": other}, ctx, iters=1, repeats=1)


def test_a_plan_that_computes_something_else_is_left_out_of_the_interleaved_rounds(monkeypatch):
    seq, split = plan(0), plan(2)
    original = executor.check

    def wrong_for_split(ctx, model, ll, tol=executor.TOLERANCE):
        correctness, out = original(ctx, model, ll, tol)
        if len(ll.launches) > len(seq.nano_ops):          # the split plan has more launches
            correctness = dataclasses.replace(correctness, passed=False, first_divergence="L0.ug (u): 1")
        return correctness, out
    monkeypatch.setattr(executor, "check", wrong_for_split)
    with executor.ExecContext("cpu", "green") as ctx:
        timings, notes = executor.time_plans({"seq": seq, "split2": split}, ctx, iters=1, repeats=1)
    assert set(timings) == {"seq"} and notes == ["split2: left out, output differs from the reference at L0.ug (u): 1"]
