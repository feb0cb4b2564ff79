"""Latency against request rate for a `bench --url` sweep: a PNG and a self-contained HTML page (the
same figure as inline SVG, and the table), both beside the sweep's JSON."""

from __future__ import annotations

import html
import io
from pathlib import Path


def _figure(sweep: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    points = sweep["points"]
    rates = [p["request_rate"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stat, style in (("mean", "o-"), ("p90", "s-"), ("p99", "^:")):
        left.plot(rates, [p["normalised_latency_ms"][stat] for p in points], style, label=f"normalised {stat}")
    left.axhline(sweep["slo_ms"], color="red", linestyle="--", label=f"SLO {sweep['slo_ms']:g} ms/token")
    for ax in (left, right):
        if sweep["max_rate_meeting_slo"] is not None:
            ax.axvline(sweep["max_rate_meeting_slo"], color="green", linestyle=":",
                       label=f"best {sweep['max_rate_meeting_slo']:g} req/s")
        ax.set_xlabel("request rate (req/s)")
        ax.grid(True, alpha=0.3)
        if len(rates) > 1 and max(rates) / min(rates) >= 8:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    left.set_ylabel("ms per output token")
    left.set_title(f"normalised latency (SLO on the {sweep['slo_stat']})")
    for name, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "end-to-end")):
        for stat, style in (("p50", "o-"), ("p90", "s--")):
            right.plot(rates, [p[name][stat] for p in points], style, label=f"{label} {stat}")
    right.set_yscale("log")
    right.set_ylabel("ms")
    right.set_title("latency")
    left.legend(fontsize=8)
    right.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{sweep['model']} at {sweep['url']}", fontsize=10)
    fig.tight_layout()
    return fig, plt


def write_plots(sweep: dict, png_path: str | Path, html_path: str | Path) -> None:
    fig, plt = _figure(sweep)
    try:
        fig.savefig(png_path, dpi=110)
        svg = io.StringIO()
        fig.savefig(svg, format="svg")
    finally:
        plt.close(fig)
    svg_text = svg.getvalue()
    svg_text = svg_text[svg_text.index("<svg"):]          # drop the XML prolog and doctype: inline in HTML
    Path(html_path).write_text(_page(sweep, svg_text))


def _page(sweep: dict, svg: str) -> str:
    def cell(p, name, stat):
        x = p[name][stat]
        return "-" if x is None else f"{x:.1f}"
    rows = "\n".join(
        f"<tr><td>{p['request_rate']:g}</td><td>{p['request_throughput']:.2f}</td>"
        f"<td>{p['output_tokens_per_s']:.1f}</td><td>{cell(p, 'ttft_ms', 'p90')}</td>"
        f"<td>{cell(p, 'tpot_ms', 'p90')}</td><td>{cell(p, 'normalised_latency_ms', 'mean')}</td>"
        f"<td>{cell(p, 'normalised_latency_ms', 'p90')}</td><td>{'ok' if p['meets_slo'] else 'saturated' if p.get('is_saturated') else 'broken'}</td></tr>"
        for p in sweep["points"])
    best = sweep["max_rate_meeting_slo"]
    title = html.escape(f"nfsearch bench --url sweep: {sweep['model']} at {sweep['url']}")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head>
<body><h2>{title}</h2>
<p>Highest rate meeting {sweep['slo_ms']:g} ms per output token ({html.escape(sweep['slo_stat'])} of the normalised
latency, end-to-end / output tokens): <b>{'none of the rates tried' if best is None else f'{best:g} req/s'}</b>.
Sweep {html.escape(sweep['mode'])}, {sweep['duration_s']:.1f} s, stopped: {html.escape(sweep['stopped'])}.</p>
{svg}
<table><tr><th>rate/s</th><th>req/s</th><th>output tok/s</th><th>TTFT p90 ms</th><th>TPOT p90 ms</th>
<th>normalised mean</th><th>normalised p90</th><th>SLO</th></tr>
{rows}
</table></body></html>
"""
