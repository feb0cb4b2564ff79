"""`bench --numerics` on a GPU: the second engine of a process sizes its KV cache from the same memory as
the first (the first engine, its cache, graphs and cuBLAS workspace handed back before it starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = str(Path(__file__).parent.parent / "fixtures" / "engine-tiny" / "config.json")
MIB = 1 << 20


def test_a_second_engine_in_the_process_gets_the_same_kv_budget():
    from nfsearch.runtime.bench_engine import BenchOptions
    from nfsearch.runtime.bench_numerics import format_numerics, run_numerics
    # a small share of the GPU: the tiny model's pages are small, so a few MiB show as many pages
    opts = BenchOptions(TINY, "const:64:16", 16, dense_batch=128, gpu_memory_utilization=0.05, device="cuda")
    out = run_numerics(opts, ["bf16", "bf16", "fp8kv"], echo=lambda line: None, progress=False)
    print(format_numerics(out))
    first, second, fp8kv = out["numerics"]
    page_bytes = first["engine"]["kv_bytes_per_token"] * first["engine"]["page_size"]
    start = out["memory_at_start"]
    print("memory at start:", start, "pages:", [r["engine"]["num_pages"] for r in out["numerics"]])
    assert [m["is_previous_engine_released"] for m in start] == [None, True, True]
    assert start[1]["allocated_bytes"] <= start[0]["allocated_bytes"] + MIB       # nothing left behind
    assert abs(start[1]["free_bytes"] - start[0]["free_bytes"]) <= 64 * MIB
    # the budget (total x utilization - weights - activations - other) is the same within 64 MiB
    assert abs(second["engine"]["num_pages"] - first["engine"]["num_pages"]) * page_bytes <= 64 * MIB
    assert fp8kv["kv_cache_dtype"] == "fp8" and fp8kv["engine"]["kv_tokens"] > first["engine"]["kv_tokens"]
    assert all(r["summary"]["num_finished"] == 16 for r in out["numerics"])
