"""Report writers: PNG, self-contained HTML, Perfetto trace, atomic writes."""

import html
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from nfsearch import report
from nfsearch.errors import NfsearchError
from nfsearch.report import gantt_html, gantt_png, perfetto_trace, write_all
from nfsearch.timeline import Span, Timeline


def _timeline(label: str, shift: float = 0.0) -> Timeline:
    rows = [  # id, op, layer, class, stream, sms, tokens, start, end
        ("L0.kqv#0", "kqv", 0, "compute", "s-compute", 96, 512, 0.0, 0.125),
        ("L0.kqv#1", "kqv", 0, "compute", "s-compute", 96, 512, 0.125, 0.3),
        ("L0.decode_attn#0", "decode_attn", 0, "memory", "s-memory", 36, 256, 0.125, 0.6),
        ("L0.allreduce_o#0", "allreduce_o", 0, "network", "s-net", 16, 1024, 0.6, 0.7),
        ("L1.norm1#0", "norm1", 1, "other", "s-other", 36, 1024, 0.7, 0.7125),
        ("L1.kqv#0", "kqv", 1, "compute", "s-compute", 96, 1024, 0.7125, 1.0),
    ]
    spans = tuple(Span(i, o, layer, c, s, sm, n, a + shift, b + shift)
                  for i, o, layer, c, s, sm, n, a, b in rows)
    return Timeline(label, spans, 2)


@pytest.fixture(scope="module")
def w2_timelines():
    from nfsearch.search.baselines import equal_split_plan
    from nfsearch.cost import default_profile, make_problem
    from nfsearch.simulate import replay
    from nfsearch.specs import load_model, load_workload
    model, workload = load_model("llama-3-8b"), load_workload("W2")
    problem = make_problem(model, workload, default_profile(model, workload))
    result = replay(equal_split_plan(problem), problem.cost)
    return [result.timeline, result.stated]


def test_import_is_cheap():
    code = "import sys, nfsearch.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_png_is_valid(tmp_path, w2_timelines):
    path = gantt_png(w2_timelines, tmp_path / "g.png", "W2 equal split")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 1000 and height >= 400
    assert len(data) > 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]      # no temporary left behind


def test_png_many_spans(tmp_path):
    spans = tuple(Span(f"L{k // 40}.op{k % 10}#{k % 4}", f"op{k % 10}", k // 40, cls, cls, 16 + k % 100,
                       64, k * 0.01, k * 0.01 + 0.009)
                  for k in range(400) for cls in [("compute", "memory", "other")[k % 3]])
    path = gantt_png([Timeline("dense", spans, 10)], tmp_path / "dense.png", "")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_long_labels_wrap_inside_the_figure(tmp_path):
    """A replay's label can run to a thousand characters: each subplot title stays inside the figure,
    in at most TITLE_LINES lines, the figures (makespan, ms/layer) kept; the HTML summary has it whole."""
    from matplotlib.text import Text

    label = "predicted (calibrated " + ", ".join(f"op{k} x1.{k:02d} solo, x0.9{k % 10} co-run" for k in range(40)) + ")"
    assert len(label) > 900
    timelines = [_timeline(label), _timeline("short label", shift=0.5)]
    fig = report._figure(timelines, "a title")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width = report.title_chars((report.RIGHT - report.LEFT) * report.FIG_WIDTH_IN * 72)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    for text, timeline in zip(titles, timelines):
        lines = text.split("\n")
        assert 1 <= len(lines) <= report.TITLE_LINES and all(len(line) <= width for line in lines)
        assert f"makespan {timeline.makespan_ms:.3f} ms" in lines[-1]
    assert titles[0].startswith("predicted (calibrated op0") and "…" in titles[0]
    assert titles[1] == "short label   —   makespan 1.000 ms, 0.500 ms/layer over 2 layer(s), 6 spans"
    drawn = [a for a in fig.findobj(Text) if a.get_text() in titles]
    assert len(drawn) == 2
    for artist in drawn:
        box = artist.get_window_extent(renderer)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
    report._close(fig)
    page = gantt_html(timelines, tmp_path / "g.html", "t").read_text()
    assert html.escape(label) in page


def test_html_self_contained(tmp_path):
    timelines = [_timeline("predicted <x>"), _timeline("measured", shift=5.0)]
    text = gantt_html(timelines, tmp_path / "g.html", "two & more").read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text
    assert not re.search(r"<script|<link|@import|<iframe|<img", text, re.IGNORECASE)
    refs = re.findall(r"\b(?:src|href)\s*=\s*[\"']([^\"']*)", text, re.IGNORECASE)
    assert all(ref.startswith("#") for ref in refs)                  # only in-page glyph references
    urls = re.findall(r"https?://[^\"'\s<>)]*", text)
    assert set(urls) <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
    for url in urls:                 # only as namespace declarations
        assert re.search(rf'xmlns(:xlink)?="{re.escape(url)}"', text)
    for stream in ("s-compute", "s-memory", "s-net", "s-other"):
        assert stream in text
    assert "predicted &lt;x&gt;" in text and "two &amp; more" in text
    assert "L0.decode_attn#0" in text and "1.0000" in text           # table row and makespan
    assert text.count("<title>") == 1 + 12                            # page + one tooltip per span


def test_trace_events(tmp_path):
    timelines = [_timeline("predicted"), _timeline("measured", shift=3.3)]
    data = json.loads(perfetto_trace(timelines, tmp_path / "t.json").read_text())
    events = data["traceEvents"]
    for pid, timeline in enumerate(timelines, start=1):
        names = {e["args"]["name"]: e["tid"] for e in events
                 if e["ph"] == "M" and e["name"] == "thread_name" and e["pid"] == pid}
        assert set(names) == set(timeline.streams)
        procs = [e for e in events if e["ph"] == "M" and e["name"] == "process_name" and e["pid"] == pid]
        assert procs[0]["args"]["name"] == timeline.label
        xs = {e["name"]: e for e in events if e["ph"] == "X" and e["pid"] == pid}
        assert len(xs) == len(timeline.spans) == len([e for e in events if e["ph"] == "X" and e["pid"] == pid])
        for span in timeline.spans:
            event = xs[span.id]
            assert event["ts"] == span.start_ms * 1000.0
            assert event["dur"] == span.duration_ms * 1000.0
            assert event["tid"] == names[span.stream]
            assert event["args"] == {"op": span.op, "layer": span.layer, "op_class": span.op_class,
                                     "sm_count": span.sm_count, "tokens": span.num_tokens}


def test_unwritable_paths(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    timelines = [_timeline("t")]
    for writer in (gantt_png, gantt_html):
        with pytest.raises(NfsearchError) as err:
            writer(timelines, blocker / "out.png", "t")
        assert "\n" not in str(err.value)
    with pytest.raises(NfsearchError):
        perfetto_trace(timelines, tmp_path / "missing" / "t.json")
    (tmp_path / "adir").mkdir()
    with pytest.raises(NfsearchError):
        gantt_png(timelines, tmp_path / "adir", "t")                  # a directory is in the way
    with pytest.raises(NfsearchError):
        write_all(timelines, blocker / "x", "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "file"]
    assert list((tmp_path / "adir").iterdir()) == []


def test_empty_timeline_is_an_error(tmp_path):
    with pytest.raises(NfsearchError):
        gantt_png([Timeline("empty", (), 1)], tmp_path / "e.png", "")
    with pytest.raises(NfsearchError):
        perfetto_trace([], tmp_path / "e.json")
    assert list(tmp_path.iterdir()) == []


def test_write_all(tmp_path, w2_timelines):
    paths = write_all(w2_timelines, tmp_path / "w2", "W2")
    assert {k: p.name for k, p in paths.items()} == {"html": "w2.html", "png": "w2.png",
                                                      "trace": "w2.trace.json"}
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w2.html", "w2.png", "w2.trace.json"]
    into_dir = write_all(w2_timelines[:1], tmp_path, "W2")
    assert into_dir["png"] == tmp_path / "timeline.png" and into_dir["png"].is_file()
