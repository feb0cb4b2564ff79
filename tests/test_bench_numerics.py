"""`nfsearch bench --numerics`: one process, a fresh engine per numerics setting, one JSON and one table
(CPU, the tiny engine; the GPU's same-budget check is tests/gpu/test_bench_numerics_gpu.py)."""

from __future__ import annotations

import json
import weakref

import pytest
from click.testing import CliRunner
from conftest import ENGINE_TINY

from nfsearch.cli import main
from nfsearch.errors import NfsearchError
from nfsearch.runtime.bench_engine import BenchOptions
from nfsearch.runtime.bench_numerics import format_numerics, numerics_table, parse_numerics, run_numerics
from nfsearch.runtime.engine import Engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP8_GEMM = "fp8-e4m3 w8a8 per-channel/per-token"
EXPECTED = {"bf16": ("fp32", "fp32"), "fp8": (FP8_GEMM, "fp32"), "fp8kv": ("fp32", "fp8"),
            "fp8+fp8kv": (FP8_GEMM, "fp8")}     # (gemm, kv_cache_dtype) on the CPU, whose model dtype is fp32
BENCH = ["bench", "--model", ENGINE_TINY, "--trace", "const:16:4", "--num-requests", "3", "--device", "cpu",
         "--dense-batch", "64"]


def _table_rows(output: str) -> list[str]:
    """The printed table's data rows: the lines after its header line, up to `wrote ...`."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("numerics side by side"))
    assert lines[start + 1].startswith("setting ")
    rows = []
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith(("wrote ", "GPU memory")):
            break
        rows.append(line)
    return rows


@pytest.mark.parametrize("text", ["bf16,fp8kv", "fp8+fp8kv,bf16,fp8"])
def test_cli_writes_one_json_with_a_report_per_setting_in_order(tmp_path, text):
    out = tmp_path / "n.json"
    r = CliRunner().invoke(main, [*BENCH, "--numerics", text, "-o", str(out)])
    assert r.exit_code == 0, r.output
    settings = text.split(",")
    data = json.loads(out.read_text())
    assert data["settings"] == settings and len(data["numerics"]) == len(settings) == len(data["table"])
    for name, report, row in zip(settings, data["numerics"], data["table"], strict=True):
        assert (report["gemm"], report["kv_cache_dtype"]) == EXPECTED[name]
        assert report["quantization"] == ("fp8" if name.startswith("fp8+") or name == "fp8" else None)
        assert report["engine"]["kv_dtype"] == EXPECTED[name][1]
        assert report["summary"]["num_finished"] == 3 and report["summary"]["output_tokens"] == 12
        assert row["setting"] == name and row["kv_tokens"] == report["engine"]["kv_tokens"] > 0
        assert "command" not in report          # each report is run_bench's own; the command is the file's
    assert data["command"].startswith("nfsearch")      # (CliRunner leaves sys.argv as pytest's)
    assert [m["setting"] for m in data["memory_at_start"]] == settings
    rows = _table_rows(r.output)
    assert [row.split()[0] for row in rows] == settings
    assert r.output.count("total tokens/s per GPU") == len(settings)        # each setting's own report
    assert r.output.index("numerics side by side") > r.output.rindex("total tokens/s per GPU")


def test_cli_keeps_the_settings_done_when_a_later_one_fails(tmp_path, monkeypatch):
    """A run cut short keeps each finished setting in OUTPUT.partial.json (and writes no OUTPUT); a run that
    ends removes it."""
    from nfsearch.runtime import bench_numerics
    real, calls = bench_numerics.run_bench, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise NfsearchError("the GPU fell over")
        return real(*args, **kwargs)

    out = tmp_path / "n.json"
    monkeypatch.setattr(bench_numerics, "run_bench", second_fails)
    r = CliRunner().invoke(main, [*BENCH, "--numerics", "fp8kv,bf16", "-o", str(out)])
    assert r.exit_code == 2 and "the GPU fell over" in r.output and not out.exists()
    kept = json.loads((tmp_path / "n.partial.json").read_text())
    assert kept["is_partial"] and kept["settings"] == ["fp8kv", "bf16"]
    assert [x["kv_cache_dtype"] for x in kept["numerics"]] == ["fp8"]
    monkeypatch.setattr(bench_numerics, "run_bench", real)
    assert CliRunner().invoke(main, [*BENCH, "--numerics", "bf16", "-o", str(out)]).exit_code == 0
    assert out.exists() and not (tmp_path / "n.partial.json").exists()


@pytest.mark.parametrize("extra, what", [
    (["--numerics", "bf16,fp8", "--quantization", "fp8"], "drop --quantization"),
    (["--numerics", "bf16,fp8", "--kv-cache-dtype", "auto"], "drop --kv-cache-dtype"),
    (["--numerics", "bf16,fp8", "--compare"], "drop --compare"),
    (["--numerics", "bf16", "--url", "http://127.0.0.1:9"], "drop --url"),
    (["--numerics", "bf16,int4"], "unknown setting 'int4'"),
    (["--numerics", "fp8,bf16,fp8"], "fp8 is given twice"),
    (["--numerics", "bf16,"], "an empty setting"),
])
def test_cli_refusals_are_one_line_exit_2(tmp_path, extra, what):
    out = tmp_path / "n.json"
    r = CliRunner().invoke(main, [*BENCH, *extra, "-o", str(out)])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("nfsearch: error:")]
    assert len(errors) == 1 and what in errors[0] and "Traceback" not in r.output
    assert not out.exists()


def test_parse_numerics_keeps_the_order_given():
    assert parse_numerics("fp8+fp8kv, bf16,fp8kv") == ["fp8+fp8kv", "bf16", "fp8kv"]
    with pytest.raises(NfsearchError, match="FP8"):
        parse_numerics("FP8")


def test_each_engine_starts_after_the_previous_one_is_gone_and_gets_the_same_kv_capacity():
    made, alive_at_start = [], []

    def make_engine(*args, **kwargs):
        alive_at_start.append([ref() is not None for ref in made])
        engine = Engine(*args, **kwargs)
        made.append(weakref.ref(engine))
        return engine

    opts = BenchOptions(ENGINE_TINY, "const:16:4", 3, dense_batch=64, device="cpu")
    out = run_numerics(opts, ["bf16", "fp8", "bf16"], echo=lambda line: None, progress=False,
                       make_engine=make_engine)
    assert alive_at_start == [[], [False], [False, False]]
    assert [m["is_previous_engine_released"] for m in out["memory_at_start"]] == [None, True, True]
    capacity = [(r["engine"]["kv_tokens"], r["engine"]["num_pages"], r["kv_pages"]["num_pages"]) for r in out["numerics"]]
    assert capacity[0] == capacity[1] == capacity[2] and capacity[0][0] > 0
    # same trace and seed for every setting: the same tokens served
    assert len({json.dumps(r["trace"]) for r in out["numerics"]}) == 1
    assert len({(r["summary"]["input_tokens"], r["summary"]["output_tokens"]) for r in out["numerics"]}) == 1


def test_run_numerics_refuses_what_a_setting_cannot_share():
    for bad in ({"is_compare": True}, {"tp_degree": 2}, {"plans": "f.json"}):
        opts = BenchOptions(ENGINE_TINY, "const:16:4", 3, device="cpu", **bad)
        with pytest.raises(NfsearchError, match="--numerics"):
            run_numerics(opts, ["bf16"], echo=lambda line: None, progress=False)


def test_table_shows_power_clock_and_optimal_when_measured():
    opts = BenchOptions(ENGINE_TINY, "const:16:4", 3, dense_batch=64, device="cpu")
    out = run_numerics(opts, ["bf16", "fp8+fp8kv"], echo=lambda line: None, progress=False)
    for k, report in enumerate(out["numerics"]):     # what a GPU run adds, made up here
        report["power"] = {"mean_power_w": 690.0 - k, "median_sm_clock_mhz": 1755.0 + k,
                           "steady_joules_per_token": 0.0321 - k / 1000, "joules_per_token": 0.035}
        report["summary"]["pct_of_optimal"] = 43.5 + k
        report["summary"]["is_steady_window"] = True
    out["table"] = numerics_table(out["settings"], out["numerics"])
    out["memory_at_start"] = [{"free_bytes": 79 << 30, "allocated_bytes": 0}] * 2
    rows = _table_rows(format_numerics(out))
    assert len(rows) == 2
    assert "0.0321" in rows[0] and " 690 " in rows[0] and " 1755 " in rows[0] and rows[0].endswith("43.5%")
    assert "0.0311" in rows[1] and " 689 " in rows[1] and "fp8 w8a8" in rows[1] and rows[1].endswith("44.5%")
    whole = f"({out['table'][0]['total_tokens_per_s']:,.0f})"
    assert whole in rows[0]
    assert "GPU memory free at each engine's start: 79.00 / 79.00 GiB" in format_numerics(out)
