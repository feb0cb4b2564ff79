"""The pair table: its measurement plan (families x splits), the report (best split vs back to back),
its storage in the profile metadata and `nfsearch analyze --pairs` (CPU only).

Timings are FAKE (hand-written below, or profiling.fake_measure's jittered roofline); none is a GPU number.
"""

import json
from collections import Counter

import pytest
from click.testing import CliRunner

from nfsearch import pairs
from nfsearch.cli import main
from nfsearch.errors import NfsearchError
from nfsearch.pairs import PairPoint, PairSide, make_report
from nfsearch.profile import load
from nfsearch.runtime import measurements as profiling
from nfsearch.runtime.measurements import Checkpoint, make_plan, pair_splits, run_plan
from nfsearch.specs import load_model, load_workload

LLAMA = load_model("llama-3-8b")
W2 = load_workload("W2")
FAKE_DEVICE = {"gpu_name": "Fake GPU", "num_sms": 132, "sm_granularity": 8, "source": "fake",
               "code_version": "test"}
GEMMS = ("kqv", "o", "ug", "d")


def _family(p):
    return (p.op, p.num_tokens, p.context, p.partner_op, p.partner_tokens, p.partner_context)


# ------------------------------------------------------------------------------------ the plan
def test_splits_on_a_132_sm_granularity_8_device():
    splits = pair_splits(132, 8)
    smaller = [8, 16, 24, 32, 40, 48, 56, 64]
    assert splits == [x for m in smaller for x in ((m, 132 - m), (132 - m, m))]
    assert len(splits) == 16 and all(a + b == 132 for a, b in splits)
    assert pair_splits(128, 8)[-1] == (64, 64) and len(pair_splits(128, 8)) == 15   # equal halves once
    assert pair_splits(132, 8, (16, 48)) == [(16, 116), (116, 16), (48, 84), (84, 48)]


def test_plan_has_every_pair_family_at_every_split():
    plan = make_plan(LLAMA, W2, 132, 8)
    points = plan.pair_points()
    by_family: dict[tuple, set] = {}
    for p in points:
        by_family.setdefault(_family(p), set()).add((p.sm_count, p.partner_sms))
    splits = set(pair_splits(132, 8))
    assert all(s == splits for s in by_family.values())
    assert len(points) == 1632 == 102 * 16 and len({p.key() for p in points}) == 1632
    # the fixed sizes, W1-W3's own decode and prefill batches (W3: 256 requests at context 2048, 15
    # prompts of 256), and GEMMs from 256 tokens (measurements.pair_sizes)
    decodes, prefills = ((256, 1024), (512, 1024), (256, 2048)), ((1536, 512), (3840, 256))
    expected = set()
    for g in GEMMS:
        for t in (256, 512, 2048):
            expected |= {(g, t, 0, "decode_attn", r, c) for r, c in decodes}
            expected |= {(g, t, 0, "prefill_attn", pt, pc) for pt, pc in prefills}
            expected |= {(g, t, 0, small, t, 0) for small in ("norm1", "rope_append", "act")}
    expected |= {("decode_attn", r, c, "prefill_attn", pt, pc) for r, c in decodes for pt, pc in prefills}
    assert set(by_family) == expected
    kinds = Counter((p.op if p.op == "decode_attn" else "gemm", p.partner_op) for p in points)
    assert kinds == {("gemm", "decode_attn"): 36 * 16, ("gemm", "prefill_attn"): 24 * 16,
                     ("gemm", "norm1"): 12 * 16, ("gemm", "rope_append"): 12 * 16, ("gemm", "act"): 12 * 16,
                     ("decode_attn", "prefill_attn"): 6 * 16}
    # the partner's class rides along as co_class; impl is chosen when measured
    assert {(p.partner_op, p.co_class) for p in points} == {
        ("decode_attn", "memory"), ("prefill_attn", "compute"), ("norm1", "other"), ("rope_append", "other"),
        ("act", "other")}
    assert {p.impl for p in points} == {""}
    assert len(plan.grid["pair_families"]) == 102 and len(plan.grid["pair_splits"]) == 16
    # the inputs the profiler builds cover both sides of every pair
    assert (1536, 512) in plan.sizes("prefill_attn") and (256, 1024) in plan.sizes("decode_attn")


def test_norm2_is_measured_once_as_norm1_unless_alone():
    plan = make_plan(LLAMA, W2, 132, 8, is_quick=True, ops=("ug", "norm2"))
    assert {p.partner_op for p in plan.pair_points()} == {"norm2"}
    plan = make_plan(LLAMA, W2, 132, 8, is_quick=True, ops=("ug", "norm1", "norm2"))
    assert {p.partner_op for p in plan.pair_points()} == {"norm1"}


def test_quick_and_no_pairs_plans():
    quick = make_plan(LLAMA, W2, 132, 8, is_quick=True)
    fams = {_family(p) for p in quick.pair_points()}
    # 4 GEMMs x (256, 2048) tokens x (W2's decode, its prefill, 3 small partners) + decode x prefill
    assert len(fams) == 8 + 8 + 24 + 1 and len(quick.pair_points()) == 41 * 4
    assert make_plan(LLAMA, W2, 132, 8, with_pairs=False).pair_points() == []
    full = make_plan(LLAMA, W2, 132, 8)
    assert full.identity(FAKE_DEVICE) != make_plan(LLAMA, W2, 132, 8, with_pairs=False).identity(FAKE_DEVICE)
    tiny = make_plan(LLAMA, W2, 132, 8, is_quick=True, ops=("kqv", "decode_attn"), pair_minority_sms=(32,))
    assert [(p.op, p.num_tokens, p.sm_count, p.partner_op, p.partner_sms) for p in tiny.pair_points()] == [
        ("kqv", 256, 32, "decode_attn", 100), ("kqv", 256, 100, "decode_attn", 32),
        ("kqv", 2048, 32, "decode_attn", 100), ("kqv", 2048, 100, "decode_attn", 32)]


def test_pair_impls_follow_the_registry():
    impls = {op: ("triton", "torch", "new") for op in ("kqv", "decode_attn", "rope_append")}
    plan = make_plan(LLAMA, W2, 132, 8, is_quick=True, impls=impls)
    assert plan.pair_impls("kqv") == ("triton", "torch", "new")
    assert plan.pair_impls("rope_append") == ("triton", "new")            # the host-syncing reference is left out
    assert {p.partner_op for p in plan.pair_points()} == {"decode_attn", "rope_append"}
    assert {p.impl for p in plan.points if p.kind == "solo" and p.op == "kqv"} == {"triton", "torch", "new"}


# ------------------------------------------------------------------------------------ the report
def _point(a, b, sms_a, makespan, full_a, full_b, part_a=None, part_b=None, is_b_network=False):
    side_a = PairSide(a, "compute", 2048)
    side_b = PairSide(b, "network" if is_b_network else "memory", 512, 0 if is_b_network else 1024)
    return PairPoint(side_a, side_b, "tma", "triton", sms_a, 132 - sms_a, makespan * 0.9, makespan, makespan,
                     part_a or makespan / 2, part_b or makespan * 0.8, full_a, full_b, 1980.0, None)


HAND = [
    # ug x decode: back to back 0.5 + 0.45 = 0.95; best split 124+8 at 0.8 -> ratio 0.8/0.95, pays
    _point("ug", "decode_attn", 8, 1.0, 0.5, 0.45),
    _point("ug", "decode_attn", 124, 0.8, 0.5, 0.45, part_a=0.55, part_b=0.64),
    _point("ug", "decode_attn", 16, 0.9, 0.5, 0.45),
    # kqv x decode: back to back 1.0, best 0.97: 3% faster, does not pay
    _point("kqv", "decode_attn", 100, 0.97, 0.4, 0.6),
    _point("kqv", "decode_attn", 32, 1.2, 0.4, 0.6),
    # o x decode: back to back 1.05, best 1.0: exactly 5% faster, pays
    _point("o", "decode_attn", 84, 1.0, 0.45, 0.6),
    # a collective beside a GEMM: reported only with is_network
    _point("d", "allreduce_d", 116, 0.5, 0.4, 0.2, is_b_network=True),
]


def test_report_best_split_and_ratio_by_hand():
    report = make_report(HAND, gpu_name="Fake GPU")
    by_op = {f.a.op: f for f in report.families}
    assert set(by_op) == {"ug", "kqv", "o"}
    ug = by_op["ug"]
    assert (ug.best.sms_a, ug.best.sms_b) == (124, 8) and ug.num_splits == 3
    assert ug.back_to_back_ms == pytest.approx(0.95)
    assert ug.ratio == pytest.approx(0.8 / 0.95) and ug.speedup == pytest.approx(0.95 / 0.8)
    assert ug.is_paying and ug.stretch == pytest.approx(0.8 / 0.64)
    kqv = by_op["kqv"]
    assert (kqv.best.sms_a, kqv.ratio) == (100, pytest.approx(0.97)) and not kqv.is_paying
    assert by_op["o"].is_paying                                   # 1.05 / 1.0: the threshold itself
    assert report.num_paying == 2 and report.fraction_paying == pytest.approx(2 / 3)
    d = report.to_dict()
    assert d["num_families"] == 3 and d["fraction_paying"] == pytest.approx(0.6667, abs=1e-4)
    assert {f["family"]: f["pays"] for f in d["families"]} == {
        "ug 2048 tok x decode_attn 512 req ctx 1024": True, "kqv 2048 tok x decode_attn 512 req ctx 1024": False,
        "o 2048 tok x decode_attn 512 req ctx 1024": True}
    json.dumps(d)
    net = make_report(HAND, is_network=True)
    assert [f.name for f in net.families] == ["d 2048 tok x allreduce_d 512 tok"]
    assert net.families[0].ratio == pytest.approx(0.5 / 0.6) and net.fraction_paying == 1.0
    text = pairs.format_report(report)
    assert "124+8" in text and "2 of 3 families (67%)" in text


def test_points_validate_and_round_trip_through_meta():
    meta = {"pairs": pairs.pairs_meta(HAND, "by hand", 2, ["x: boom"])}
    back = pairs.points_from_meta(json.loads(json.dumps(meta)))
    assert [p.to_row() for p in back] == [p.to_row() for p in HAND]     # times kept to 6 decimals
    assert back[1].makespan_ms == 0.8 and back[1].sms_a == 124 and back[0].nvml_sm_clock_mhz is None
    assert pairs.points_from_meta({}) == []
    with pytest.raises(ValueError):
        _point("ug", "decode_attn", 8, float("nan"), 0.5, 0.45)
    with pytest.raises(ValueError):
        _point("ug", "decode_attn", 8, 1.0, -0.5, 0.45)
    bad = json.loads(json.dumps(meta))
    bad["pairs"]["rows"][0][14] = "fast"
    with pytest.raises(NfsearchError, match="malformed pair table"):
        pairs.points_from_meta(bad)
    bad = json.loads(json.dumps(meta))
    bad["pairs"]["columns"] = bad["pairs"]["columns"][:-1]
    with pytest.raises(NfsearchError, match="malformed pair table"):
        pairs.points_from_meta(bad)


# ------------------------------------------------------------------------------------ measured tables
def _fake_table(tmp_path, suffix=".csv"):
    plan = make_plan(LLAMA, W2, 132, 8, is_quick=True)
    run = run_plan(plan, None, profiling.fake_measure(plan))
    table = profiling.assemble_table(plan, run.results, FAKE_DEVICE, run.failures)
    path = tmp_path / f"fake{suffix}"
    table.write(path)
    return plan, table, path


def test_table_carries_the_pairs(tmp_path):
    plan, table, path = _fake_table(tmp_path, ".parquet")
    back = load(path)
    points = pairs.points_from_meta(back.meta)
    assert len(points) == len(plan.pair_points()) == 41 * 4
    assert back.fingerprint() == table.fingerprint()
    assert {p.b.op_class for p in points} == {"memory", "compute", "other"}
    assert all(p.makespan_ms >= max(p.part_a_ms, p.part_b_ms) for p in points)
    assert back.meta["pairs"]["failures"] == 0 and "launched together" in back.meta["pairs"]["method"]
    # the cost model's rows are untouched: solo and co-run rows only
    assert set(back.rows.co_class) == {"", "memory", "compute"}


def test_pair_points_resume_from_the_checkpoint(tmp_path):
    plan = make_plan(LLAMA, W2, 132, 8, is_quick=True, ops=("kqv", "decode_attn"))
    fake = profiling.fake_measure(plan)
    path = tmp_path / "r.partial.csv"
    ident = plan.identity(FAKE_DEVICE)
    first = run_plan(plan, Checkpoint(path, ident), fake)
    seen = []
    second = run_plan(plan, Checkpoint(path, ident), lambda p: seen.append(p) or fake(p))
    assert seen == [] and second.results == first.results
    assert all(second.results[p.key()].pair is not None for p in plan.pair_points())


# ------------------------------------------------------------------------------------ the CLI
def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_prints_the_pair_table(tmp_path):
    _, _, path = _fake_table(tmp_path)
    out = tmp_path / "pairs.json"
    result = _run("analyze", "--pairs", path, "--json", out)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("pairs on Fake GPU")
    assert lines[1].split()[:2] == ["family", "best"]
    assert sum(" x " in line for line in lines[3:]) == 41
    assert "ug 2048 tok x decode_attn 512 req ctx 1024" in result.output
    assert "families (" in result.output
    data = json.loads(out.read_text())
    assert data["num_families"] == 41 and data["profile"] == str(path) and "launched together" in data["method"]
    # no collectives in this table
    result = _run("analyze", "--pairs", path, "--tp", 2)
    assert result.exit_code == 2 and "no collective x GEMM rows" in result.output


@pytest.mark.parametrize("args, match", [
    (("--json", "x.json"), "--json goes with --pairs"),
    (("--pairs", "PATH", "--workload", "W2"), "--workload"),
    (("--pairs", "PATH", "--json", "x.txt"), "must end with .json"),
    (("--pairs", "nope.csv"), "no such profile"),
])
def test_cli_pair_errors(tmp_path, args, match):
    _, _, path = _fake_table(tmp_path)
    result = _run("analyze", *[str(path) if a == "PATH" else a for a in args])
    assert result.exit_code == 2 and match in result.output, result.output
    assert "Traceback" not in result.output


def test_cli_profile_without_pairs_table(tmp_path):
    """A table without pair rows (analytic, or --no-pairs) says so in one line."""
    path = tmp_path / "a.csv"
    assert _run("profile", "--analytic", "--model", "llama-3-8b", "--workload", "W2", "-o", path).exit_code == 0
    result = _run("analyze", "--pairs", path)
    assert result.exit_code == 2 and "no pair rows" in result.output


def test_no_torch_import():
    import subprocess
    import sys
    code = "import sys, nfsearch.pairs; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(NfsearchError):
        pairs.analyze_pairs(None, "x.json")
