"""The profile measures what the engine runs (issue 25 item 2): the "paged" impl of decode_attn and
prefill_attn (kernels/paged_adapters.py), its rows of a plan family's bucket shapes
(family.attention, `profile --family`), and a family priced with them where a profile has them."""

import dataclasses
import math
from itertools import pairwise

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from nfsearch.cli import main
from nfsearch.cost import make_problem
from nfsearch.energy import EnergyPoint, ProfileEnergy
from nfsearch.family import attention
from nfsearch.family.predict import attention_ms, predict_bucket
from nfsearch.profile import ProfileTable
from nfsearch.runtime import measurements as m
from nfsearch.runtime.kernels import IMPLS
from nfsearch.runtime.kernels import paged_adapters as pa
from nfsearch.runtime.kernels.paged_attention_torch import gather_kv
from nfsearch.serving.batch import Bucket
from nfsearch.specs import Workload, load_model

H, HKV, D = 4, 2, 16


def _decode_inputs(num_pool=10, rows=(2, 8), context=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool_k = torch.randn(num_pool, context, HKV, D, generator=g)
    pool_v = torch.randn(num_pool, context, HKV, D, generator=g)
    a, b = rows
    q = torch.randn(b - a, H, D, generator=g)
    return q, pool_k, pool_v, pool_k[a:b], pool_v[a:b]


def test_paged_decode_holds_the_contiguous_kv_and_gives_the_contiguous_torch_output():
    q, _, _, k, v = _decode_inputs()
    lens = torch.tensor([37, 1, 20, 37, 5, 16], dtype=torch.int32)
    got = IMPLS["decode_attn"]["paged"](q, k, v, lens, torch.full_like(q, math.nan), 4)
    want = IMPLS["decode_attn"]["torch"](q, k, v, lens, torch.empty_like(q), 4)
    assert torch.allclose(got, want, atol=1e-5)
    kv, first = pa.decode_kv(k, v)
    assert first == 2 and kv.page_tables.shape == (10, 3)       # the pool's one copy: 10 requests x 3 pages
    pages = kv.page_tables.flatten().tolist()
    assert sorted(pages) == list(range(30)) and pages != list(range(30))      # every page once, shuffled
    for r in range(6):                                          # the paged cache holds exactly the K/V
        assert torch.equal(gather_kv(kv.k, kv.page_tables[first + r], 37), k[r])
    whole = IMPLS["decode_attn"]["paged"](q, k, v, None, None, 0)        # None: every request's whole cache
    assert torch.allclose(whole, IMPLS["decode_attn"]["torch"](q, k, v, None), atol=1e-5)


def test_the_copy_is_made_once_again_after_a_write_and_dropped_with_its_pool():
    q, pool_k, pool_v, k, v = _decode_inputs(seed=1)
    before = len(pa._CACHE)
    first = pa.decode_kv(k, v)[0]
    assert pa.decode_kv(pool_k[0:3], pool_v[0:3])[0] is first      # other rows of the pool: the same copy
    assert len(pa._CACHE) == before + 1
    k.mul_(2.0)                                                     # written in place: copied again
    again = pa.decode_kv(k, v)[0]
    assert again is not first and torch.equal(gather_kv(again.k, again.page_tables[2], 37), k[0])
    got = IMPLS["decode_attn"]["paged"](q, k, v, None, None, 0)
    assert torch.allclose(got, IMPLS["decode_attn"]["torch"](q, k, v, None), atol=1e-5)
    del q, pool_k, pool_v, k, v, got
    assert len(pa._CACHE) == before


def _prefill_inputs(seed=2, total=30):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(total, H, D, generator=g), torch.randn(total, HKV, D, generator=g),
            torch.randn(total, HKV, D, generator=g))


def test_paged_prefill_without_a_prefix_is_the_contiguous_torch_impl():
    q, k, v = _prefill_inputs()
    cu = [0, 10, 25, 30]
    got = IMPLS["prefill_attn"]["paged"](q, k, v, cu, torch.full_like(q, math.nan), 4)
    want = IMPLS["prefill_attn"]["torch"](q, k, v, cu, torch.empty_like(q), 4)
    assert torch.allclose(got, want, atol=1e-5)


def test_paged_prefill_attends_over_each_chunks_cached_prefix():
    q, k, v = _prefill_inputs(seed=3)
    cu, prefixes = [0, 10, 25, 30], [3, 0, 17]
    got = IMPLS["prefill_attn"]["paged"](q, k, v, torch.tensor(cu), None, 4, prefix_lens=prefixes)
    kv = pa.prefill_kv(k, v, torch.tensor(cu), prefixes)
    assert kv.chunk_lens.tolist() == [10, 15, 5] and kv.prefix_lens.tolist() == prefixes
    for s, (a, b) in enumerate(pairwise(cu)):
        p = prefixes[s]
        keys = gather_kv(kv.k, kv.page_tables[s], p + b - a)          # the prefix, then the chunk's own K/V
        vals = gather_kv(kv.v, kv.page_tables[s], p + b - a)
        assert torch.equal(keys[p:], k[a:b]) and torch.equal(vals[p:], v[a:b])
        for i in range(b - a):                                     # row i sees keys 0..p+i, by hand
            kk, vv = keys[:p + i + 1].repeat_interleave(H // HKV, 1), vals[:p + i + 1].repeat_interleave(H // HKV, 1)
            w = torch.softmax(torch.einsum("hd,nhd->hn", q[a + i], kk) * D ** -0.5, dim=-1)
            assert torch.allclose(got[a + i], torch.einsum("hn,nhd->hd", w, vv), atol=1e-5)


@pytest.mark.parametrize("tokens,context", [(100, 300), (101, 300), (600, 256), (512, 512), (16, 2000)])
def test_a_paged_prefill_row_is_a_chunk_over_a_prefix_with_the_rows_pairs(tokens, context):
    lens, prefixes = pa.prefill_chunks(tokens, context)
    assert sum(lens) == tokens
    wl = Workload.from_batch_shape((), lens, prefixes)
    if context >= tokens:
        assert lens == [tokens] and prefixes == [(context - tokens) // 2]
        # the cost model's context of that chunk is the row's (exactly when context - tokens is even)
        assert wl.prefill_context == context - (context - tokens) % 2
    else:
        assert lens[0] == context and set(prefixes) == {0}


def test_the_profiler_builds_the_paged_rows_inputs_and_copies_them_before_timing():
    from nfsearch.runtime.profiler import _Inputs
    model = load_model("llama-3-8b")
    plan = m.make_plan(model, Workload("w", 4, 64, (32,)), 132, 4, ops=("decode_attn", "prefill_attn"),
                       impls={"decode_attn": ("torch", "paged"), "prefill_attn": ("torch", "paged")}, sm_counts=(132,),
                       with_pairs=False)
    plan.points = [m.Point("solo", "decode_attn", i, 4, 64, 132) for i in ("torch", "paged")] + \
        [m.Point("solo", "prefill_attn", i, t, 32, 132) for i in ("torch", "paged") for t in (32, 96)]
    plan.rotate_bytes = 1.0
    before = len(pa._CACHE)
    dec = _Inputs(torch, plan, plan.ops["decode_attn"], IMPLS, device="cpu")
    fn, _ = dec.fn("paged", 4, 64, 132)
    assert len(pa._CACHE) == before + 1                              # copied before any call
    out = fn(0).float()
    ref, _ = dec.fn("torch", 4, 64, 132)
    assert torch.allclose(out, ref(0).float(), atol=2e-2)
    pre = _Inputs(torch, plan, plan.ops["prefill_attn"], IMPLS, device="cpu")
    paged, _ = pre.fn("paged", 96, 32, 132)                           # 96 > 32: three whole prompts, as torch's
    contiguous, _ = pre.fn("torch", 96, 32, 132)
    assert torch.allclose(paged(0).float(), contiguous(0).float(), atol=2e-2)
    pre.fn("paged", 32, 32, 132)                                     # a chunk of 32 over a prefix of 0
    pre.fn("paged", 16, 32, 132)                                     # a chunk of 16 over a prefix of 8
    keys = [k for k in pa._CACHE if k[-1][0] == "prefill"]
    assert {k[-1][2] for k in keys} >= {(8,), (0,)}


# ---------------------------------------------------------------------------------------------- pricing
OPS_TIME_MS = {"norm1": 0.01, "kqv": 0.1, "rope_append": 0.01, "o": 0.05, "norm2": 0.01, "ug": 0.3, "act": 0.02,
               "d": 0.15}
ATTN_MS = {("decode_attn", "triton"): 0.5, ("decode_attn", "paged"): 0.3, ("prefill_attn", "triton"): 0.4,
           ("prefill_attn", "paged"): 0.25}


def _synthetic(with_paged: bool, energy: bool = False, dense_ms_per_token: float = 0.0) -> ProfileTable:
    """Every op at one flat time over tokens 16..4096, contexts 64..4096 and SM counts 66 and 132 (so
    any lookup inside gives that time exactly); dense_ms_per_token: the dense ops at that much per token
    instead (linear, so a lookup between gives it exactly too)."""
    rows = []
    for op, ms in OPS_TIME_MS.items():
        rows += [(op, "triton", t, 0, s, dense_ms_per_token * t or ms) for t in (16, 4096) for s in (66, 132)]
    for (op, impl), ms in ATTN_MS.items():
        if impl == "paged" and not with_paged:
            continue
        rows += [(op, impl, t, c, s, ms) for t in (16, 4096) for c in (64, 4096) for s in (66, 132)]
    meta = {"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_key": "h100-sxm", "num_sms": 132, "sm_granularity": 66,
            "source": "measured", "memory_bytes": 80 * 2**30, "peak_tflops": 700.0, "mem_bandwidth_tbps": 3.0}
    if energy:
        pts = [EnergyPoint(op, "triton", 1024, c, 0.01, 0.05, 200.0) for op, c in
               (("decode_attn", 1024), ("prefill_attn", 512))]
        meta["energy"] = ProfileEnergy(700.0, 100.0, tuple(pts)).to_dict()
        if with_paged:
            meta[attention.META_KEY] = {"runs": [], "energy_points": [
                EnergyPoint("decode_attn", "paged", 300, 1300, 0.02, 0.06, 330.0).to_dict()]}
    df = pd.DataFrame(rows, columns=["op", "impl", "num_tokens", "context", "sm_count", "time_ms"])
    return ProfileTable(df, meta)


BATCH = Workload.from_batch_shape((1000,) * 200 + (1500,) * 69, (300, 325), (355, 355), model="llama-3-8b")


def test_plain_lookups_never_choose_paged_and_the_engine_view_only_does():
    plain = _synthetic(True)
    assert plain.impls("decode_attn") == ["triton"]
    assert plain.time_ms("decode_attn", 300, 132, 1300) == (0.5, "triton")
    assert plain.time_ms("decode_attn", 300, 132, 1300, impl="paged") == (0.3, "paged")
    view = attention.engine_view(plain)
    assert view.is_engine_view and view.fingerprint() == plain.fingerprint()
    assert view.impls("decode_attn") == ["paged"] and view.impls("prefill_attn") == ["paged"]
    assert view.time_ms("prefill_attn", 625, 66, 1023) == (0.25, "paged")
    assert attention.engine_view(_synthetic(False)) is not None
    assert not attention.engine_view(_synthetic(False)).is_engine_view
    assert attention.pricing(view)["impl"] == "paged"
    note = attention.pricing(_synthetic(False))
    assert note["impl"] == "contiguous" and "contiguous kernels" in note["note"] and "decode_attn triton" in note["note"]


def test_the_family_prices_attention_from_paged_rows_when_present_else_from_the_old_impls():
    model = load_model("llama-3-8b")
    paged = make_problem(model, BATCH, attention.engine_view(_synthetic(True)))
    old = make_problem(model, BATCH, attention.engine_view(_synthetic(False)))
    assert attention_ms(paged) == {"decode_attn": {"ms": 0.3, "impl": "paged"},
                                   "prefill_attn": {"ms": 0.25, "impl": "paged"}}
    assert attention_ms(old) == {"decode_attn": {"ms": 0.5, "impl": "triton"},
                                 "prefill_attn": {"ms": 0.4, "impl": "triton"}}
    plain = make_problem(model, BATCH, _synthetic(True))          # a contiguous plan's problem: never paged
    assert attention_ms(plain) == attention_ms(old)
    from nfsearch.search.baselines import sequential_plan
    exact = Bucket(BATCH.num_tokens, 269, 2, 1536)                  # no empty rows
    p_new = predict_bucket(paged, sequential_plan(paged), exact)
    p_old = predict_bucket(old, sequential_plan(old), exact)
    # the sequential layer runs each op whole, one after another: only the two attention ops differ
    assert p_old.sequential_layer_ms - p_new.sequential_layer_ms == pytest.approx(0.2 + 0.15, abs=1e-9)
    assert p_new.attention_ms["decode_attn"]["impl"] == "paged"


def test_a_bucket_prices_its_empty_rows_in_every_op_but_attention():
    """The engine's graph runs the dense ops over all of the bucket's rows and the LM head over its
    logit rows: 8 dense ops at 1e-3 ms per token, 894 tokens in a bucket of 1024 rows."""
    from nfsearch.family.predict import lm_head_ms, padding_cost
    from nfsearch.search.baselines import sequential_plan
    problem = make_problem(load_model("llama-3-8b"), BATCH, _synthetic(True, dense_ms_per_token=1e-3))
    assert BATCH.num_tokens == 894
    assert padding_cost(problem, 1024) == (pytest.approx(8 * 130 * 1e-3), 0.0)
    assert padding_cost(problem, 894) == padding_cost(problem, 500) == (0.0, 0.0)
    plan = sequential_plan(problem)
    exact = predict_bucket(problem, plan, Bucket(894, 269, 2, 1536))
    padded = predict_bucket(problem, plan, Bucket(1024, 304, 8, 1536))
    assert padded.sequential_layer_ms - exact.sequential_layer_ms == pytest.approx(0.13 * 8)
    assert padded.padding_ms == pytest.approx(1.04) and exact.padding_ms == 0.0
    assert padded.lm_head_ms == lm_head_ms(problem, 312) > exact.lm_head_ms == lm_head_ms(problem, 271)
    # energy points for attention only: no power bound, so the padding has a time and no energy
    partial = make_problem(load_model("llama-3-8b"), BATCH, _synthetic(True, energy=True, dense_ms_per_token=1e-3))
    assert partial.cost.power_bound() is None
    assert padding_cost(partial, 1024) == (pytest.approx(1.04), 0.0)
    assert predict_bucket(partial, plan, Bucket(1024, 304, 8, 1536)).energy_j is None


def test_the_engine_view_takes_the_paged_energy_points_of_its_paged_ops():
    view = attention.engine_view(_synthetic(True, energy=True))
    by_op = {p.op: p for p in view.energy.points}
    assert by_op["decode_attn"].impl == "paged" and by_op["decode_attn"].num_tokens == 300
    assert by_op["prefill_attn"].impl == "triton"                     # no paged energy point of it: kept
    assert {p.impl for p in _synthetic(True, energy=True).energy.points} == {"triton"}


# ------------------------------------------------------------------------------------- the family's grid
def test_the_family_plan_measures_each_buckets_attention_and_merges_into_the_base():
    model = load_model("llama-3-8b")
    small = Workload.from_batch_shape((384,) * 56, model="llama-3-8b")
    plan = attention.family_plan(model, [BATCH, small, BATCH], 132, 66)
    wanted = {("decode_attn", 269, BATCH.decode_context), ("prefill_attn", 625, BATCH.prefill_context),
              ("decode_attn", 56, 384)}
    assert {(s.op, s.num_tokens, s.context) for s in attention.bucket_shapes([BATCH, small])} == wanted
    assert BATCH.prefill_context == 1023
    grid = attention.family_grid(attention.bucket_shapes([BATCH, small]))
    assert grid[("prefill_attn", 1023)] == [157, 313, 625] and grid[("decode_attn", 384)] == [14, 28, 56]
    assert len(plan.points) == 3 * 3 * 2 and {p.impl for p in plan.points} == {"paged"}
    assert {p.sm_count for p in plan.points} == {66, 132}
    results = m.run_plan(plan, None, m.fake_measure(plan)).results
    table = m.assemble_table(plan, results, {"gpu_name": "NVIDIA H100 80GB HBM3", "source": "measured"})
    base = _synthetic(False, energy=True)
    point = EnergyPoint("decode_attn", "paged", 269, BATCH.decode_context, 0.02, 0.06, 330.0)
    merged = attention.merge_paged(base, table, {"family": "f"}, [point])
    assert len(merged.rows) == len(base.rows) + 18 and merged.energy == base.energy
    view = attention.engine_view(merged)
    ms, impl = view.time_ms("decode_attn", 269, 132, BATCH.decode_context)
    assert impl == "paged" and ms == results[m.Point("solo", "decode_attn", "paged", 269, BATCH.decode_context,
                                                     132).key()].time_ms
    again = attention.merge_paged(merged, table, {"family": "g"}, [])   # the same contexts: replaced, not doubled
    assert len(again.rows) == len(merged.rows) and len(again.meta[attention.META_KEY]["runs"]) == 2
    assert again.meta[attention.META_KEY]["energy_points"] == [point.to_dict()]
    requests, notes = attention.energy_requests(attention.bucket_shapes([BATCH]), table, 132)
    assert [(r.op, r.impl, r.num_tokens) for r in requests] == [("decode_attn", "paged", 269),
                                                                 ("prefill_attn", "paged", 625)] and not notes


def test_the_family_plan_times_each_gemm_at_the_buckets_rows_and_the_merge_prices_them():
    """A made-up 448-row GEMM twice as slow as the flat 0.3 ms of the base around it: the merged profile
    has it on both SM counts, so a bucket of 448 rows pays it for its empty rows."""
    from nfsearch.family.predict import padding_cost
    model = load_model("llama-3-8b")
    gemms = {"ug": ("triton",)}                              # the base's impl of it (gemm_impls)
    plan = attention.family_plan(model, [BATCH], 132, 66, gemms=gemms, gemm_rows=(448, 896, 448))
    solo = [p for p in plan.points if p.op in gemms]
    assert sorted((p.op, p.num_tokens, p.sm_count) for p in solo) == sorted(
        ("ug", t, sms) for t in (448, 896) for sms in (66, 132))
    assert plan.grid["gemm_rows"] == [448, 896]
    fake = m.fake_measure(plan)
    results = m.run_plan(plan, None, lambda p: dataclasses.replace(fake(p), time_ms=0.6) if p.op == "ug" and
                         p.num_tokens == 448 else fake(p)).results
    table = m.assemble_table(plan, results, {"gpu_name": "NVIDIA H100 80GB HBM3", "source": "measured",
                                             "num_sms": 132, "sm_granularity": 66})
    merged = attention.merge_paged(_synthetic(False), table, {"family": "f", "grid": plan.grid})
    assert merged.time_ms("ug", 448, 132)[0] == merged.time_ms("ug", 448, 66)[0] == pytest.approx(0.6)
    r = table.rows
    partial = ProfileTable(r[~((r["op"] == "ug") & (r["num_tokens"] == 448) & (r["sm_count"] == 66))], table.meta)
    kept = attention.merge_paged(_synthetic(False), partial, {"family": "f", "grid": plan.grid})
    assert 448 not in set(kept.rows.loc[kept.rows["op"] == "ug", "num_tokens"])   # not on every SM count
    assert merged.time_ms("ug", 896, 132)[0] < merged.time_ms("ug", 500, 132)[0] < 0.6   # between its rows
    batch = Workload.from_batch_shape((1000,) * 279, model="llama-3-8b")
    assert padding_cost(make_problem(model, batch, attention.engine_view(_synthetic(False))), 448)[0] == 0.0
    priced = padding_cost(make_problem(model, batch, attention.engine_view(merged)), 448)[0]
    assert priced == pytest.approx(0.6 - merged.time_ms("ug", 279, 132)[0]) and priced > 0.1   # only ug moved


def test_a_bucket_plan_names_the_impl_fastest_at_the_buckets_rows():
    """ug: triton a flat 0.3 ms, torch 0.5 ms at 16 tokens falling to 0.2 at 448: the search picks triton
    for the 279-token batch (torch ~0.317 there); the 448-row bucket's graph runs torch."""
    from nfsearch.family.build import whole_ops_at_rows
    from nfsearch.search.baselines import sequential_plan
    base = _synthetic(False)
    extra = pd.DataFrame([("ug", "torch", t, 0, sms, ms) for t, ms in ((16, 0.5), (448, 0.2), (4096, 0.2))
                          for sms in (66, 132)], columns=list(base.rows.columns[:6]))
    profile = ProfileTable(pd.concat([base.rows, extra.assign(co_class="")], ignore_index=True), base.meta)
    batch = Workload.from_batch_shape((1000,) * 279, model="llama-3-8b")
    problem = make_problem(load_model("llama-3-8b"), batch, profile)
    plan = sequential_plan(problem)
    assert {o.impl for o in plan.nano_ops if o.op == "ug"} == {"triton"}
    at_rows = whole_ops_at_rows(plan, problem, 448)
    assert {o.impl for o in at_rows.nano_ops if o.op == "ug"} == {"torch"}
    assert [(o.id, o.impl) for o in at_rows.nano_ops if o.op != "ug"] == \
        [(o.id, o.impl) for o in plan.nano_ops if o.op != "ug"]
    assert whole_ops_at_rows(plan, problem, 279) is plan           # no empty rows: as the search chose


def test_the_family_report_says_how_attention_was_priced(tmp_path):
    from nfsearch.family import artifact, report
    fam = artifact.read("tests/fixtures/engine-tiny/two-buckets.family.json")
    assert "attention" not in fam.profile
    assert report.CONTIGUOUS_NOTE in report.table(fam)
    priced = dataclasses.replace(fam, profile={**fam.profile, "attention": attention.pricing(_synthetic(False))})
    path = tmp_path / "f.family.json"
    artifact.write(priced, path)                     # the schema takes the record
    assert any("contiguous kernels" in line for line in report.table(artifact.read(path)))


def test_cli_profile_family_flags(tmp_path):
    runner = CliRunner()
    fam = "tests/fixtures/engine-tiny/two-buckets.family.json"
    out = str(tmp_path / "p.csv")
    res = runner.invoke(main, ["profile", "--family", fam, "--workload", "W1", "-o", out])
    assert res.exit_code == 2 and "drop --workload" in res.output
    res = runner.invoke(main, ["profile", "--base", "x.parquet", "-o", out])
    assert res.exit_code == 2 and "--base goes with --family" in res.output
    res = runner.invoke(main, ["profile", "--pair-budget", "10", "-o", out])
    assert res.exit_code == 2 and "--pair-budget goes with --family" in res.output
    res = runner.invoke(main, ["profile", "--family", fam, "--opt-in-impls", "fp8", "-o", out])
    assert res.exit_code == 2 and "drop" in res.output
    res = runner.invoke(main, ["profile", "--family", fam, "--model", "llama-3-8b", "-o", out])
    assert res.exit_code == 2 and "not llama-3-8b" in res.output
    if not torch.cuda.is_available():
        res = runner.invoke(main, ["profile", "--family", fam, "-o", out])
        assert res.exit_code == 2 and "profile --family" in res.output


# -------------------------------------------------------------------------- profile --family, solve --family
class _FakeParts:
    num_sms, granularity = 132, 66

    def __init__(self, *args, **kw):
        pass

    def close(self):
        pass


def test_profile_family_writes_the_base_with_the_paged_rows(tmp_path, monkeypatch):
    """`profile --family` end to end with the GPU replaced by made-up timings (measurements.fake_measure)."""
    import nfsearch.runtime.device as device_mod
    from nfsearch.runtime import partitions, power, profiler
    base = tmp_path / "base.csv"
    _synthetic(False, energy=True).write(base)
    meta = {"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_key": "h100-sxm", "num_sms": 132, "sm_granularity": 66,
            "source": "measured", "l2_bytes": 50 << 20, "versions": {}, "code_version": "x"}

    class FakeMeasurer:
        def __init__(self, torch_mod, parts, plan, impls, log):
            self.measure = m.fake_measure(plan)

        def __call__(self, point):
            return self.measure(point)

        def is_healthy(self):
            return True

    monkeypatch.setattr(device_mod, "require_cuda", lambda what: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(partitions, "SmPartitions", _FakeParts)
    monkeypatch.setattr(profiler, "device_meta", lambda *a: dict(meta))
    monkeypatch.setattr(profiler, "_Measurer", FakeMeasurer)
    monkeypatch.setattr(power, "open_device", lambda i: (None, "no NVML here"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = tmp_path / "paged.csv"
    fam = "tests/fixtures/engine-tiny/two-buckets.family.json"
    res = CliRunner().invoke(main, ["profile", "--family", fam, "--base", str(base), "--quick", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "paged attention" in res.output and "base base.csv" in res.output
    from nfsearch.profile import load
    merged = load(out)
    rows = merged.rows[merged.rows["impl"] == "paged"]
    assert set(rows["op"]) <= {"decode_attn", "prefill_attn"} and set(rows["sm_count"]) == {132}
    run = merged.meta[attention.META_KEY]["runs"][-1]
    assert run["family"]["file"] == "two-buckets.family.json" and run["energy_notes"] == ["no energy: no NVML here"]
    # the GEMMs at the buckets' 16 and 32 rows on the base's 66 and 132 SMs (--quick or not): 16 rows,
    # 8 of them replacing the base's at 16
    assert run["grid"]["gemm_rows"] == [16, 32]
    for sms in (66, 132):
        gemm = merged.rows[merged.rows["op"].isin(attention.GEMM_OPS) & (merged.rows["sm_count"] == sms)]
        assert sorted(gemm["num_tokens"]) == [16] * 4 + [32] * 4 + [4096] * 4
    assert run["base"] == "base.csv" and len(merged.rows) == len(load(base).rows) + len(rows) + 8
    assert not m.checkpoint_path(out).exists()
    # the pairs: 17 families of the 10-hit bucket, 8 of the other, on the one split of a 66-SM grid
    assert run["pair_points"] == 25 and len(attention.paged_pair_points(merged)) == 25
    assert run["impl"] == "paged" and run["grid"]["estimate_s"]["pairs"] > 0 and "~" in res.output
    assert merged.meta.get("pairs") == load(base).meta.get("pairs")      # the base's own pair table untouched
    res = CliRunner().invoke(main, ["profile", "--family", fam, "--base", str(base), "--quick", "--no-pairs",
                                    "-o", str(out)])
    assert res.exit_code == 0 and load(out).meta[attention.META_KEY]["runs"][-1]["pair_points"] == 0


def test_solve_family_prices_with_the_paged_rows_and_simulate_rejudges_without_them(tmp_path):
    paged, contiguous, out = tmp_path / "paged.csv", tmp_path / "contiguous.csv", tmp_path / "f.family.json"
    _synthetic(True).write(paged)
    _synthetic(False).write(contiguous)
    runner = CliRunner()
    res = runner.invoke(main, ["solve", "--family", "--trace", "const:40:8", "--model", "llama-3-8b", "--dense-batch",
                               "64", "--num-requests", "16", "--time-limit", "1", "--profile", str(paged), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "attention priced with the engine's paged kernels" in res.output
    from nfsearch.family import artifact
    fam = artifact.read(out)
    assert fam.profile["attention"]["impl"] == "paged"
    top = max(fam.buckets, key=lambda b: b.num_iterations)
    assert {a["impl"] for a in top.prediction.attention_ms.values()} == {"paged"}
    assert all(o.impl == "paged" for o in top.plan.nano_ops if o.op in attention.ATTENTION_OPS)
    res = runner.invoke(main, ["simulate", str(out), "--profile", str(contiguous)])
    assert res.exit_code == 0, res.output
    assert "attention priced with the contiguous kernels (decode_attn triton, prefill_attn triton)" in res.output


def test_compare_lines_put_each_buckets_paged_attention_beside_the_contiguous():
    from nfsearch.family import artifact
    fam = artifact.read("tests/fixtures/engine-tiny/two-buckets.family.json")
    lines = attention.compare_lines(fam, _synthetic(True, energy=True))
    assert lines[-1].startswith("attention priced with the engine's paged kernels")    # the pricing note
    decode = [line for line in lines[1:-2] if " decode_attn " in line]
    prefill = [line for line in lines[1:-2] if " prefill_attn " in line]
    assert len(decode) == 2 and len(prefill) == 1
    # both scale alike outside the synthetic grid: the ratio stays the rows' (0.5 / 0.3, 0.4 / 0.25)
    assert all(" triton  1.67 " in line for line in decode) and " triton  1.60 " in prefill[0]
    assert "0.0200" in "".join(decode) or "0.0198" in "".join(decode)         # the paged energy point, scaled
    assert "no paged attention rows" in attention.compare_lines(fam, _synthetic(False))[0]
