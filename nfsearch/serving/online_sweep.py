"""`nfsearch bench --url` over several request rates: the highest rate that meets the SLO.

NanoFlow's online SLO is on normalised latency (end-to-end latency / output tokens, 200 ms per output
token by default), read at the p90 of the requests or their mean (slo_stat). A rate meets it when
every request finished and that statistic is at most slo_ms. Rates are a given list, or `auto`:
start_rate, doubled until a rate breaks the SLO. Either way the sweep stops before a point that
would not fit in what is left of max_duration_s (its sending time, n / rate, plus the previous
point's drain), and each point's requests time out at what is left, so the whole sweep fits a
bounded call. A trace has a fixed number of requests, so past the rate the server sustains, a higher
rate only sends them closer to all at once: a point whose completed requests per second fall under
half the offered rate is saturated, never counts as meeting the SLO, and ends an auto sweep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from nfsearch.errors import NfsearchError
from nfsearch.serving.online_bench import run_online_bench

SLO_STATS = ("p90", "mean")
MAX_AUTO_POINTS = 16             # 1 req/s doubled 16 times: 65,536 req/s, past any server
SATURATED_FRACTION = 0.5         # completed / offered requests per second under this: saturated


@dataclass
class SweepOptions:
    rates: list[float] | None    # None: auto (double from start_rate until the SLO breaks)
    start_rate: float = 1.0
    max_duration_s: float = 540.0
    slo_ms: float = 200.0
    slo_stat: str = "p90"        # "p90" | "mean" of the normalised latency
    max_concurrency: int | None = None
    seed: int = 0


def parse_rates(text: str) -> list[float]:
    """'4' or '1,2,4,8' -> positive finite rates in increasing order."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise NfsearchError(f"--request-rate {text!r}: expected a number or a list like 1,2,4,8") from None
    if not rates or any(not 0 < r < float("inf") for r in rates):
        raise NfsearchError(f"--request-rate {text!r}: rates must be positive and finite")
    return sorted(set(rates))


def slo_value_ms(report: dict, slo_stat: str) -> float | None:
    return report["normalised_latency_ms"][slo_stat]


def meets_slo(report: dict, slo_ms: float, slo_stat: str) -> bool:
    value = slo_value_ms(report, slo_stat)
    return report["num_finished"] == report["num_requests"] and value is not None and value <= slo_ms


def _rates(opts: SweepOptions):
    if opts.rates is not None:
        yield from opts.rates
        return
    for k in range(MAX_AUTO_POINTS):
        yield opts.start_rate * 2 ** k


def run_sweep(url: str, requests: list, opts: SweepOptions, echo=print, run_one=run_online_bench) -> dict:
    """Every rate's online report (online_bench's dict, plus meets_slo), the highest rate meeting the SLO."""
    if opts.slo_stat not in SLO_STATS:
        raise NfsearchError(f"--slo-stat {opts.slo_stat!r}: use one of {', '.join(SLO_STATS)}")
    start, points, stopped, drain_s = time.perf_counter(), [], "done", 0.0
    for rate in _rates(opts):
        left_s = opts.max_duration_s - (time.perf_counter() - start)
        if len(requests) / rate + drain_s > left_s:
            stopped = f"the next rate ({rate:g}/s) would not fit the {opts.max_duration_s:g} s budget"
            break
        report = run_one(url, requests, rate, opts.max_concurrency, opts.slo_ms, opts.seed, timeout_s=left_s)
        report["is_saturated"] = report["request_throughput"] < SATURATED_FRACTION * rate
        report["meets_slo"] = meets_slo(report, opts.slo_ms, opts.slo_stat) and not report["is_saturated"]
        points.append(report)
        drain_s = max(0.0, report["duration_s"] - len(requests) / rate)
        value = slo_value_ms(report, opts.slo_stat)
        echo(f"  rate {rate:g}/s: normalised latency {opts.slo_stat} "
             f"{'-' if value is None else f'{value:.1f}'} ms/token, {report['num_finished']}/"
             f"{report['num_requests']} finished, {report['output_tokens_per_s']:.1f} output tok/s -> "
             f"{_verdict(report)} the {opts.slo_ms:g} ms SLO")
        if opts.rates is None and not report["meets_slo"]:
            stopped = (f"saturated at {rate:g}/s ({report['request_throughput']:.2f} req/s completed)"
                       if report["is_saturated"] else "the SLO broke")
            break
    else:
        if opts.rates is None:
            stopped = f"{MAX_AUTO_POINTS} doublings"
    good = [p["request_rate"] for p in points if p["meets_slo"]]
    return {"url": points[0]["url"] if points else url, "model": points[0]["model"] if points else None,
            "slo_ms": opts.slo_ms, "slo_stat": opts.slo_stat, "slo_metric": "normalised latency (e2e / output tokens)",
            "mode": "auto" if opts.rates is None else "list", "max_duration_s": opts.max_duration_s,
            "duration_s": time.perf_counter() - start, "stopped": stopped,
            "max_rate_meeting_slo": max(good) if good else None, "points": points}


def _verdict(report: dict) -> str:
    return "meets" if report["meets_slo"] else "saturated: not counted for" if report["is_saturated"] else "breaks"


def format_sweep(sweep: dict) -> str:
    best = sweep["max_rate_meeting_slo"]
    head = (f"{sweep['model']} at {sweep['url']}: {len(sweep['points'])} rates in {sweep['duration_s']:.1f} s "
            f"({sweep['mode']}; stopped: {sweep['stopped']})")
    rows = [(f"  {'rate/s':>8} {'req/s':>8} {'out tok/s':>10} {'TTFT p90':>9} {'TPOT p90':>9} "
            f"{'norm mean':>9} {'norm p90':>9}  SLO")]

    def v(p, name, stat):
        x = p[name][stat]
        return "-" if x is None else f"{x:.1f}"
    for p in sweep["points"]:
        rows.append(f"  {p['request_rate']:>8g} {p['request_throughput']:>8.2f} {p['output_tokens_per_s']:>10.1f} "
                    f"{v(p, 'ttft_ms', 'p90'):>9} {v(p, 'tpot_ms', 'p90'):>9} {v(p, 'normalised_latency_ms', 'mean'):>9} "
                    f"{v(p, 'normalised_latency_ms', 'p90'):>9}  {'ok' if p['meets_slo'] else 'saturated' if p['is_saturated'] else 'broken'}")
    tail = (f"  highest rate under {sweep['slo_ms']:g} ms/token ({sweep['slo_stat']} normalised latency): "
            + (f"{best:g} req/s" if best is not None else "none of the rates tried"))
    return "\n".join([head, *rows, tail])
