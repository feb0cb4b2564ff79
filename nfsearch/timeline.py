"""One timeline type for predicted and measured runs, so one writer and one comparison serve both."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    id: str
    op: str
    layer: int
    op_class: str
    stream: str
    sm_count: int
    num_tokens: int
    start_ms: float
    end_ms: float

    @property
    def duration_ms(self) -> float:
        return self.end_ms - self.start_ms


@dataclass(frozen=True)
class Timeline:
    label: str              # e.g. "predicted (analytic profile of NVIDIA H100 80GB HBM3)"
    spans: tuple[Span, ...]
    num_layers: int

    @property
    def makespan_ms(self) -> float:
        return max(s.end_ms for s in self.spans) - min(s.start_ms for s in self.spans)

    @property
    def layer_time_ms(self) -> float:
        return self.makespan_ms / self.num_layers

    @property
    def streams(self) -> list[str]:
        return list(dict.fromkeys(s.stream for s in sorted(self.spans, key=lambda s: s.start_ms)))

    def by_id(self) -> dict[str, Span]:
        return {s.id: s for s in self.spans}


def timeline_to_dict(timeline: Timeline) -> dict:
    """The JSON form of a timeline (a run's measured.json)."""
    from dataclasses import asdict
    return {"label": timeline.label, "num_layers": timeline.num_layers, "spans": [asdict(s) for s in timeline.spans]}


def timeline_from_dict(data: dict, where: str = "timeline") -> Timeline:
    """Read timeline_to_dict's form (or a run report holding it under "timeline"); one-line errors."""
    from nfsearch.errors import NfsearchError
    data = data.get("timeline", data)
    try:
        spans = tuple(Span(**s) for s in data["spans"])
        return Timeline(data["label"], spans, int(data["num_layers"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise NfsearchError(f"{where}: not a measured timeline ({exc})") from None
