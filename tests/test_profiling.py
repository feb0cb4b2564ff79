"""The profile's measurement plan, checkpoint/resume, table assembly and summary (CPU only).

Every timing here is FAKE (profiling.fake_measure: a jittered roofline, meta source "fake"); none
of it is a GPU number.
"""

import json
import subprocess
import sys

import pytest

from nfsearch.cost import make_problem
from nfsearch.errors import NfsearchError
from nfsearch.graph import op_context
from nfsearch.profile import ProfileTable, gpu_from_profile, load
from nfsearch.runtime import measurements as profiling
from nfsearch.runtime.measurements import Checkpoint, Measurement, Point, make_plan, run_plan
from nfsearch.specs import Ceilings, ModelSpec, Workload, load_model, load_workload

LLAMA = load_model("llama-3-8b")
TINY_MODEL = ModelSpec("tiny", hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=512,
                       num_layers=4, vocab_size=1000)
W2 = load_workload("W2")
FAKE_DEVICE = {"gpu_name": "Fake GPU", "num_sms": 132, "sm_granularity": 8, "source": "fake",
               "code_version": "test"}


def _plan(**kw):
    kw.setdefault("is_quick", False)
    return make_plan(LLAMA, kw.pop("workload", W2), 132, 8, **kw)


def _table(plan, seed=0):
    results, failures = run_plan(plan, None, profiling.fake_measure(plan, seed))
    return profiling.assemble_table(plan, results, FAKE_DEVICE, failures), results


# ------------------------------------------------------------------------------------ the grid
def test_full_grid_covers_w1_to_w3():
    plan = _plan()
    g = plan.grid
    assert g["sm_counts"] == list(range(8, 129, 8)) + [132]
    assert g["tokens"] == [128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    assert g["decode_requests"] == [64, 128, 256, 384, 512]
    assert g["decode_contexts"] == [1024, 2048]
    assert g["prompt_lengths"] == [256, 512]
    assert g["prefill_tokens"][0] == 128 and g["prefill_tokens"][-1] == 3840
    assert set(g["ops"]) == {"norm1", "kqv", "rope_append", "decode_attn", "prefill_attn", "o", "norm2", "ug",
                             "act", "d"}
    # the same plan whichever standard workload asked for it: one table per model
    ids = {make_plan(LLAMA, load_workload(w), 132, 8).identity(FAKE_DEVICE) for w in ("W1", "W2", "W3")}
    assert len(ids) == 1
    # rope_append's torch impl (many small ops against one fused kernel) is left out
    assert not any(p.op == "rope_append" and p.impl == "torch" for p in plan.points)
    assert len({p.key() for p in plan.points}) == len(plan.points)


def test_grid_grows_with_the_workload():
    big = Workload("big", num_decode=700, decode_context=3000, prefill_lengths=(1000, 5000))
    g = _plan(workload=big).grid
    assert 6784 in g["tokens"]                      # 6700 tokens, rounded up to a multiple of 128
    assert 700 in g["decode_requests"] and 3000 in g["decode_contexts"]
    # the prompt length the cost model looks up: prompts of 1000 and 5000 have the pairs of 6000 tokens
    # in prompts of 4334 (graph.op_context), not of their mean 3000
    assert 6016 in g["prefill_tokens"] and 4334 in g["prompt_lengths"]


def test_quick_grid_is_a_small_subset():
    quick, full = _plan(is_quick=True), _plan()
    assert len(quick.points) < len(full.points) / 10
    assert quick.grid["sm_counts"] == [16, 64, 132]
    assert quick.identity(FAKE_DEVICE) != full.identity(FAKE_DEVICE)
    assert {p.kind for p in quick.points} == {"ceiling", "solo", "corun", "pair"}


# the runtime's impl names today (nfsearch/runtime/kernels IMPLS; this test stays torch-free)
RUNTIME_IMPLS = {op: ("triton", "torch", extra) for op, extra in (
    ("norm1", "cuda"), ("kqv", "tma"), ("rope_append", "cuda"), ("decode_attn", "tma"), ("prefill_attn", "flash"),
    ("o", "tma"), ("norm2", "cuda"), ("ug", "tma"), ("act", "cuda"), ("d", "tma"))}


def test_full_plan_fits_the_time_budget():
    plan = _plan()
    assert plan.estimate_s() < 300          # GPU work; the rest is launch overhead and compiles
    assert len(plan.points) < 6000
    # with the three impls per op the runtime registers, pairs included: the default profile's GPU
    # work stays within ~3 minutes (the 6-minute target leaves the rest for compiles and the host)
    runtime = _plan(impls=RUNTIME_IMPLS)
    pairs = runtime.pair_points()
    # 102 families (4 GEMMs x 3 sizes x (3 decode + 2 prefill + 3 small partners) + 3 decode x 2 prefill)
    # at 16 splits: W1-W3's own decode and prefill batches and 256-token GEMMs (measurements.pair_sizes)
    assert len(pairs) == 102 * 16
    pair_s = sum(profiling.point_weight(runtime, p) for p in pairs) + profiling.pair_solo_estimate_s(runtime)
    assert 10 < pair_s < 90
    assert runtime.estimate_s() < 200
    assert len(runtime.points) < 8500
    assert _plan(impls=RUNTIME_IMPLS, with_pairs=False).estimate_s() < runtime.estimate_s() - pair_s + 1e-6


def test_rectangular_groups():
    """The table interpolates on tokens x SMs per (op, impl, co_class, context): every group is full."""
    plan = _plan()
    groups = {}
    for p in plan.points:
        if p.kind in ("solo", "corun"):
            groups.setdefault((p.op, p.impl, p.co_class, p.context), set()).add((p.num_tokens, p.sm_count))
    for key, pts in groups.items():
        toks, sms = {t for t, _ in pts}, {s for _, s in pts}
        assert len(pts) == len(toks) * len(sms), key


def test_corun_points_pair_one_split():
    plan = _plan()
    co = [p for p in plan.points if p.kind == "corun"]
    assert co
    for p in co:
        assert p.sm_count + p.partner_sms == 132
        if p.op == "decode_attn":
            assert p.co_class == "compute" and p.sm_count % 8 == 0
        else:
            assert p.op in ("kqv", "o", "ug", "d", "prefill_attn") and p.co_class == "memory"
            assert p.partner_sms % 8 == 0
    assert {p.partner_sms for p in co if p.op == "ug"} == set(profiling.CORUN_MEMORY_SMS)


def test_restricted_plan_and_errors():
    plan = _plan(is_quick=True, ops=("kqv", "decode_attn"))
    assert {p.op for p in plan.points if p.kind != "ceiling"} == {"kqv", "decode_attn"}
    assert "ug" in plan.ops and plan.sizes("ug") == [(1024, 0)]     # the GEMM background of co-runs
    with pytest.raises(NfsearchError, match="unknown op"):
        _plan(ops=("nope",))
    with pytest.raises(NfsearchError, match="partition sizes"):
        _plan(sm_counts=(12,))
    assert _plan(sm_counts=(16, 132)).grid["sm_counts"] == [16, 132]


def test_rotation_sets_keep_data_out_of_l2():
    plan = _plan()
    assert profiling.rotation_sets(plan, "ug", 4096, 0) == 1           # 235 MB of weights
    assert profiling.rotation_sets(plan, "o", 128, 0) >= 4             # 34 MB: rotate
    assert profiling.rotation_sets(plan, "decode_attn", 64, 1024) == 1  # 268 MB of KV
    assert profiling.rotation_sets(plan, "norm1", 128, 0) > 10


def test_sizes_include_backgrounds():
    plan = _plan()
    assert (512, 1024) in plan.sizes("decode_attn")
    assert (1024, 0) in plan.sizes("d") and (2048, 0) in plan.sizes("ug")


# ------------------------------------------------------------------------------------ checkpoint
class Killed(BaseException):
    """Stands in for the process being killed mid-run."""


def _killing(measure, after):
    count = {"n": 0}

    def m(p):
        if count["n"] >= after:
            raise Killed()
        count["n"] += 1
        return measure(p)
    return m


def test_resume_after_a_kill(tmp_path):
    plan = _plan(is_quick=True)
    path = profiling.checkpoint_path(tmp_path / "p.parquet")
    ident = plan.identity(FAKE_DEVICE)
    fake = profiling.fake_measure(plan)
    with pytest.raises(Killed):
        run_plan(plan, Checkpoint(path, ident), _killing(fake, 40))
    assert path.name == "p.parquet.partial.csv"
    assert len(path.read_text().splitlines()) == 2 + 40          # header, columns, 40 rows
    # a kill in the middle of writing a row: the cut row is dropped, the rest is kept
    text = path.read_text()
    path.write_text(text + "solo,kqv,triton,12")
    seen = []

    def counting(p):
        seen.append(p.key())
        return fake(p)
    results, failures = run_plan(plan, Checkpoint(path, ident), counting)
    assert not failures and len(results) == len(plan.points)
    assert len(seen) == len(plan.points) - 40
    assert not set(seen) & {p.key() for p in plan.points[:40]}
    # all done: a third run measures nothing
    seen.clear()
    run_plan(plan, Checkpoint(path, ident), counting)
    assert seen == []


def test_checkpoint_of_another_request_is_not_reused(tmp_path):
    quick, full = _plan(is_quick=True), _plan(is_quick=True, ops=("kqv",))
    path = tmp_path / "x.partial.csv"
    run_plan(quick, Checkpoint(path, quick.identity(FAKE_DEVICE)), profiling.fake_measure(quick))
    seen = []

    def counting(p):
        seen.append(p)
        return Measurement(1.0)
    logs = []
    run_plan(full, Checkpoint(path, full.identity(FAKE_DEVICE), logs.append), counting)
    assert len(seen) == len(full.points)
    assert any("another request" in m for m in logs)
    # another device or other kernel code: another identity
    assert quick.identity(FAKE_DEVICE) != quick.identity({**FAKE_DEVICE, "code_version": "other"})
    assert quick.identity(FAKE_DEVICE) != quick.identity({**FAKE_DEVICE, "gpu_name": "Other GPU"})


def test_checkpoint_round_trips_values(tmp_path):
    path = tmp_path / "c.partial.csv"
    ck = Checkpoint(path, "abc")
    assert ck.open() == {}
    p = Point("pair", "ug", "", 2048, 0, 100, "memory", 32, "decode_attn", 512, 1024)
    pair = _plan(is_quick=True).pair_point(p, "tma", "triton", corun_a_ms=1.2, corun_b_ms=0.9, makespan_ms=1.25,
                              part_a_ms=1.0, part_b_ms=0.75, full_a_ms=0.66, full_b_ms=0.7, sm_clock_mhz=1980.0)
    s = Point("solo", "ug", "triton", 2048, 0, 100)
    ck.append(p, Measurement.of_pair(pair))
    ck.append(s, Measurement(0.8))
    ck.append(Point("pair", "o", "", 512, 0, 8, "memory", 124, "decode_attn", 256, 1024), Measurement(1.0, 1.0))
    ck.close()
    back = Checkpoint(path, "abc").open()
    # a pair row without its pair point (a different writer) is not taken as measured
    assert back == {p.key(): Measurement(1.25, pair=pair), s.key(): Measurement(0.8)}
    assert back[p.key()].pair.a.op_class == "compute" and back[p.key()].pair.b.op_class == "memory"


def test_failed_points_are_retried_and_groups_dropped(tmp_path):
    plan = _plan(is_quick=True)
    fake = profiling.fake_measure(plan)
    bad = next(p for p in plan.points if p.op == "act" and p.impl == "torch")

    def flaky(p):
        if p == bad:
            raise RuntimeError("boom")
        return fake(p)
    path = tmp_path / "f.partial.csv"
    logs = []
    results, failures = run_plan(plan, Checkpoint(path, plan.identity(FAKE_DEVICE)), flaky, log=logs.append)
    assert list(failures) == [bad.key()] and "boom" in failures[bad.key()]
    table = profiling.assemble_table(plan, results, FAKE_DEVICE, failures)
    assert table.impls("act") == ["triton"]                           # the torch group went, not the op
    assert table.meta["dropped_groups"][0]["op"] == "act"
    seen = []
    run_plan(plan, Checkpoint(path, plan.identity(FAKE_DEVICE)), lambda p: seen.append(p) or fake(p))
    assert seen == [bad]


def test_a_run_of_failures_stops_only_on_a_dead_device(tmp_path):
    plan = _plan(is_quick=True)
    fake = profiling.fake_measure(plan)

    def broken(p):
        raise RuntimeError("device gone")
    run = run_plan(plan, None, broken, max_consecutive_failures=5)
    assert run.stopped and "5 failed measurements in a row" in run.stopped
    assert len(run.failures) == 5 and not run.results
    run = run_plan(plan, None, broken, max_consecutive_failures=5, is_healthy=lambda: 1 / 0)
    assert run.stopped and len(run.failures) == 5
    # the device still answers: every point is tried, the failures are counted
    run = run_plan(plan, None, broken, max_consecutive_failures=5, is_healthy=lambda: True)
    assert not run.stopped and len(run.failures) == len(plan.points)
    # a whole pair family failing (one broken kernel) costs its points, not the profile
    bad_op = "prefill_attn"

    def pairs_broken(p):
        if p.kind == "pair" and bad_op in (p.op, p.partner_op):
            raise RuntimeError("no kernel")
        return fake(p)
    run = run_plan(plan, None, pairs_broken, max_consecutive_failures=3, is_healthy=lambda: True)
    assert not run.stopped
    n_bad = sum(p.kind == "pair" and bad_op in (p.op, p.partner_op) for p in plan.points)
    assert n_bad > 3 and len(run.failures) == n_bad and len(run.results) == len(plan.points) - n_bad
    table = profiling.assemble_table(plan, run.results, FAKE_DEVICE, run.failures)
    assert table.meta["pairs"]["failures"] == n_bad and table.meta["failures"] == n_bad
    assert len(table.meta["pairs"]["rows"]) == len(plan.pair_points()) - n_bad
    assert "no kernel" in table.meta["pairs"]["failure_examples"][0]
    # a stopped run still gives a table of what it measured, and says it stopped
    calls = {"n": 0}

    def dies(p):
        calls["n"] += 1
        if calls["n"] > 40:
            raise RuntimeError("device gone")
        return fake(p)
    run = run_plan(plan, None, dies, max_consecutive_failures=5, is_healthy=lambda: False)
    assert run.stopped and len(run.results) == 40
    table = profiling.assemble_table(plan, run.results, FAKE_DEVICE, run.failures, run.stopped)
    assert table.meta["stopped"] == run.stopped
    with pytest.raises(NfsearchError, match="nothing was measured"):
        profiling.assemble_table(plan, {}, FAKE_DEVICE, {("solo",): "x"})


def test_progress_and_eta():
    plan = _plan(is_quick=True)
    calls = []
    tick = iter(range(10 ** 6))
    run_plan(plan, None, profiling.fake_measure(plan), progress=lambda *a: calls.append(a),
             clock=lambda: next(tick))
    assert calls[-1][0] == calls[-1][1] == len(plan.points)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert all(c[2] >= 0 for c in calls) and calls[-1][2] == pytest.approx(0, abs=1e-6)
    assert isinstance(calls[0][3], str) and calls[0][3]


# ------------------------------------------------------------------------------------ the table
def test_table_from_fake_timings(tmp_path):
    plan = _plan(is_quick=True)
    table, results = _table(plan)
    meta = table.meta
    assert meta["source"] == "fake" and meta["gpu_name"] == "Fake GPU"
    assert meta["num_sms"] == 132 and meta["sm_granularity"] == 8 and meta["model"] == "llama-3-8b"
    # the measured ceilings, in their one form; the table's GPU figures come from them
    ceilings = Ceilings.from_dict(meta["ceilings"])
    assert ceilings.gemm_tflops > 0 and ceilings.copy_tbps > 0 and ceilings.copy_bytes == 1 << 30
    assert "peak_tflops" not in meta and "mem_bandwidth_tbps" not in meta
    gpu = gpu_from_profile(table)
    assert (gpu.peak_tflops, gpu.mem_bandwidth_tbps) == (ceilings.gemm_tflops, ceilings.copy_tbps)
    assert gpu.figures_source == "fake in this profile run"
    assert "gpu_key" not in meta                    # not a bundled GPU
    assert profiling.assemble_table(plan, results, {**FAKE_DEVICE, "gpu_name": "NVIDIA H200"}).meta["gpu_key"] == "h200"
    assert table.has_corun()
    assert set(table.rows.loc[table.rows.co_class != "", "co_class"]) == {"memory", "compute"}
    for suffix in (".csv", ".parquet"):
        table.write(tmp_path / f"t{suffix}")
        back = load(tmp_path / f"t{suffix}")
        assert back.fingerprint() == table.fingerprint() and back.meta["grid"] == meta["grid"]


def test_profile_ceilings_old_keys_missing_ones_and_bad_ones():
    plan = _plan(is_quick=True)
    table, results = _table(plan)
    rows, meta = table.rows, {k: v for k, v in table.meta.items() if k != "ceilings"}
    # a profile written before the ceilings had one form: its peak_tflops / mem_bandwidth_tbps are read
    old = gpu_from_profile(ProfileTable(rows, {**meta, "peak_tflops": 650.0, "mem_bandwidth_tbps": 2.5}))
    assert (old.peak_tflops, old.mem_bandwidth_tbps) == (650.0, 2.5)
    # a run whose ceiling points failed keeps its table; the GPU figures fall back to the bundled GPU's
    no_copy = {k: m for k, m in results.items() if k[:2] != ("ceiling", "copy")}
    assert profiling.ceilings(no_copy) is None
    assert "ceilings" not in profiling.assemble_table(plan, no_copy, FAKE_DEVICE).meta
    assert profiling.ceilings({**results, Point("ceiling", "copy", "torch").key(): Measurement(float("inf"))}) is None
    for bad, says in (({"gemm_tflops": "700", "copy_tbps": 3.0}, "positive rates"), ("fast", "JSON object"),
                      ({"gemm_tflops": 700.0}, "need gemm_tflops and copy_tbps"),
                      ({"gemm_tflops": 700.0, "copy_tbps": 3.0, "x": 1}, "unknown keys")):
        with pytest.raises(NfsearchError, match=f"profile metadata: ceilings .*{says}"):
            ProfileTable(rows, {**meta, "ceilings": bad})


@pytest.mark.parametrize("wl", ["W1", "W2", "W3"])
def test_full_table_answers_every_lookup_of_w1_to_w3(wl):
    """Every op of the workload at every nano-batch size (multiples of 128) and SM count of the grid."""
    plan = _plan()
    table, _ = _table(plan)
    workload = load_workload(wl)
    problem = make_problem(LLAMA, workload, table)
    cost = problem.cost
    for name, op in cost.ops.items():
        _, hi = {"decode": (64, workload.num_decode), "prefill": (128, workload.num_prefill_tokens)}.get(
            op.domain, (128, workload.num_tokens))
        sizes = sorted({*range(128, hi + 1, 128), hi} - {0}) if op.domain != "decode" else [64, 128, hi]
        for t in sizes:
            for s in plan.grid["sm_counts"]:
                assert cost.solo_ms(name, t, s) > 0
                other = {"compute": "memory", "memory": "compute"}.get(op.op_class)
                if other:
                    assert cost.corun_ms(name, t, s, other) >= cost.solo_ms(name, t, s)
    ctx = op_context(cost.ops["decode_attn"], workload) if "decode_attn" in cost.ops else None
    assert ctx in (None, 1024, 2048)


def test_summary_numbers():
    plan = _plan(is_quick=True)
    table, results = _table(plan)
    s = profiling.summarize(plan, results, table, 12.5, "nfsearch profile ...")
    assert s["source"] == "fake" and s["wall_s"] == 12.5
    assert s["rows"]["total"] == len(table.rows) and s["rows"]["corun"] > 0
    assert Ceilings.from_dict(s["ceilings"]) == Ceilings.from_dict(table.meta["ceilings"])
    assert s["gemm_at_full_gpu"]["ug"][2048]["cublas_over_triton"] > 0
    assert s["decode_attn_tbps"]["512x1024"]["triton"][64] > 0
    pairs = s["pairs"]
    # quick: 4 GEMMs x 2 sizes (256, 2048) x (1 decode + 1 prefill + 3 small partners) + decode x prefill
    assert pairs["num_families"] == len(plan.grid["pair_families"]) == 41
    assert s["rows"]["pair_points"] == len(plan.pair_points())
    assert 0 <= pairs["fraction_paying"] <= 1 and pairs["failures"] == 0
    assert all(f["splits"] == 4 and f["back_to_back_ms"] > 0 for f in pairs["families"])
    assert s["corun_stretch"]["compute100+decode32"]["ug"]["median"] == pytest.approx(1.15)
    json.dumps(s)


def test_gpu_key_for():
    assert profiling.gpu_key_for("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert profiling.gpu_key_for("NVIDIA H100 SXM5 80GB") == "h100-sxm"
    assert profiling.gpu_key_for("NVIDIA H200") == "h200"
    assert profiling.gpu_key_for("NVIDIA H100 PCIe") == ""


def test_tiny_model_plan():
    plan = make_plan(TINY_MODEL, Workload("t", 128, 512, (128,)), 132, 8, is_quick=True)
    assert plan.grid["decode_contexts"] == [512] and plan.grid["prompt_lengths"] == [128]


def test_no_torch_import():
    code = "import sys, nfsearch.runtime.measurements; assert 'torch' not in sys.modules and 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_corun_holes_shrink_to_a_rectangle():
    """A failed co-run point costs its SM count (or token count) in that context, not the whole group."""
    plan = _plan()
    fake = profiling.fake_measure(plan)
    holes = {("corun", "decode_attn", "triton", r, 2048, 8, "compute", 124, "", 0, 0) for r in (384, 512)}
    results = {p.key(): fake(p) for p in plan.points if p.key() not in holes}
    table = profiling.assemble_table(plan, results, FAKE_DEVICE, dict.fromkeys(holes, "x"))
    co = table.rows[(table.rows.op == "decode_attn") & (table.rows.co_class == "compute")]
    assert set(co[co.context == 1024].sm_count) == set(profiling.CORUN_MEMORY_SMS)
    assert set(co[co.context == 2048].sm_count) == set(profiling.CORUN_MEMORY_SMS) - {8}
    assert len(co[co.context == 2048]) == 5 * (len(profiling.CORUN_MEMORY_SMS) - 1)
    (d,) = table.meta["dropped_groups"]
    assert d["kept"] == len(co) and d["missing"] == 2
    # the cost model answers inside the rectangle from the table, outside it from the curve
    problem = make_problem(LLAMA, load_workload("W3"), table)
    assert problem.cost.corun_ms("decode_attn", 256, 8, "compute") > 0
    assert problem.cost.corun_ms("decode_attn", 256, 16, "compute") > 0
