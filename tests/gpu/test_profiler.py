"""GPU: a tiny --quick profile runs end to end and gives sane, positive times; a tiny pair table too.

Skipped without torch or a CUDA GPU. Restricted to three ops (a GEMM, both attentions) and the quick
grid, co-run rows and ceilings included, so it takes well under a minute; the pair test measures one
pair family (a GEMM beside decode attention) on one split in both orientations.
"""

import json
import math

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_quick_profile(tmp_path):
    from nfsearch.profile import load
    from nfsearch.runtime import measurements as profiling
    from nfsearch.runtime.profiler import measure_profile
    from nfsearch.specs import load_model, load_workload

    out = tmp_path / "quick.csv"
    seen = []
    table = measure_profile(load_model("llama-3-8b"), load_workload("W2"), is_quick=True, output=str(out),
                            ops=("kqv", "decode_attn", "prefill_attn"), progress=lambda *a: seen.append(a),
                            with_pairs=False)
    meta, rows = table.meta, table.rows
    assert meta["source"] == "measured"
    name = torch.cuda.get_device_name(0)
    assert meta["gpu_name"] == name and meta["num_sms"] == torch.cuda.get_device_properties(0).multi_processor_count
    if "H100" in name or "H200" in name:
        assert meta["gpu_key"] in ("h100-sxm", "h200") and meta["sm_granularity"] == 8
    assert 200 < meta["ceilings"]["gemm_tflops"] < 2000 and 1.0 < meta["ceilings"]["copy_tbps"] < 10
    assert all(k in meta["versions"] for k in ("torch", "triton", "driver"))
    assert (rows["time_ms"] > 0).all() and all(math.isfinite(x) for x in rows["time_ms"])
    assert set(rows.op) == {"kqv", "decode_attn", "prefill_attn"}
    full = meta["num_sms"]

    def solo(op, impl, t, ctx, s):
        return table.time_ms(op, t, s, ctx, impl=impl)[0]

    # fewer SMs, slower; the SM-bounded GEMM on 16 SMs far slower than on all of them
    assert solo("kqv", "triton", 2048, 0, 16) > 3 * solo("kqv", "triton", 2048, 0, full)
    assert solo("kqv", "triton", 2048, 0, full) > solo("kqv", "triton", 128, 0, full)
    # decode attention: KV bytes over time within reason of the copy ceiling
    ctx = 1024
    kv_bytes = 512 * ctx * 2 * 8 * 128 * 2
    tbps = kv_bytes / solo("decode_attn", "triton", 512, ctx, full) / 1e9
    assert 0.5 < tbps < 1.2 * meta["ceilings"]["copy_tbps"] + 0.5
    # co-run rows for both sides; beside another op an op is not much faster than alone
    co = rows[rows.co_class != ""]
    assert {("kqv", "memory"), ("decode_attn", "compute"), ("prefill_attn", "memory")} <= set(
        zip(co.op, co.co_class))
    for r in co.itertuples():       # solo interpolated between the quick grid's SM counts
        assert r.time_ms > 0.5 * solo(r.op, "triton", r.num_tokens, r.context, r.sm_count)
    # the files: the table, the summary; the checkpoint is gone after a clean run
    back = load(out)
    assert back.fingerprint() == table.fingerprint()
    assert not profiling.checkpoint_path(out).exists()
    summary = json.loads((tmp_path / "quick.summary.json").read_text())
    assert summary["rows"]["total"] == len(rows) and summary["failures"] == 0
    assert summary["ceilings"] == meta["ceilings"]
    assert seen and seen[-1][0] == seen[-1][1]


def test_tiny_pair_measurement(tmp_path):
    from nfsearch import pairs
    from nfsearch.profile import load
    from nfsearch.runtime import measurements as profiling
    from nfsearch.runtime.kernels import IMPLS
    from nfsearch.runtime.profiler import measure_profile
    from nfsearch.specs import load_model, load_workload

    full = torch.cuda.get_device_properties(0).multi_processor_count
    out = tmp_path / "pairs.csv"
    measure_profile(load_model("llama-3-8b"), load_workload("W2"), is_quick=True, output=str(out),
                    ops=("kqv", "decode_attn"), sm_counts=(full,), pair_minority_sms=(32,))
    meta = load(out).meta
    # the quick pair sizes: the GEMM at 256 and 2048 tokens beside W2's decode batch
    every = pairs.points_from_meta(meta)
    assert meta["pairs"]["failures"] == 0, meta["pairs"]["failure_examples"]
    assert sorted({p.a.num_tokens for p in every}) == [256, 2048]
    points = [p for p in every if p.a.num_tokens == 2048]
    assert sorted((p.sms_a, p.sms_b) for p in points) == [(32, full - 32), (full - 32, 32)]
    for p in points:
        assert (p.a.op, p.a.num_tokens, p.b.op, p.b.num_tokens, p.b.context) == ("kqv", 2048, "decode_attn", 512, 1024)
        times = [getattr(p, n) for n in ("corun_a_ms", "corun_b_ms", "makespan_ms", "part_a_ms", "part_b_ms",
                                         "full_a_ms", "full_b_ms")]
        assert all(0 < t < 100 and math.isfinite(t) for t in times)
        assert p.makespan_ms >= max(p.corun_a_ms, p.corun_b_ms) * (1 - 1e-6)
        # beside another kernel a side is not much faster than alone on the same SMs
        assert p.corun_a_ms > 0.7 * p.part_a_ms and p.corun_b_ms > 0.7 * p.part_b_ms
        assert p.impl_a in IMPLS["kqv"] and p.impl_b in IMPLS["decode_attn"]    # registered impls ran
        if p.sm_clock_mhz is not None:
            assert 300 < p.sm_clock_mhz < 3500
    small = next(p for p in points if p.sms_a == 32)
    assert small.part_a_ms > 1.5 * small.full_a_ms       # the GEMM on 32 SMs is far slower than on all
    text = pairs.analyze_pairs(str(out))
    assert "kqv 2048 tok x decode_attn 512 req ctx 1024" in text
    assert not profiling.checkpoint_path(out).exists()


def test_pair_energy(tmp_path):
    """add_energy measures the two pair families of a tiny pair table (the GEMM at 256 and 2048 tokens
    beside decode attention) at their best split and back to back."""
    from nfsearch.profile import load
    from nfsearch.runtime import power
    from nfsearch.runtime.profiler import add_energy, measure_profile
    from nfsearch.specs import load_model, load_workload

    device, why = power.open_device(0)
    if device is None:
        pytest.skip(f"no NVML energy counter: {why}")
    device.close()
    full = torch.cuda.get_device_properties(0).multi_processor_count
    out = tmp_path / "pairs.csv"
    model, workload = load_model("llama-3-8b"), load_workload("W2")
    measure_profile(model, workload, is_quick=True, output=str(out), ops=("kqv", "decode_attn"),
                    sm_counts=(full,), pair_minority_sms=(32,))
    table = add_energy(model, workload, load(out), window_s=0.1)
    assert table.energy is not None and len(table.energy.pair_points) == 2, table.energy.failures
    for p, tokens in zip(table.energy.pair_points, (256, 2048)):      # sorted by family
        assert (p.op_a, p.num_tokens_a, p.op_b, p.num_tokens_b) == ("kqv", tokens, "decode_attn", 512)
        assert {p.sms_a, p.sms_b} == {32, full - 32}
        # launched together, the pair is neither much faster than back to back on this split (a
        # third) nor slower than twice back to back; its dynamic energy within a factor of two of theirs
        assert 0.3 * p.b2b_time_ms < p.time_ms < 2.0 * p.b2b_time_ms
        assert 0.5 < p.dynamic_ratio(table.energy.static_power_w) < 2.0
    back = table.energy.to_dict()
    assert type(table.energy).from_dict(back).pair_points == table.energy.pair_points
