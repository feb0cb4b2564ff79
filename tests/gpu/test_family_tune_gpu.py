"""A family against its sequential twin on one live GPU engine (issue 25 item 5): `bench --plans F --compare`
on the tiny model's two-bucket fixture family (the 32-token bucket split into 2 nano-batches on 3 streams)
alternates the overlapped and the op-by-op variants in CUDA graphs and reports both per bucket; `tune
--family` writes a family keeping the faster (needs ortools for the sequential plan). Prints the table."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from conftest import ENGINE_TINY as TINY

from nfsearch.family import artifact
from nfsearch.runtime.bench_engine import BenchOptions, format_report, run_bench

SPLIT_FAMILY = Path(__file__).parent.parent / "fixtures" / "engine-tiny" / "two-buckets-split.family.json"
TRACE, NUM_REQUESTS, EVERY = "const:8:8", 480, 10


def test_bench_plans_compare_runs_both_variants_per_bucket():
    opts = BenchOptions(TINY, TRACE, NUM_REQUESTS, device="cuda", dtype="fp32", gpu_memory_utilization=0.25,
                        is_compare=True, plans=str(SPLIT_FAMILY), compare_every=EVERY, with_op_trace=False)
    report = run_bench(opts, echo=lambda line: None, progress=False)
    assert report["engine"]["cuda_graphs"] and report["num_eager_launches"] == 0
    rows = {tuple(r["bucket"]): r["compare"] for r in report["family"]["buckets"]}
    top = rows[(32, 32, 8, 16)]
    assert top["is_overlapped"]
    assert top["plan"]["num_iterations"] >= 20 and top["sequential"]["num_iterations"] >= 20
    assert top["plan"]["median_ms"] > 0 and top["sequential"]["median_ms"] > 0
    print("\n".join(line for line in format_report(report).splitlines() if "/16" in line or "family" in line))


def test_tune_family_keeps_the_faster_variant(tmp_path):
    pytest.importorskip("ortools")          # the search's sequential plan
    from nfsearch.runtime.family_tune import tune_family
    tuned, _, lines = tune_family(str(SPLIT_FAMILY), TINY, TRACE, NUM_REQUESTS, device="cuda",
                                       compare_every=EVERY, echo=lambda line: None, progress=False)
    top = tuned.buckets[1]
    over, seq = top.tune["overlapped"]["median_ms"], top.tune["sequential"]["median_ms"]
    assert top.tune["kept"] == ("sequential" if seq < over else "searched")
    artifact.write(tuned, tmp_path / "tuned.json")
    assert artifact.read(tmp_path / "tuned.json").buckets[1].tune == top.tune
    print("\n".join(lines))
