"""`bench --url` over several rates: auto doubling stops where the SLO breaks (or before the time budget
runs out), the highest rate under it is reported, the plot is written as PNG and HTML beside the JSON;
end to end against `nfsearch serve --max-tpot` on the tiny CPU model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from nfsearch.cli import main
from nfsearch.errors import NfsearchError
from nfsearch.serving.online_sweep import SweepOptions, parse_rates, run_sweep


def _fake_report(rate: float, norm_mean: float, norm_p90: float, num_finished: int = 4) -> dict:
    def pct(v):
        return {"mean": v, "p50": v, "p90": v, "p99": v}
    return {"url": "http://x", "model": "tiny", "request_rate": rate, "num_requests": 4, "num_finished": num_finished,
            "duration_s": 4 / rate, "request_throughput": rate, "output_tokens_per_s": 10 * rate,
            "ttft_ms": pct(5.0), "tpot_ms": pct(2.0), "e2e_ms": pct(50.0), "itl_ms": pct(2.0),
            "normalised_latency_ms": {"mean": norm_mean, "p50": norm_mean, "p90": norm_p90, "p99": norm_p90}}


def _fake_server(calls: list):
    """Normalised latency 10 ms/token x rate (mean) and 15 x rate (p90)."""
    def run_one(url, requests, rate, max_concurrency, slo_ms, seed, timeout_s):
        calls.append((rate, timeout_s))
        return _fake_report(rate, 10.0 * rate, 15.0 * rate)
    return run_one


def test_auto_sweep_doubles_until_the_slo_breaks_and_reports_the_highest_rate():
    calls = []
    sweep = run_sweep("http://x", [None] * 4, SweepOptions(None, 1.0, slo_ms=100.0, slo_stat="p90"),
                      echo=lambda line: None, run_one=_fake_server(calls))
    # p90 = 15 x rate <= 100: rates 1, 2, 4 meet it, 8 breaks it and ends the sweep
    assert [c[0] for c in calls] == [1, 2, 4, 8] and sweep["max_rate_meeting_slo"] == 4
    assert sweep["stopped"] == "the SLO broke" and [p["meets_slo"] for p in sweep["points"]] == [True] * 3 + [False]
    calls.clear()
    mean = run_sweep("http://x", [None] * 4, SweepOptions(None, 1.0, slo_ms=100.0, slo_stat="mean"),
                     echo=lambda line: None, run_one=_fake_server(calls))
    assert mean["max_rate_meeting_slo"] == 8            # mean = 10 x rate: 8 meets, 16 breaks


def test_a_rate_list_runs_every_rate_and_the_budget_bounds_the_sweep():
    calls = []
    sweep = run_sweep("http://x", [None] * 4, SweepOptions(parse_rates("8,1,2"), slo_ms=100.0),
                      echo=lambda line: None, run_one=_fake_server(calls))
    assert [c[0] for c in calls] == [1, 2, 8] and sweep["max_rate_meeting_slo"] == 2
    calls.clear()
    # each point drains 4 s after its last send: rate 1 (4 s of sends) fits a 5 s budget, rate 2 (2 + 4 s)
    # does not; the point's timeout is what is left of the budget
    def draining(url, requests, rate, *args, timeout_s):
        calls.append((rate, timeout_s))
        return _fake_report(rate, 1.0, 1.0) | {"duration_s": 4 / rate + 4}
    short = run_sweep("http://x", [None] * 4, SweepOptions(parse_rates("2,1"), max_duration_s=5.0),
                      echo=lambda line: None, run_one=draining)
    assert [c[0] for c in calls] == [1] and 4.9 < calls[0][1] <= 5.0
    assert "the next rate (2/s) would not fit" in short["stopped"] and short["max_rate_meeting_slo"] == 1
    with pytest.raises(NfsearchError, match="--request-rate"):
        parse_rates("1,x")
    with pytest.raises(NfsearchError, match="positive"):
        parse_rates("0,1")


def test_failed_requests_break_the_slo():
    calls = []

    def run_one(url, requests, rate, *args, **kw):
        calls.append(rate)
        return _fake_report(rate, 1.0, 1.0, num_finished=3)
    sweep = run_sweep("http://x", [None] * 4, SweepOptions(None), echo=lambda line: None, run_one=run_one)
    assert calls == [1.0] and sweep["max_rate_meeting_slo"] is None


def test_a_saturated_rate_does_not_count_and_ends_an_auto_sweep():
    def run_one(url, requests, rate, *args, **kw):        # the server completes at most 10 req/s
        return _fake_report(rate, 1.0, 1.0) | {"request_throughput": min(rate, 10.0)}
    sweep = run_sweep("http://x", [None] * 4, SweepOptions(None, 4.0), echo=lambda line: None, run_one=run_one)
    assert [p["request_rate"] for p in sweep["points"]] == [4, 8, 16, 32]      # 16: 10 >= 8 still counts
    assert sweep["max_rate_meeting_slo"] == 16 and sweep["stopped"].startswith("saturated at 32/s")


def test_sweep_plot_png_and_self_contained_html(tmp_path):
    from nfsearch.serving.sweep_plot import write_plots
    sweep = run_sweep("http://x", [None] * 4, SweepOptions(None, 1.0, slo_ms=100.0),
                      echo=lambda line: None, run_one=_fake_server([]))
    sweep["model"] = "tiny <model>"
    write_plots(sweep, tmp_path / "s.png", tmp_path / "s.html")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "s.html").read_text()
    assert "<svg" in page and "<script" not in page and "tiny &lt;model&gt;" in page and "4 req/s" in page


def test_bench_url_sweep_against_a_capped_server(tmp_path):
    pytest.importorskip("aiohttp")
    from test_serve import start_server
    with start_server(tmp_path, "--max-tpot", "500") as (address, _):
        out = tmp_path / "sweep.json"
        result = CliRunner().invoke(main, ["bench", "--url", f"http://{address}", "--trace", "const:12:6",
                                           "--num-requests", "4", "--request-rate", "4,8", "--slo", "1000",
                                           "--slo-stat", "mean", "--max-duration-s", "60", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "--max-tpot 500 ms: dense batch" in (tmp_path / "server.log").read_text()
    sweep = json.loads(out.read_text())
    assert [p["request_rate"] for p in sweep["points"]] == [4, 8]
    assert all(p["num_finished"] == 4 for p in sweep["points"]) and sweep["slo_stat"] == "mean"
    assert sweep["max_rate_meeting_slo"] == 8 and not any(p["is_saturated"] for p in sweep["points"])
    assert out.with_suffix(".png").stat().st_size > 0 and "<svg" in out.with_suffix(".html").read_text()
