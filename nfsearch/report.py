"""Timeline reports: a Gantt chart (PNG, or a self-contained HTML page with inline SVG) and a
Chrome/Perfetto trace. Predicted and measured timelines share one type, so one writer serves both.

matplotlib is imported inside the functions that draw, so importing this module stays cheap.
"""

import html
import io
import json
import re
import textwrap
from pathlib import Path

from nfsearch.errors import NfsearchError
from nfsearch.files import write_atomic, write_text_atomic
from nfsearch.timeline import Span, Timeline

CLASS_COLORS = {"compute": "#3b6fb6", "memory": "#e07b39", "network": "#3a9d5d", "other": "#8a8a8a"}
UNKNOWN_COLOR = "#b07cc6"
FIG_WIDTH_IN = 15.0
ROW_IN = 0.62                       # height of one stream row
LEFT, RIGHT = 0.085, 0.99           # axes margins as fractions of the figure width
LABEL_PT = 7.0                      # font size of the text on bars (a character is ~0.58 of it wide)
SMALL_PT = 5.5                      # for bars only wide enough for "op#index" in a smaller font
TITLE_PT = 9.0                      # a subplot's title: its timeline's label and figures
TITLE_LINES = 3                     # at most; a longer label ends in "…" (the HTML summary has it whole)
TITLE_LINE_IN = 0.16                # the height of one more title line


def gantt_png(timelines: list[Timeline], path: str | Path, title: str = "") -> Path:
    """One subplot per timeline (shared time axis), one row per stream, bars coloured by op class
    with height proportional to their SM count."""
    fig = _figure(_checked(timelines), title)
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        _close(fig)
    return Path(path)


def gantt_html(timelines: list[Timeline], path: str | Path, title: str = "") -> Path:
    """A self-contained page: the chart as inline SVG (hover a bar for its details), a summary of
    every timeline and a table of its spans. No scripts, stylesheets or fonts are fetched."""
    timelines = _checked(timelines)
    fig = _figure(timelines, title)
    try:
        svg = _svg(fig, timelines)
    finally:
        _close(fig)
    write_text_atomic(path, _page(timelines, title, svg))
    return Path(path)


def perfetto_trace(timelines: list[Timeline], path: str | Path) -> Path:
    """Chrome/Perfetto trace JSON: one process per timeline, one thread per stream, one complete
    ("X") event per span with ts/dur in microseconds."""
    write_text_atomic(path, json.dumps(trace_dict(_checked(timelines))) + "\n")
    return Path(path)


def trace_dict(timelines: list[Timeline]) -> dict:
    events = []
    for pid, timeline in enumerate(timelines, start=1):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                       "args": {"name": timeline.label}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                       "args": {"sort_index": pid}})
        tids = {stream: tid for tid, stream in enumerate(timeline.streams, start=1)}
        for stream, tid in tids.items():
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                           "args": {"name": stream}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                           "args": {"sort_index": tid}})
        for span in sorted(timeline.spans, key=lambda s: (s.start_ms, s.id)):
            events.append({"ph": "X", "name": span.id, "cat": span.op_class, "pid": pid,
                           "tid": tids[span.stream], "ts": span.start_ms * 1000.0,
                           "dur": span.duration_ms * 1000.0,
                           "args": {"op": span.op, "layer": span.layer, "op_class": span.op_class,
                                    "sm_count": span.sm_count, "tokens": span.num_tokens}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_all(timelines: list[Timeline], out: str | Path, title: str = "", notes: tuple[str, ...] = ()
              ) -> dict[str, Path]:
    """Write <prefix>.html, <prefix>.png and <prefix>.trace.json. `out` is a prefix, or an existing
    directory (then the prefix is <dir>/timeline). `notes`: lines shown under the summary table of the
    HTML page (e.g. the power bound)."""
    out = Path(out)
    prefix = out / "timeline" if out.is_dir() else out
    timelines = _checked(timelines)
    fig = _figure(timelines, title)
    paths = {"html": prefix.with_name(prefix.name + ".html"),
             "png": prefix.with_name(prefix.name + ".png"),
             "trace": prefix.with_name(prefix.name + ".trace.json")}
    try:
        write_atomic(paths["png"], lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        svg = _svg(fig, timelines)
    finally:
        _close(fig)
    write_text_atomic(paths["html"], _page(timelines, title, svg, notes))
    perfetto_trace(timelines, paths["trace"])
    return paths


# ---- drawing ----------------------------------------------------------------------------------

def _checked(timelines) -> list[Timeline]:
    if isinstance(timelines, Timeline):
        timelines = [timelines]
    timelines = list(timelines)
    if not timelines:
        raise NfsearchError("no timeline to report")
    for t in timelines:
        if not t.spans:
            raise NfsearchError(f"timeline '{t.label}' has no spans")
    return timelines


def _streams(timelines: list[Timeline]) -> list[str]:
    """Every stream of every timeline, in order of first use, so rows line up across subplots."""
    return list(dict.fromkeys(s for t in timelines for s in t.streams))


def _nano_label(span: Span) -> str:
    index = span.id.rsplit("#", 1)[1] if "#" in span.id else ""
    return f"{span.op}#{index}" if index else span.op


def _color(span: Span) -> str:
    return CLASS_COLORS.get(span.op_class, UNKNOWN_COLOR)


def _lighter(color: str, amount: float) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb
    return tuple(c + (1.0 - c) * amount for c in to_rgb(color))


def _figure(timelines: list[Timeline], title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg   # Agg on this figure only: no pyplot,
    from matplotlib.figure import Figure                           # no change to the global backend
    from matplotlib.patches import Patch

    streams = _streams(timelines)
    max_sms = max(s.sm_count for t in timelines for s in t.spans) or 1
    origin = [min(s.start_ms for s in t.spans) for t in timelines]
    x_end = max(t.makespan_ms for t in timelines)
    axes_width_pt = (RIGHT - LEFT) * FIG_WIDTH_IN * 72
    subtitles = [_subtitle(t, title_chars(axes_width_pt)) for t in timelines]
    more_in = TITLE_LINE_IN * (max(s.count("\n") for s in subtitles))    # room for the longest one
    heights = [ROW_IN * len(streams) + 0.55 for _ in timelines]
    top_in, bottom_in = (0.75 if title else 0.5) + more_in, 0.55
    fig = Figure(figsize=(FIG_WIDTH_IN, sum(heights) + top_in + bottom_in
                          + (0.15 + more_in) * len(timelines)))
    FigureCanvasAgg(fig)
    total_h = fig.get_figheight()
    fig.subplots_adjust(left=LEFT, right=RIGHT, top=1 - top_in / total_h, bottom=bottom_in / total_h,
                        hspace=(0.55 + more_in) / (sum(heights) / len(heights)))
    axes = fig.subplots(len(timelines), 1, sharex=True, squeeze=False)[:, 0]
    pt_per_ms = axes_width_pt / (x_end * 1.01)
    multi_layer = any(t.num_layers > 1 for t in timelines)
    for k, (ax, timeline, t0) in enumerate(zip(axes, timelines, origin)):
        _draw(ax, timeline, t0, streams, max_sms, pt_per_ms, multi_layer, k)
        ax.set_title(subtitles[k], fontsize=TITLE_PT, loc="left")
    axes[-1].set_xlim(0, x_end * 1.01)
    axes[-1].set_xlabel("time (ms" + (", from each timeline's first start)" if any(origin) else ")"),
                        fontsize=9)
    used = {s.op_class for t in timelines for s in t.spans}
    classes = [c for c in CLASS_COLORS if c in used] + sorted(used - set(CLASS_COLORS))
    handles = [Patch(facecolor=CLASS_COLORS.get(c, UNKNOWN_COLOR), label=c) for c in classes]
    if multi_layer:
        handles.append(Patch(facecolor=_lighter("#555555", 0.45), label="lighter: odd layers"))
    handles.append(Patch(facecolor="none", edgecolor="none", label=f"bar height ∝ SMs (full = {max_sms})"))
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(RIGHT, 1 - 0.05 / total_h))
    if title:
        fig.suptitle(title, x=LEFT, y=1 - 0.08 / total_h, ha="left", va="top", fontsize=12,
                     fontweight="bold")
    return fig


def title_chars(width_pt: float) -> int:
    """How many characters of a subplot title fit `width_pt` (a wide character is ~0.62 of the size)."""
    return int(width_pt / (0.62 * TITLE_PT))


def _subtitle(timeline: Timeline, width: int) -> str:
    """A timeline's label and figures, wrapped to `width` characters in at most TITLE_LINES lines:
    the figures always, the label shortened with "…" where it would need more (labels of calibrated
    replays run to a thousand characters)."""
    figures = (f"makespan {timeline.makespan_ms:.3f} ms, {timeline.layer_time_ms:.3f} ms/layer over "
               f"{timeline.num_layers} layer(s), {len(timeline.spans)} spans")
    one_line = f"{timeline.label}   —   {figures}"
    if len(one_line) <= width:
        return one_line
    lines = textwrap.wrap(timeline.label, width, max_lines=TITLE_LINES - 1, placeholder=" …",
                          break_on_hyphens=False) or [""]
    if len(lines[-1]) + len(figures) + 7 <= width:
        lines[-1] = f"{lines[-1]}   —   {figures}"
    else:
        lines.append(figures)
    return "\n".join(lines)


def _draw(ax, timeline: Timeline, t0: float, streams: list[str], max_sms: int, pt_per_ms: float,
          multi_layer: bool, k: int) -> None:
    row_of = {s: i for i, s in enumerate(streams)}
    for row in range(len(streams)):
        ax.axhline(row + 0.9, color="#d0d0d0", linewidth=0.6, zorder=0)
    ordered = sorted(timeline.spans, key=lambda s: (s.start_ms, s.id))
    for number, span in enumerate(ordered):
        height = 0.12 + 0.72 * span.sm_count / max_sms
        bottom = row_of[span.stream] + 0.9 - height
        color = _color(span)
        face = _lighter(color, 0.38) if multi_layer and span.layer % 2 else color
        start, width = span.start_ms - t0, span.duration_ms
        wide = width * pt_per_ms >= 5        # narrow bars get no white gap, or they fade to white
        bar = ax.barh(bottom, width, height=height, left=start, align="edge", color=face,
                      edgecolor="white" if wide else face, linewidth=0.5 if wide else 0.4, zorder=2)
        bar.patches[0].set_gid(f"nfspan-{k}-{number}")
        text, size = _fitting_text(span, width * pt_per_ms, multi_layer)
        if text:
            ax.text(start + width / 2, bottom + height / 2, text, ha="center", va="center",
                    fontsize=size, color=_text_color(face), zorder=3, clip_on=True)
    labels = []
    for stream in streams:
        sms = sorted({s.sm_count for s in timeline.spans if s.stream == stream})
        if not sms:
            labels.append(f"{stream}\n(unused)")
        elif len(sms) == 1:
            labels.append(f"{stream}\n{sms[0]} SMs")
        else:
            labels.append(f"{stream}\n{sms[0]}–{sms[-1]} SMs")
    ax.set_yticks([i + 0.5 for i in range(len(streams))], labels, fontsize=8)
    ax.tick_params(axis="y", length=0)
    ax.set_ylim(len(streams), 0)
    ax.grid(axis="x", color="#e6e6e6", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="x", labelsize=8, labelbottom=True)


def _fitting_text(span: Span, width_pt: float, multi_layer: bool) -> tuple[str, float]:
    """The longest label that fits the bar, and its font size; ("", 0) when none does."""
    name = _nano_label(span)
    choices = [f"{name} · {span.sm_count} SMs", f"{name} {span.sm_count}", name]
    if multi_layer:
        choices = [f"L{span.layer} {c}" for c in choices[:2]] + choices
    for text, size in [(c, LABEL_PT) for c in choices] + [(name, SMALL_PT)]:
        if len(text) * 0.58 * size + 3 <= width_pt:
            return text, size
    return "", 0.0


def _text_color(face) -> str:
    from matplotlib.colors import to_rgb
    r, g, b = to_rgb(face)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.6 else "white"


def _close(fig) -> None:
    fig.clear()


# ---- HTML -------------------------------------------------------------------------------------

def _svg(fig, timelines: list[Timeline]) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None,
                                                 "Type": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]                                   # drop the XML prolog / DOCTYPE
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.DOTALL)   # RDF with external namespaces
    spans = {f"nfspan-{k}-{number}": span for k, t in enumerate(timelines)
             for number, span in enumerate(sorted(t.spans, key=lambda s: (s.start_ms, s.id)))}

    def add_title(match):
        span = spans.get(match.group(1))
        if span is None:
            return match.group(0)
        tip = (f"{span.id} ({span.op_class}) on {span.stream}: {span.sm_count} SMs, "
               f"{span.num_tokens} tokens, {span.start_ms:.4f}–{span.end_ms:.4f} ms "
               f"({span.duration_ms * 1000:.1f} µs)")
        return f"{match.group(0)}<title>{html.escape(tip)}</title>"

    return re.sub(r'<g id="(nfspan-\d+-\d+)">', add_title, text)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#222}
h1{font-size:20px;margin:0 0 12px} h2{font-size:16px;margin:24px 0 6px}
.chart svg{width:100%;height:auto;max-width:1650px}
table{border-collapse:collapse;font-size:12px;font-variant-numeric:tabular-nums}
th,td{padding:2px 8px;border-bottom:1px solid #e4e4e4;text-align:right}
th{background:#f4f4f4;position:sticky;top:0} td.l,th.l{text-align:left}
.sw{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
details{margin:8px 0} summary{cursor:pointer;font-weight:600}
"""


def _page(timelines: list[Timeline], title: str, svg: str, notes: tuple[str, ...] = ()) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{esc(title or 'nfsearch timeline')}</title><style>{CSS}</style></head><body>",
             f"<h1>{esc(title or 'nfsearch timeline')}</h1>", f'<div class="chart">{svg}</div>',
             "<h2>Summary</h2>", ("<table><tr><th class=l>timeline</th><th>makespan (ms)</th>"
                                  "<th>layer time (ms)</th><th>layers</th><th>spans</th>"
                                  "<th class=l>streams</th></tr>")]
    for t in timelines:
        parts.append(f"<tr><td class=l>{esc(t.label)}</td><td>{t.makespan_ms:.4f}</td>"
                     f"<td>{t.layer_time_ms:.4f}</td><td>{t.num_layers}</td><td>{len(t.spans)}</td>"
                     f"<td class=l>{esc(', '.join(t.streams))}</td></tr>")
    parts.append("</table>")
    parts += [f"<p>{esc(note)}</p>" for note in notes]
    for i, t in enumerate(timelines):
        parts.append(f"<details{' open' if i == 0 else ''}><summary>Spans of {esc(t.label)} "
                     f"({len(t.spans)})</summary><table><tr><th class=l>id</th><th class=l>class</th>"
                     "<th class=l>stream</th><th>SMs</th><th>tokens</th><th>start (ms)</th>"
                     "<th>end (ms)</th><th>duration (µs)</th></tr>")
        for s in sorted(t.spans, key=lambda s: (s.start_ms, s.id)):
            color = CLASS_COLORS.get(s.op_class, UNKNOWN_COLOR)
            parts.append(f"<tr><td class=l>{esc(s.id)}</td><td class=l><span class=sw "
                         f'style="background:{color}"></span>{esc(s.op_class)}</td>'
                         f"<td class=l>{esc(s.stream)}</td><td>{s.sm_count}</td><td>{s.num_tokens}</td>"
                         f"<td>{s.start_ms:.4f}</td><td>{s.end_ms:.4f}</td>"
                         f"<td>{s.duration_ms * 1000:.1f}</td></tr>")
        parts.append("</table></details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
