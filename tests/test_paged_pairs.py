"""Issue 25 item 2, continued: the paged attention's pairs with the GEMMs priced in a family's engine
view, the fp8-KV impl ("paged_fp8kv") and its fallbacks, and decode page tables as wide as the engine
bucket's context cap. Tiny synthetic profiles whose numbers can be checked by hand."""

import math

import pandas as pd
import pytest
import torch

from nfsearch.cost import Partner, make_problem
from nfsearch.family import artifact, attention
from nfsearch.family import attention_plan as ap
from nfsearch.pairs import PairPoint, PairSide, pairs_meta
from nfsearch.profile import ProfileTable
from nfsearch.runtime import measurements as m
from nfsearch.runtime.kernels import IMPLS
from nfsearch.runtime.kernels import paged_adapters as pa
from nfsearch.runtime.kernels.paged_attention import DECODE_CONFIG, decode_splits
from nfsearch.runtime.kernels.paged_attention_torch import dequantize_fp8, quantize_fp8
from nfsearch.specs import Workload, load_model

TINY = "tests/fixtures/engine-tiny/two-buckets.family.json"
OPS_TIME_MS = {"norm1": 0.01, "kqv": 0.1, "rope_append": 0.01, "o": 0.05, "norm2": 0.01, "ug": 0.3, "act": 0.02,
               "d": 0.15}
# whole-op times of the attention impls (flat over the grid)
ATTN_MS = {"triton": {"decode_attn": 0.5, "prefill_attn": 0.4}, "paged": {"decode_attn": 0.3, "prefill_attn": 0.25},
           "paged_fp8kv": {"decode_attn": 0.2, "prefill_attn": 0.15}}
UG = PairSide("ug", "compute", 1024)
DECODE = PairSide("decode_attn", "memory", 300, 1300)


def _pair(impl: str, part_ms: float, together_ms: float) -> PairPoint:
    """ug 1024 tokens on 66 SMs beside decode attention (300 x 1300) on 66, both ending at together_ms:
    the stretches are together_ms / each side's partition time (ug's is 0.3)."""
    return PairPoint(UG, DECODE, "triton", impl, 66, 66, together_ms, together_ms, together_ms, 0.3, part_ms, 0.3,
                     part_ms)


def _profile(impls=("triton", "paged"), pairs=(("triton", 0.5, 0.6),), paged_pairs=(), fp8_decode_only=False):
    """Every op flat over tokens 16..4096, contexts 64..4096 and SM counts 66 and 132; a contiguous pair
    table and paged pair points (impl, partition ms, together ms)."""
    rows = [(op, "triton", t, 0, s, ms) for op, ms in OPS_TIME_MS.items() for t in (16, 4096) for s in (66, 132)]
    for impl in impls:
        for op, ms in ATTN_MS[impl].items():
            if impl == "paged_fp8kv" and fp8_decode_only and op != "decode_attn":
                continue
            rows += [(op, impl, t, c, s, ms) for t in (16, 4096) for c in (64, 4096) for s in (66, 132)]
    meta = {"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_key": "h100-sxm", "num_sms": 132, "sm_granularity": 66,
            "source": "measured", "memory_bytes": 80 * 2**30, "peak_tflops": 700.0, "mem_bandwidth_tbps": 3.0,
            "pairs": pairs_meta([_pair(*p) for p in pairs], "contiguous")}
    if paged_pairs:
        meta[attention.META_KEY] = {"runs": [], "energy_points": [],
                                    "pairs": pairs_meta([_pair(*p) for p in paged_pairs], "paged")}
    df = pd.DataFrame(rows, columns=["op", "impl", "num_tokens", "context", "sm_count", "time_ms"])
    return ProfileTable(df, meta)


BATCH = Workload.from_batch_shape((1300,) * 300, (1024,), model="llama-3-8b")


def _beside(view):
    """(decode attention beside ug, ug beside decode attention), ms, on 66 SMs each."""
    cost = make_problem(load_model("llama-3-8b"), BATCH, view).cost
    return (cost.beside_ms("decode_attn", 300, 66, (Partner("ug", 1024, 66),)),
            cost.beside_ms("ug", 1024, 66, (Partner("decode_attn", 300, 66),)))


# ------------------------------------------------------------------------------------------- (a) pairs
def test_the_engine_view_prices_the_overlap_stretch_from_paged_pair_points_when_present():
    # paged pair: both sides end at 0.36 ms on partitions of 0.3 ms: stretch 1.2 each
    view = attention.engine_view(_profile(paged_pairs=(("paged", 0.3, 0.36),)))
    decode, ug = _beside(view)
    assert decode == pytest.approx(0.3 * 1.2, abs=1e-9) and ug == pytest.approx(0.3 * 1.2, abs=1e-9)
    assert [r[1:2] + r[7:8] for r in view.meta["pairs"]["rows"]] == [["triton", "paged"]]   # swapped, not added
    note = attention.pricing(view)["note"]
    assert "overlap stretches of ug x decode_attn (paged) from the paged pair points" in note
    # without paged pairs the contiguous pair (0.6 ms over a 0.5 ms partition, stretch 1.2) is restated
    # over the paged solo time: 1.2 x 0.5 / 0.3 = 2.0, i.e. the contiguous kernel's 0.6 ms beside ug
    old = attention.engine_view(_profile())
    assert _beside(old) == (pytest.approx(0.6, abs=1e-9), pytest.approx(0.6, abs=1e-9))
    assert "overlap stretches from the contiguous pair table (no paged pair points)" in attention.pricing(old)["note"]
    # a family measured paged beside one GEMM only: the other families' stretches stay contiguous, named
    extra = _profile(pairs=(("triton", 0.5, 0.6),), paged_pairs=(("paged", 0.3, 0.36),))
    extra.meta["pairs"]["rows"].append(PairPoint(PairSide("kqv", "compute", 1024), DECODE, "triton", "triton", 66, 66,
                                                 0.6, 0.6, 0.6, 0.1, 0.5, 0.1, 0.5).to_row())
    assert "; of kqv x decode_attn from the contiguous pair table" in attention.pricing(
        attention.engine_view(extra))["note"]
    # a plain (contiguous) problem never sees the paged pairs: triton 0.5 x 1.2
    plain = make_problem(load_model("llama-3-8b"), BATCH, _profile(paged_pairs=(("paged", 0.3, 0.36),))).cost
    assert plain.beside_ms("decode_attn", 300, 66, (Partner("ug", 1024, 66),)) == pytest.approx(0.6, abs=1e-9)


def test_fp8_pairs_for_an_fp8_family_else_the_bf16_paged_pairs():
    both = (("paged", 0.3, 0.36), ("paged_fp8kv", 0.2, 0.33))
    fp8 = attention.engine_view(_profile(("triton", "paged", "paged_fp8kv"), paged_pairs=both), "fp8")
    assert _beside(fp8)[0] == pytest.approx(0.33, abs=1e-9)           # 0.2 x 1.65
    bf16 = attention.engine_view(_profile(("triton", "paged", "paged_fp8kv"), paged_pairs=both), "auto")
    assert _beside(bf16)[0] == pytest.approx(0.36, abs=1e-9)
    # no fp8 pairs: the bf16 paged pair (1.2 over 0.3 ms), restated over the fp8 solo 0.2 ms: 1.8
    fallback = attention.engine_view(_profile(("triton", "paged", "paged_fp8kv"), paged_pairs=both[:1]), "fp8")
    assert _beside(fallback)[0] == pytest.approx(0.36, abs=1e-9)
    assert "ug x decode_attn (paged)" in attention.pricing(fallback)["note"]


# ------------------------------------------------------------------------------------------- (b) fp8 rows
def test_an_fp8_family_takes_the_fp8_rows_then_the_bf16_paged_rows_then_the_contiguous():
    full = _profile(("triton", "paged", "paged_fp8kv"))
    for kv, want in (("fp8", "paged_fp8kv"), ("auto", "paged")):
        view = attention.engine_view(full, kv)
        assert view.impls("decode_attn") == [want] and view.impls("prefill_attn") == [want]
        assert view.time_ms("decode_attn", 300, 132, 1300) == (ATTN_MS[want]["decode_attn"], want)
    mixed = attention.engine_view(_profile(("triton", "paged", "paged_fp8kv"), fp8_decode_only=True), "fp8")
    assert mixed.impls("decode_attn") == ["paged_fp8kv"] and mixed.impls("prefill_attn") == ["paged"]
    note = attention.pricing(mixed)
    assert note["impl"] == "paged" and "fp8 KV cache, but no paged_fp8kv rows of prefill_attn: the bf16 paged" \
        in note["note"]
    bf16_only = attention.engine_view(_profile(("triton", "paged")), "fp8")
    assert bf16_only.impls("decode_attn") == ["paged"]
    assert "no paged_fp8kv rows of decode_attn, prefill_attn" in attention.pricing(bf16_only)["note"]
    contiguous = _profile(("triton",))
    assert attention.engine_view(contiguous, "fp8") is contiguous
    note = attention.pricing(contiguous, "fp8")
    assert note["impl"] == "contiguous" and "decode_attn triton" in note["note"] and "fp8" in note["note"]
    # a bf16 family never prices with fp8 rows, even where they are the only paged ones
    only_fp8 = attention.engine_view(_profile(("triton", "paged_fp8kv")), "auto")
    assert only_fp8.impls("decode_attn") == ["triton"] and attention.pricing(only_fp8)["impl"] == "contiguous"


def test_the_fp8_impl_quantizes_the_cache_as_the_engine_writes_it():
    g = torch.Generator().manual_seed(5)
    pool_k, pool_v = torch.randn(8, 37, 2, 16, generator=g), torch.randn(8, 37, 2, 16, generator=g)
    k, v, q = pool_k[1:6], pool_v[1:6], torch.randn(5, 4, 16, generator=g)
    lens = torch.tensor([37, 1, 20, 16, 5], dtype=torch.int32)
    got = IMPLS["decode_attn"]["paged_fp8kv"](q, k, v, lens, torch.full_like(q, math.nan), 4)
    (kq, ks), (vq, vs) = quantize_fp8(k), quantize_fp8(v)
    want = IMPLS["decode_attn"]["torch"](q, dequantize_fp8(kq, ks), dequantize_fp8(vq, vs), lens, None, 4)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, IMPLS["decode_attn"]["torch"](
        q, k, v, lens, None, 4), atol=1e-5)                  # the fp8 rounding shows
    kv, first = pa.decode_kv(k, v, "fp8")
    assert kv.k.dtype == torch.float8_e4m3fn and kv.k_scales.shape == (kv.k.shape[0], 16, 2) and first == 1
    qk, _ = _prefill(g)
    cu, prefixes = [0, 10, 25], [3, 30]
    out = IMPLS["prefill_attn"]["paged_fp8kv"](*qk, cu, None, 4, prefix_lens=prefixes)
    fp8 = pa.prefill_kv(qk[1], qk[2], cu, prefixes, "fp8")
    assert fp8.k.dtype == torch.float8_e4m3fn and set(fp8.scale_kwargs) == {"k_scales", "v_scales"}
    bf = IMPLS["prefill_attn"]["paged"](*qk, cu, None, 4, prefix_lens=prefixes)
    assert (out - bf).abs().max() < 0.1 and not torch.equal(out, bf)


def _prefill(g):
    return (torch.randn(25, 4, 16, generator=g), torch.randn(25, 2, 16, generator=g),
            torch.randn(25, 2, 16, generator=g)), None


# ------------------------------------------------------------------------------------------- (c) page tables
def test_decode_page_tables_are_as_wide_as_the_buckets_context_cap_and_so_is_the_split_count():
    g = torch.Generator().manual_seed(6)
    k, v = torch.randn(16, 384, 2, 16, generator=g), torch.randn(16, 384, 2, 16, generator=g)
    assert pa.decode_kv(k, v)[0].page_tables.shape == (16, 24)                 # 384 / 16
    wide = pa.decode_kv(k, v, None, 1536)[0]
    assert wide.page_tables.shape == (16, 96) and int(wide.page_tables[:, 24:].abs().sum()) == 0
    assert pa.table_pages(1273, 1536) == 96 and pa.table_pages(1273) == 80 and pa.table_pages(40, 20) == 3
    q = torch.randn(16, 4, 16, generator=g)
    narrow_out = IMPLS["decode_attn"]["paged"](q, k, v, None, None, 4)
    assert torch.allclose(IMPLS["decode_attn"]["paged"](q, k, v, None, None, 4, max_context=1536), narrow_out)
    # 16 requests x 8 kv heads on 132 x 3 programs: 13 splits wanted; 384 tokens have 6 blocks of 64, the
    # engine's 1536-token tables 24: 6 splits of 64 against 12 of 128
    assert decode_splits(16, 8, 384, 396, DECODE_CONFIG) == (6, 64)
    assert decode_splits(16, 8, 1536, 396, DECODE_CONFIG) == (12, 128)


def test_the_family_plan_carries_the_caps_to_the_profilers_inputs():
    from nfsearch.runtime.profiler import _Inputs
    fam = artifact.read(TINY)
    assert ap.decode_caps(fam) == {14: 16, 12: 16}
    model = fam.buckets[0].plan.model
    caps = {14: 64, 12: 48}                   # wider than the tiny buckets' 16, to see them
    plan = ap.family_plan(model, [b.plan.workload for b in fam.buckets], 132, 66, caps=caps)
    assert plan.decode_max_context == caps and plan.grid["decode_max_context"] == {"12": 48, "14": 64}
    plan.rotate_bytes = 1.0
    inputs = _Inputs(torch, plan, plan.ops["decode_attn"], IMPLS, device="cpu")
    before = set(pa._CACHE)
    fn, _ = inputs.fn("paged", 7, 14, 132)
    key = next(k for k in set(pa._CACHE) - before if k[-1][0] == "decode")
    assert key[-1] == ("decode", None, 4)        # 64 tokens: 4 pages wide
    assert fn(0).shape == (7, 4, 16)
    plain = m.make_plan(model, Workload("w", 4, 12, (8,)), 132, 66, ops=("decode_attn",), sm_counts=(132,),
                        with_pairs=False)
    assert plain.identity({}) != m.Plan(**{**plain.__dict__, "decode_max_context": {12: 16}}).identity({})


# ------------------------------------------------------------------------------------------- the pair plan
def test_the_pair_plan_covers_each_buckets_shapes_on_the_attention_splits_within_the_budget():
    fam = artifact.read(TINY)
    model = fam.buckets[0].plan.model
    families = ap.pair_families(fam, model)
    # the 10-hit bucket first: 4 GEMMs x its decode and prefill (GEMMs at 16 and 31 of its 31 tokens), and
    # decode x prefill; then the 7-hit bucket's 4 GEMMs (at 4 and 7) x its decode
    assert len(families) == 4 * 2 * 2 + 1 + 4 * 2 and families[0].bucket == "32/32/8/16"
    assert ap.gemm_levels(31) == [16, 31] and ap.gemm_levels(894) == [384, 894] and ap.gemm_levels(279) == [128, 279]
    assert (families[16].a.op, families[16].b.op) == ("decode_attn", "prefill_attn")
    assert ap.attention_splits(132, 8) == [16, 32, 48, 64] and ap.attention_splits(132, 66) == [66]
    points = ap.pair_points(families[:1] + families[16:17], 132, 8)
    assert [(p.op, p.sm_count, p.partner_op, p.partner_sms) for p in points[:2]] == \
        [("kqv", 116, "decode_attn", 16), ("kqv", 100, "decode_attn", 32)]
    assert [(p.sm_count, p.partner_sms) for p in points[4:6]] == [(16, 116), (32, 100)]   # decode beside prefill
    gemms = ap.gemm_impls(fam)
    assert gemms == {op: ("torch", "triton") for op in ("d", "kqv", "o", "ug")}     # analytic plans name none
    assert ap.gemm_impls(fam, {"kqv": ["tma"]})["kqv"] == ("tma",)
    build = lambda pairs: ap.family_plan(model, [b.plan.workload for b in fam.buckets], 132, 8, pairs=pairs,
                                         gemms=gemms)
    full, left_out = ap.fit_pairs(build, families, 1e9)
    assert left_out == [] and len(full.pair_points()) == len(families) * 4
    top_only = ap.pairs_wall_s(build(families[:17]))
    plan, left_out = ap.fit_pairs(build, families, top_only + 1e-6)
    assert left_out == ["16/16/8/16"] and len(plan.pair_points()) == 17 * 4
    assert ap.fit_pairs(build, families, 0.0)[1] == ["32/32/8/16", "16/16/8/16"]
    est = ap.wall_estimate(full, 3)
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"), abs=0.2)
    assert est["energy"] == 3 * ap.ENERGY_S and est["pairs"] > 0 and ap.wall_estimate(build([]))["pairs"] == 0


def test_merge_keeps_bf16_and_fp8_runs_apart_and_replaces_a_rerun():
    model = load_model("llama-3-8b")
    base = _profile(("triton",))
    merged = base
    for impl in ("paged", "paged_fp8kv", "paged"):
        plan = ap.family_plan(model, [BATCH], 132, 66, impl=impl, pairs=[ap.PairFamily(UG, DECODE, "b", 1)],
                              gemms={"ug": ("triton",)})
        results = m.run_plan(plan, None, m.fake_measure(plan)).results
        table = m.assemble_table(plan, results, {"gpu_name": "NVIDIA H100 80GB HBM3", "source": "measured"})
        merged = attention.merge_paged(merged, table, {"impl": impl})
    pairs = attention.paged_pair_points(merged)
    assert sorted(p.impl_b for p in pairs) == ["paged", "paged_fp8kv"]        # one split each, the rerun replaced
    solo = merged.rows[merged.rows["impl"].isin(["paged", "paged_fp8kv"])]
    num_solo = sum(p.kind == "solo" for p in plan.points)
    assert len(solo) == 2 * num_solo and len(merged.meta[attention.META_KEY]["runs"]) == 3
    view = attention.engine_view(merged, "fp8")
    assert view.impls("decode_attn") == ["paged_fp8kv"]
    assert [r[7] for r in view.meta["pairs"]["rows"]] == ["paged_fp8kv"]


def test_solve_family_with_an_fp8_cache_prices_attention_with_the_fp8_rows(tmp_path):
    from click.testing import CliRunner

    from nfsearch.cli import main
    prof, out = tmp_path / "p.csv", tmp_path / "f.family.json"
    _profile(("triton", "paged", "paged_fp8kv"), paged_pairs=(("paged_fp8kv", 0.2, 0.33),)).write(prof)
    res = CliRunner().invoke(main, ["solve", "--family", "--trace", "const:40:8", "--model", "llama-3-8b",
                                    "--dense-batch", "64", "--num-requests", "16", "--time-limit", "1",
                                    "--kv-cache-dtype", "fp8", "--profile", str(prof), "-o", str(out)])
    assert res.exit_code == 0, res.output
    fam = artifact.read(out)
    assert fam.memory["kv_cache_dtype"] == "fp8" and fam.profile["attention"]["impl"] == "paged"
    assert "decode_attn paged_fp8kv, prefill_attn paged_fp8kv" in fam.profile["attention"]["note"]
    assert "ug x decode_attn (paged_fp8kv) from the paged pair points" in fam.profile["attention"]["note"]
    top = max(fam.buckets, key=lambda b: b.num_iterations)
    assert {a["impl"] for a in top.prediction.attention_ms.values()} == {"paged_fp8kv"}
