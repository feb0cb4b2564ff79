"""A profile's calibration: per-op-class correction factors of the co-run stretch (the data type).

`nfsearch calibrate` (calibrate.py) fits it from measured plan timelines and stores it in the
profile's metadata under "calibration"; the cost model applies it only where a profile has one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nfsearch.errors import NfsearchError
from nfsearch.graph import OP_CLASSES

CALIBRATION_KEY = "calibration"
FACTOR_RANGE = (0.5, 3.0)


@dataclass(frozen=True)
class ClassFactor:
    op_class: str
    factor: float
    num_corun_spans: int
    num_solo_spans: int
    corun_ratio: float          # median measured / predicted over co-run spans
    solo_ratio: float           # the solo median it was divided by

    def __post_init__(self):
        if self.op_class not in OP_CLASSES:
            raise NfsearchError(f"calibration: unknown op class {self.op_class!r}")
        lo, hi = FACTOR_RANGE
        for key in ("factor", "corun_ratio", "solo_ratio"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise NfsearchError(f"calibration: {self.op_class} {key} must be a positive number, not {value!r}")
        if not lo <= self.factor <= hi:
            raise NfsearchError(f"calibration: {self.op_class} factor {self.factor:g} outside {lo:g}..{hi:g}")
        for key in ("num_corun_spans", "num_solo_spans"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise NfsearchError(f"calibration: {self.op_class} {key} must be an integer >= 0, not {value!r}")


@dataclass(frozen=True)
class Calibration:
    """Per-op-class correction factors of the co-run stretch, and what they were fitted on."""
    factors: tuple[ClassFactor, ...]
    sources: tuple[str, ...]            # one line per measured run folded in

    def __post_init__(self):
        object.__setattr__(self, "factors", tuple(self.factors))
        object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
        classes = [f.op_class for f in self.factors]
        if len(set(classes)) != len(classes):
            raise NfsearchError("calibration: an op class appears twice")
        if not self.sources:
            raise NfsearchError("calibration: no measured run named")

    def factor(self, op_class: str) -> float:
        """The factor of a class (1 where the runs had too few co-run spans of it)."""
        return next((f.factor for f in self.factors if f.op_class == op_class), 1.0)

    @property
    def label(self) -> str:
        shown = ", ".join(f"{f.op_class} x{f.factor:.3f}" for f in self.factors) or "no class with enough spans"
        return f"calibrated co-run stretch ({shown}; from {len(self.sources)} measured plan run(s))"

    def to_dict(self) -> dict:
        return {"factors": [{"op_class": f.op_class, "factor": f.factor, "num_corun_spans": f.num_corun_spans,
                             "num_solo_spans": f.num_solo_spans, "corun_ratio": f.corun_ratio,
                             "solo_ratio": f.solo_ratio} for f in self.factors],
                "sources": list(self.sources)}

    @classmethod
    def from_dict(cls, d, where: str = "calibration") -> Calibration:
        try:
            return cls(tuple(ClassFactor(**f) for f in d["factors"]), tuple(d["sources"]))
        except NfsearchError as exc:
            raise NfsearchError(f"{where}: {exc}") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise NfsearchError(f"{where}: not a calibration ({type(exc).__name__}: {exc})") from None


def calibration_from_meta(meta: dict) -> Calibration | None:
    """The profile's calibration, or None where it has none."""
    entry = meta.get(CALIBRATION_KEY) if isinstance(meta, dict) else None
    return None if entry is None else Calibration.from_dict(entry, "profile calibration")


def without_calibration(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != CALIBRATION_KEY}
