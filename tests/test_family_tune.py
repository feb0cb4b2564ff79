"""A family against its sequential twin on one live engine, and `tune --family` (issue 25 item 5): the
torch-free choice on recorded numbers (faster median kept, too few iterations keep the search's plan),
the tuned family's records and schema, and on the CPU engine `bench --plans F --compare` and the CLI."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from nfsearch.cli import main
from nfsearch.errors import NfsearchError
from nfsearch.family import artifact
from nfsearch.family.tune import (
    BucketCompare,
    VariantTime,
    choose,
    compare_buckets,
    sequential_maker,
    tuned_family,
)
from nfsearch.serving.model_config import load_model_config
from tests.conftest import ENGINE_TINY

FOLDER = Path(ENGINE_TINY).parent
SPLIT = FOLDER / "two-buckets-split.family.json"
SPEC = load_model_config(ENGINE_TINY).spec


@pytest.fixture(scope="module")
def family():
    return artifact.read(SPLIT)


def _compare(bucket, over_ms, seq_ms, num_over=100, num_seq=100, is_overlapped=True):
    return BucketCompare(bucket, is_overlapped, VariantTime(num_over, over_ms), VariantTime(num_seq, seq_ms), 1.0, 1.1)


def test_the_faster_median_is_kept():
    b = SimpleNamespace()
    assert choose(_compare(b, 1.00, 1.05)).kept == "searched"
    slower = choose(_compare(b, 1.05, 1.00))
    assert slower.kept == "sequential" and "sequential 1.0000 ms < overlapped 1.0500 ms" in slower.reason
    assert choose(_compare(b, 1.0, 1.0)).kept == "searched"                  # a tie keeps the search's plan


def test_too_few_iterations_keep_the_searched_plan():
    c = choose(_compare(SimpleNamespace(), 2.0, 1.0, num_over=19, num_seq=500))
    assert c.kept == "searched" and c.reason.startswith("too few iterations") and "19 overlapped" in c.reason
    assert choose(_compare(SimpleNamespace(), 2.0, 1.0, num_over=20, num_seq=20)).kept == "sequential"
    assert choose(_compare(SimpleNamespace(), 2.0, 1.0, num_over=20, num_seq=20), min_iterations=21).kept == "searched"
    same = choose(_compare(SimpleNamespace(), 2.0, 1.0, is_overlapped=False))
    assert same.kept == "searched" and "op by op already" in same.reason


def test_compare_buckets_pools_each_variants_times(family):
    buckets = [b.bucket for b in family.buckets]
    its = [SimpleNamespace(bucket=1, variant=v, time_ms=t) for v, t in
           [("plan", 3.0), ("plan", 1.0), ("plan", 2.0), ("sequential", 5.0), ("sequential", 4.0)]]
    its.append(SimpleNamespace(bucket=0, variant="sequential", time_ms=7.0))
    rows = compare_buckets(family, buckets, {buckets[1]}, its)
    assert rows[1].plan == VariantTime(3, 2.0) and rows[1].sequential == VariantTime(2, 4.5)
    assert rows[0].plan == VariantTime(0, None) and not rows[0].is_overlapped and rows[1].is_overlapped
    assert rows[1].predicted_ms == family.buckets[1].prediction.iteration_ms
    assert BucketCompare.from_dict(json.loads(json.dumps(rows[1].to_dict()))) == rows[1]


def test_tuned_family_swaps_in_the_searchs_sequential_plan(family, tmp_path):
    small, top = (b.bucket for b in family.buckets)
    compares = [_compare(small, 1.0, 1.0, is_overlapped=False), _compare(top, 1.3, 1.1, num_over=40, num_seq=41)]
    run = {"trace": "const:8:8", "num_requests": 120, "device": "cpu", "every_iterations": 3}
    tuned = tuned_family(family, compares, sequential_maker(family, SPEC), run)
    kept = tuned.buckets[1]
    assert kept.tune["kept"] == "sequential" and kept.tune["overlapped"] == {"num_iterations": 40, "median_ms": 1.3}
    assert len(kept.plan.streams) == 1 and kept.plan.solver.name == "sequential"
    assert kept.plan_source.startswith("sequential") and kept.tune["replaced"]["kernel_differences"] == {}
    assert kept.prediction.iteration_ms == pytest.approx(family.buckets[1].prediction.sequential_iteration_ms)
    assert tuned.buckets[0].plan == family.buckets[0].plan and tuned.buckets[0].tune["kept"] == "searched"
    assert tuned.tune["num_sequential"] == 1 and tuned.tune["trace"] == "const:8:8"
    assert tuned.prediction.tokens_per_s == pytest.approx(family.prediction.sequential_tokens_per_s)
    artifact.write(tuned, tmp_path / "tuned.json")
    again = artifact.read(tmp_path / "tuned.json")
    assert again.tune == tuned.tune and again.buckets[1].tune == kept.tune
    assert "tune" not in json.loads(SPLIT.read_text())          # a family without one still reads and writes
    data = json.loads((tmp_path / "tuned.json").read_text())
    data["buckets"][1]["tune"]["kept"] = "fastest"
    with pytest.raises(NfsearchError, match="schema at buckets/1/tune/kept"):
        artifact.from_dict(data)


def test_a_bucket_without_a_measurement_is_refused(family):
    with pytest.raises(NfsearchError, match="no bucket"):
        tuned_family(family, [], sequential_maker(family, SPEC), {})


def test_another_profile_is_refused(family):
    import dataclasses
    other = dataclasses.replace(family, profile={"fingerprint": "x", "label": "measured on another GPU"})
    compares = [_compare(b.bucket, 2.0, 1.0) for b in family.buckets]
    with pytest.raises(NfsearchError, match="solved with profile 'measured on another GPU'"):
        tuned_family(other, compares, sequential_maker(other, SPEC), {})


# ------------------------------------------------------------------------------------ the CPU engine
def test_bench_plans_compare_reports_both_variants_per_bucket(one_torch_thread):
    from nfsearch.runtime.bench_engine import BenchOptions, format_report, run_bench
    opts = BenchOptions(ENGINE_TINY, "const:8:8", 120, device="cpu", is_compare=True, plans=str(SPLIT),
                        compare_every=3)
    report = run_bench(opts, echo=lambda line: None, progress=False)
    assert report["compare"]["every_iterations"] == 3 and "same family op by op" in report["compare"]["what_differs"]
    rows = {tuple(r["bucket"]): r["compare"] for r in report["family"]["buckets"]}
    top = rows[(32, 32, 8, 16)]
    assert top["is_overlapped"] and not rows[(16, 16, 8, 16)]["is_overlapped"]
    assert top["plan"]["num_iterations"] >= 20 and top["sequential"]["num_iterations"] >= 20
    assert top["plan"]["median_ms"] > 0 and top["sequential"]["median_ms"] > 0
    assert top["predicted_ms"] == artifact.read(SPLIT).buckets[1].prediction.iteration_ms
    text = format_report(report)
    assert "family against itself op by op" in text and "(plan sequential: same kernels both ways)" in text


def test_cli_tune_family_writes_a_tuned_family(tmp_path, monkeypatch, one_torch_thread):
    from nfsearch.runtime import bench_engine
    monkeypatch.setattr(bench_engine, "COMPARE_EVERY", 3)
    out = tmp_path / "tuned.json"
    res = CliRunner().invoke(main, ["tune", "--family", str(SPLIT), "--model", ENGINE_TINY, "--trace", "const:8:8",
                                    "--num-requests", "120", "--device", "cpu", "-o", str(out)])
    assert res.exit_code == 0, res.output
    tuned = artifact.read(out)
    top = tuned.buckets[1]
    assert top.tune["overlapped"]["num_iterations"] >= 20 and top.tune["kept"] in ("searched", "sequential")
    assert tuned.buckets[0].tune["reason"].startswith("its plan runs op by op already")
    assert tuned.tune["every_iterations"] == 3 and tuned.tune["device"] == "cpu"
    assert json.loads(out.with_suffix(".bench.json").read_text())["family"]["buckets"]
    assert f"wrote {out}" in res.output and "32/32/8/16" in res.output
    res = CliRunner().invoke(main, ["tune", "--family", str(SPLIT), "-o", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "needs --family FAMILY.json, --model" in res.output
