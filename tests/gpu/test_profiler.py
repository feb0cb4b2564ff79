"""GPU: a tiny --quick profile runs end to end and gives sane, positive times.

Skipped without torch or a CUDA GPU. Restricted to three ops (a GEMM, both attentions) and the quick
grid, co-run pairs and ceilings included, so it takes well under a minute.
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
    from nfsearch.runtime import measurements as profiling
    from nfsearch.profile import load
    from nfsearch.runtime.profiler import measure_profile
    from nfsearch.specs import load_model, load_workload

    out = tmp_path / "quick.csv"
    seen = []
    table = measure_profile(load_model("llama-3-8b"), load_workload("W2"), is_quick=True, output=str(out),
                            ops=("kqv", "decode_attn", "prefill_attn"), progress=lambda *a: seen.append(a))
    meta, rows = table.meta, table.rows
    assert meta["source"] == "measured"
    name = torch.cuda.get_device_name(0)
    assert meta["gpu_name"] == name and meta["num_sms"] == torch.cuda.get_device_properties(0).multi_processor_count
    if "H100" in name or "H200" in name:
        assert meta["gpu_key"] in ("h100-sxm", "h200") and meta["sm_granularity"] == 8
    assert 200 < meta["peak_tflops"] < 2000 and 1.0 < meta["mem_bandwidth_tbps"] < 10
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
    assert 0.5 < tbps < 1.2 * meta["mem_bandwidth_tbps"] + 0.5
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
    assert summary["ceilings"]["peak_tflops"] == meta["peak_tflops"]
    assert seen and seen[-1][0] == seen[-1][1]
