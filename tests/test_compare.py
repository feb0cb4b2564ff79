"""compare(): span-by-span prediction errors on hand-made timelines with exactly known answers."""

import json
import math

import numpy as np
import pytest

from nfsearch.compare import compare, format_table
from nfsearch.errors import NfsearchError
from nfsearch.timeline import Span, Timeline


def _sequence(label: str, items: list[tuple[str, float]], start: float = 0.0) -> Timeline:
    spans, now = [], start
    for span_id, duration in items:
        layer, rest = span_id.split(".", 1)
        op = rest.split("#")[0]
        cls = "memory" if op == "decode_attn" else "compute"
        spans.append(Span(span_id, op, int(layer[1:]), cls, cls, 64, 128, now, now + duration))
        now += duration
    return Timeline(label, tuple(spans), 2)


PREDICTED = _sequence("pred", [("L0.kqv#0", 1.0), ("L0.kqv#1", 2.0), ("L0.decode_attn#0", 3.0),
                               ("L1.kqv#0", 1.5), ("L1.kqv#1", 2.5), ("L1.o#0", 0.25)])
MEASURED = _sequence("meas", [("L0.kqv#0", 0.5), ("L0.kqv#1", 2.0), ("L0.decode_attn#0", 4.0),
                              ("L1.kqv#0", 2.0), ("L1.kqv#1", 2.0), ("L1.d#0", 0.5)], start=100.0)


def test_errors_exact():
    cmp = compare(PREDICTED, MEASURED, allow_extra_measured=True)
    got = {s.id: (s.predicted_ms, s.measured_ms, s.rel_error) for s in cmp.spans}
    assert got == {"L0.kqv#0": (1.0, 0.5, 1.0), "L0.kqv#1": (2.0, 2.0, 0.0),
                   "L0.decode_attn#0": (3.0, 4.0, -0.25), "L1.kqv#0": (1.5, 2.0, -0.25),
                   "L1.kqv#1": (2.5, 2.0, 0.25)}
    assert cmp.spans[0].id == "L0.kqv#0"                # measured start order
    assert cmp.only_predicted == ("L1.o#0",) and cmp.only_measured == ("L1.d#0",)
    # |errors| sorted: 0, .25, .25, .25, 1 -> median .25; p90 at rank 3.6 -> .25 + .6 * .75
    assert cmp.median_abs_rel_error == 0.25
    assert cmp.p90_abs_rel_error == pytest.approx(0.7, abs=1e-12)
    assert cmp.p90_abs_rel_error == pytest.approx(np.percentile([1, 0, .25, .25, .25], 90), abs=1e-12)
    assert cmp.predicted_makespan_ms == 10.25 and cmp.measured_makespan_ms == 11.0
    assert cmp.makespan_rel_error == pytest.approx(-0.75 / 11.0, abs=1e-15)


def test_by_op_and_dict():
    cmp = compare(PREDICTED, MEASURED, allow_extra_measured=True)
    rows = {r["op"]: r for r in cmp.by_op()}
    assert rows["kqv"]["count"] == 4
    assert rows["kqv"]["predicted_ms"] == 7.0 and rows["kqv"]["measured_ms"] == 6.5
    assert rows["kqv"]["rel_error"] == pytest.approx(0.5 / 6.5)
    data = json.loads(json.dumps(cmp.to_dict()))
    assert data["matched"] == 5 and data["median_abs_rel_error"] == 0.25
    assert data["spans"][2] == {"id": "L0.decode_attn#0", "op": "decode_attn", "layer": 0,
                                "op_class": "memory", "predicted_ms": 3.0, "measured_ms": 4.0,
                                "rel_error": -0.25}
    assert data["predicted_layer_time_ms"] == 10.25 / 2


def test_format_table():
    text = format_table(compare(PREDICTED, MEASURED, allow_extra_measured=True))
    assert "median 25.0%" in text and "p90 70.0%" in text
    assert "-6.8%" in text                                           # makespan error
    assert "L0.kqv#0" in text and "+100.0%" in text                  # the worst span first
    assert "1 only predicted, 1 only measured" in text
    assert len(text.splitlines()) < 25


def test_zero_measured_duration():
    pred = _sequence("p", [("L0.kqv#0", 1.0), ("L0.o#0", 1.0)])
    meas = _sequence("m", [("L0.kqv#0", 0.0), ("L0.o#0", 1.0)])
    cmp = compare(pred, meas)
    assert math.isinf(cmp.spans[0].rel_error) or math.isinf(cmp.spans[1].rel_error)
    assert json.loads(json.dumps(cmp.to_dict()))["p90_abs_rel_error"] is None
    assert "inf" in format_table(cmp)


def test_no_common_ids():
    other = _sequence("gpu run", [("L5.x#0", 1.0)])
    with pytest.raises(NfsearchError, match="no span ids in common between 'pred' and 'gpu run'"):
        compare(PREDICTED, other)


def test_duplicate_ids():
    dup = Timeline("dup", PREDICTED.spans + PREDICTED.spans[:1], 2)
    with pytest.raises(NfsearchError, match="L0.kqv#0 twice"):
        compare(dup, MEASURED, allow_extra_measured=True)


def test_measured_spans_the_prediction_lacks_are_refused():
    with pytest.raises(NfsearchError, match="1 span\\(s\\) the prediction 'pred' lacks \\(e.g. L1.d#0\\)") as err:
        compare(PREDICTED, MEASURED)
    assert "\n" not in str(err.value)
    # a measurement that lacks some predicted spans is fine
    cmp = compare(PREDICTED, _sequence("part", [("L0.kqv#0", 0.5), ("L0.kqv#1", 2.0)]))
    assert cmp.only_predicted == ("L0.decode_attn#0", "L1.kqv#0", "L1.kqv#1", "L1.o#0") and not cmp.only_measured


def test_measurement_of_no_time_is_refused():
    zero = _sequence("zero", [("L0.kqv#0", 0.0), ("L0.kqv#1", 0.0)])
    with pytest.raises(NfsearchError, match="spans no time"):
        compare(PREDICTED, zero)


# ---- the timeline JSON form (a run's measured.json) --------------------------------------------------

def test_timeline_json_round_trip():
    from nfsearch.timeline import timeline_from_dict, timeline_to_dict
    data = json.loads(json.dumps(timeline_to_dict(MEASURED)))
    assert timeline_from_dict(data) == MEASURED
    assert timeline_from_dict({"timeline": data, "gpu": "x"}) == MEASURED       # inside a run report


@pytest.mark.parametrize("change,match", [
    (lambda d: d["spans"][0].update(start_ms=math.nan), "start_ms must be a finite number"),
    (lambda d: d["spans"][0].update(end_ms=math.inf), "end_ms must be a finite number"),
    (lambda d: d["spans"][1].update(end_ms=0.0), "ends before it starts"),
    (lambda d: d["spans"][0].update(layer="0"), "layer must be an integer"),
    (lambda d: d["spans"][0].update(sm_count=-1), "sm_count"),
    (lambda d: d["spans"][0].update(colour="red"), "not a measured timeline"),
    (lambda d: d.update(num_layers=0), "num_layers"),
    (lambda d: d.update(num_layers=2.5), "num_layers"),
    (lambda d: d.update(spans="x"), "spans must be a list"),
    (lambda d: d.pop("label"), "not a measured timeline"),
])
def test_bad_timelines_refused_one_line(change, match):
    from nfsearch.timeline import timeline_from_dict, timeline_to_dict
    data = json.loads(json.dumps(timeline_to_dict(MEASURED)))
    change(data)
    with pytest.raises(NfsearchError, match=match) as err:
        timeline_from_dict(data, "m.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("m.json: ")
