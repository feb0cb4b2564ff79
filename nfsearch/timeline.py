"""One timeline type for predicted and measured runs, so one writer and one comparison serve both."""

import math
from dataclasses import asdict, dataclass

from nfsearch.errors import NfsearchError


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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

    def __post_init__(self):
        for key in ("id", "op", "op_class", "stream"):
            if not isinstance(getattr(self, key), str):
                raise NfsearchError(f"span {self.id!r}: {key} must be a string")
        for key in ("layer", "sm_count", "num_tokens"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 0:
                raise NfsearchError(f"span {self.id}: {key} must be an integer >= 0, not {getattr(self, key)!r}")
        for key in ("start_ms", "end_ms"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise NfsearchError(f"span {self.id}: {key} must be a finite number, not {value!r}")
        if self.end_ms < self.start_ms:
            raise NfsearchError(f"span {self.id} ends before it starts")

    @property
    def duration_ms(self) -> float:
        return self.end_ms - self.start_ms


@dataclass(frozen=True)
class Timeline:
    label: str              # e.g. "predicted (analytic profile of NVIDIA H100 80GB HBM3)"
    spans: tuple[Span, ...]
    num_layers: int

    def __post_init__(self):
        if not isinstance(self.label, str):
            raise NfsearchError("timeline label must be a string")
        if not _is_int(self.num_layers) or self.num_layers < 1:
            raise NfsearchError(f"timeline '{self.label}': num_layers must be a positive integer, "
                                f"not {self.num_layers!r}")

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
    return {"label": timeline.label, "num_layers": timeline.num_layers, "spans": [asdict(s) for s in timeline.spans]}


def timeline_from_dict(data: dict, where: str = "timeline") -> Timeline:
    """Read timeline_to_dict's form (or a run report holding it under "timeline"); one-line errors."""
    if isinstance(data, dict) and isinstance(data.get("timeline"), dict):
        data = data["timeline"]
    try:
        if not isinstance(data["spans"], list):
            raise TypeError("spans must be a list")
        spans = tuple(Span(**s) for s in data["spans"])
        return Timeline(data["label"], spans, data["num_layers"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise NfsearchError(f"{where}: not a measured timeline ({exc})") from None
    except NfsearchError as exc:
        raise NfsearchError(f"{where}: {exc}") from None
