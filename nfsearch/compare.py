"""Compare a predicted timeline with a measured one, span by span (matched by nano-op id).

Relative errors are those of the prediction against the measurement:
    rel_error = (predicted - measured) / measured
so +0.10 means the model predicted 10% too long. The median and p90 are of |rel_error| over the
matched spans (p90 by linear interpolation between order statistics, numpy's default).
"""

import math
from dataclasses import dataclass

from nfsearch.errors import NfsearchError
from nfsearch.timeline import Span, Timeline


@dataclass(frozen=True)
class SpanError:
    id: str
    op: str
    layer: int
    op_class: str
    predicted_ms: float
    measured_ms: float

    @property
    def rel_error(self) -> float:
        return _rel(self.predicted_ms, self.measured_ms)

    def to_dict(self) -> dict:
        return {"id": self.id, "op": self.op, "layer": self.layer, "op_class": self.op_class,
                "predicted_ms": self.predicted_ms, "measured_ms": self.measured_ms,
                "rel_error": _finite(self.rel_error)}


@dataclass(frozen=True)
class Comparison:
    predicted_label: str
    measured_label: str
    spans: tuple[SpanError, ...]            # matched spans, in measured start order
    only_predicted: tuple[str, ...]         # ids the measurement lacks
    only_measured: tuple[str, ...]          # ids the prediction lacks
    predicted_makespan_ms: float
    measured_makespan_ms: float
    num_layers: int

    @property
    def makespan_rel_error(self) -> float:
        return _rel(self.predicted_makespan_ms, self.measured_makespan_ms)

    @property
    def median_abs_rel_error(self) -> float:
        return _percentile([abs(s.rel_error) for s in self.spans], 50.0)

    @property
    def p90_abs_rel_error(self) -> float:
        return _percentile([abs(s.rel_error) for s in self.spans], 90.0)

    def by_op(self) -> list[dict]:
        """Durations summed over every layer and nano-batch of each op, in first-seen order."""
        rows: dict[str, dict] = {}
        for s in self.spans:
            row = rows.setdefault(s.op, {"op": s.op, "op_class": s.op_class, "count": 0,
                                         "predicted_ms": 0.0, "measured_ms": 0.0})
            row["count"] += 1
            row["predicted_ms"] += s.predicted_ms
            row["measured_ms"] += s.measured_ms
        for row in rows.values():
            row["rel_error"] = _rel(row["predicted_ms"], row["measured_ms"])
        return list(rows.values())

    def to_dict(self) -> dict:
        return {
            "predicted_label": self.predicted_label,
            "measured_label": self.measured_label,
            "num_layers": self.num_layers,
            "predicted_makespan_ms": self.predicted_makespan_ms,
            "measured_makespan_ms": self.measured_makespan_ms,
            "makespan_rel_error": _finite(self.makespan_rel_error),
            "predicted_layer_time_ms": self.predicted_makespan_ms / self.num_layers,
            "measured_layer_time_ms": self.measured_makespan_ms / self.num_layers,
            "matched": len(self.spans),
            "median_abs_rel_error": _finite(self.median_abs_rel_error),
            "p90_abs_rel_error": _finite(self.p90_abs_rel_error),
            "only_predicted": list(self.only_predicted),
            "only_measured": list(self.only_measured),
            "by_op": [{**row, "rel_error": _finite(row["rel_error"])} for row in self.by_op()],
            "spans": [s.to_dict() for s in self.spans],
        }


def compare(predicted: Timeline, measured: Timeline, allow_extra_measured: bool = False) -> Comparison:
    """Span-by-span errors. A measurement may lack predicted spans (only_predicted); spans the
    prediction does not have mean it is of another plan, refused unless `allow_extra_measured`."""
    pred, meas = _ids(predicted, "predicted"), _ids(measured, "measured")
    common = set(pred) & set(meas)
    if not common:
        raise NfsearchError(
            f"no span ids in common between '{predicted.label}' and '{measured.label}' "
            f"(predicted ids look like {_example(pred)}, measured ones like {_example(meas)})")
    extra = sorted(set(meas) - common)
    if extra and not allow_extra_measured:
        raise NfsearchError(f"measured timeline '{measured.label}' has {len(extra)} span(s) the prediction "
                            f"'{predicted.label}' lacks (e.g. {', '.join(extra[:2])}): a run of another plan?")
    if measured.makespan_ms <= 0:
        raise NfsearchError(f"measured timeline '{measured.label}' spans no time (makespan 0 ms)")
    order = sorted(common, key=lambda i: (meas[i].start_ms, i))
    spans = tuple(SpanError(i, pred[i].op, pred[i].layer, pred[i].op_class,
                            pred[i].duration_ms, meas[i].duration_ms) for i in order)
    return Comparison(predicted.label, measured.label, spans,
                      tuple(sorted(set(pred) - common)), tuple(sorted(set(meas) - common)),
                      predicted.makespan_ms, measured.makespan_ms, predicted.num_layers)


def format_table(cmp: Comparison, worst: int = 5) -> str:
    """A short text table: the headline errors, per-op totals, and the worst-predicted spans."""
    lines = [f"predicted: {cmp.predicted_label}", f"measured:  {cmp.measured_label}",
             (f"makespan   predicted {cmp.predicted_makespan_ms:9.4f} ms   measured "
              f"{cmp.measured_makespan_ms:9.4f} ms   error {_pct(cmp.makespan_rel_error)}"),
             (f"spans      {len(cmp.spans)} matched, |rel error| median {_pct(cmp.median_abs_rel_error, 0)}"
              f"  p90 {_pct(cmp.p90_abs_rel_error, 0)}")]
    if cmp.only_predicted or cmp.only_measured:
        lines.append(f"unmatched  {len(cmp.only_predicted)} only predicted, "
                     f"{len(cmp.only_measured)} only measured")
    lines += ["", "error = predicted / measured - 1 (positive: predicted too long)",
              f"{'op':<16}{'class':<9}{'n':>4}{'pred ms':>11}{'meas ms':>11}{'error':>9}"]
    for row in cmp.by_op():
        lines.append(f"{row['op']:<16}{row['op_class']:<9}{row['count']:>4}{row['predicted_ms']:>11.4f}"
                     f"{row['measured_ms']:>11.4f}{_pct(row['rel_error']):>9}")
    if worst > 0:
        lines += ["", f"{'worst spans':<24}{'pred us':>11}{'meas us':>11}{'error':>9}"]
        for s in sorted(cmp.spans, key=lambda s: (-abs(s.rel_error), s.id))[:worst]:
            lines.append(f"{s.id:<24}{s.predicted_ms * 1000:>11.1f}{s.measured_ms * 1000:>11.1f}"
                         f"{_pct(s.rel_error):>9}")
    return "\n".join(lines)


def _ids(timeline: Timeline, which: str) -> dict[str, Span]:
    spans: dict[str, Span] = {}
    for span in timeline.spans:
        if span.id in spans:
            raise NfsearchError(f"{which} timeline '{timeline.label}' has span id {span.id} twice")
        spans[span.id] = span
    if not spans:
        raise NfsearchError(f"{which} timeline '{timeline.label}' has no spans")
    return spans


def _example(spans: dict[str, Span]) -> str:
    return ", ".join(sorted(spans)[:2])


def _rel(predicted: float, measured: float) -> float:
    if measured > 0:
        return (predicted - measured) / measured
    return 0.0 if predicted == measured else math.inf


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    if math.isinf(ordered[high]) or low == high:
        return ordered[high] if position > low else ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _pct(value: float, signed: bool = True) -> str:
    if not math.isfinite(value):
        return "inf"
    return f"{value * 100:+.1f}%" if signed else f"{value * 100:.1f}%"
