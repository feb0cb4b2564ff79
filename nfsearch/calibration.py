"""A profile's calibration (the data type): per op class, a solo factor (what a nano-op alone takes
inside a replayed plan against the profile's time) and a co-run factor (the co-run stretch beyond
the pair table's), and the overheads between kernels (a cross-stream event wait, the gap between
two kernels of one stream), all fitted from measured plan timelines.

`nfsearch calibrate` (calibrate.py) fits it and stores it in the profile's metadata under
"calibration"; the cost model applies it only where a profile has one. It may be carried to the
profile of another model on the same GPU (`calibrate --from`): the factors are of kernels and of
the GPU, not of one model's shapes.

The energy factor (`energy.EnergyCalibration`, metadata key "energy_calibration") is kept apart, in
energy.py beside the power bound it scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nfsearch.errors import NfsearchError
from nfsearch.graph import OP_CLASSES

CALIBRATION_KEY = "calibration"
FACTOR_RANGE = (0.5, 3.0)
SOLO_RANGE = (0.25, 3.0)        # tiny kernels run at ~half their profiled time inside a graph
MAX_OVERHEAD_US = 100.0


@dataclass(frozen=True)
class ClassFactor:
    op_class: str
    factor: float               # co-run factor (1 where the runs had too few co-run spans)
    num_corun_spans: int
    num_solo_spans: int
    corun_ratio: float          # median measured / predicted over co-run spans
    solo_ratio: float           # the solo median it was divided by
    solo_factor: float = 1.0    # applied to every time of the class (solo_ratio, clamped to SOLO_RANGE)
    op: str = ""                # set: the factors of this op alone (e.g. "norm1"); empty: of the class

    def __post_init__(self):
        if self.op_class not in OP_CLASSES:
            raise NfsearchError(f"calibration: unknown op class {self.op_class!r}")
        if not isinstance(self.op, str) or len(self.op) > 64:
            raise NfsearchError(f"calibration: op must be a short name, not {self.op!r}")
        lo, hi = FACTOR_RANGE
        if not SOLO_RANGE[0] <= self.solo_factor <= SOLO_RANGE[1]:
            raise NfsearchError(f"calibration: {self.op_class} solo factor {self.solo_factor!r} outside "
                                f"{SOLO_RANGE[0]:g}..{SOLO_RANGE[1]:g}")
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
    """Per-op-class factors, the overheads between kernels, and what they were fitted on."""
    factors: tuple[ClassFactor, ...]
    sources: tuple[str, ...]            # one line per measured run folded in
    event_wait_us: float                # a launch's start after the other-stream op it waits on ends
    launch_gap_us: float                # a launch's start after the previous one of its stream ends
    num_waits: int = 0                  # how many of each the medians were taken over
    num_gaps: int = 0
    gpu_name: str = ""                  # the GPU the runs were measured on

    def __post_init__(self):
        object.__setattr__(self, "factors", tuple(self.factors))
        object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
        keys = [(f.op_class, f.op) for f in self.factors]
        if len(set(keys)) != len(keys):
            raise NfsearchError("calibration: an op class or op appears twice")
        if not self.sources:
            raise NfsearchError("calibration: no measured run named")
        for key in ("event_wait_us", "launch_gap_us"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_OVERHEAD_US:
                raise NfsearchError(f"calibration: {key} must be in 0..{MAX_OVERHEAD_US:g}, not {value!r}")
        for key in ("num_waits", "num_gaps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise NfsearchError(f"calibration: {key} must be an integer >= 0, not {value!r}")
        if not isinstance(self.gpu_name, str):
            raise NfsearchError(f"calibration: gpu_name must be a string, not {self.gpu_name!r}")

    def _entry(self, op_class: str, op: str) -> ClassFactor | None:
        return (next((f for f in self.factors if f.op and f.op == op and f.op_class == op_class), None)
                or next((f for f in self.factors if not f.op and f.op_class == op_class), None))

    def factor(self, op_class: str, op: str = "") -> float:
        """The co-run factor of an op (its own where fitted, else its class's; 1 where neither)."""
        entry = self._entry(op_class, op)
        return entry.factor if entry is not None else 1.0

    def solo_factor(self, op_class: str, op: str = "") -> float:
        """The solo factor of an op (its own where fitted, else its class's; 1 where neither)."""
        entry = self._entry(op_class, op)
        return entry.solo_factor if entry is not None else 1.0

    @property
    def label(self) -> str:
        shown = ", ".join(f"{f.op or f.op_class} x{f.solo_factor:.2f} solo, x{f.factor:.2f} co-run"
                          for f in self.factors) or "no class with enough spans"
        return (f"calibrated ({shown}; wait {self.event_wait_us:.2g} us, gap {self.launch_gap_us:.2g} us; "
                f"from {len(self.sources)} measured plan run(s))")

    def to_dict(self) -> dict:
        return {"factors": [{"op_class": f.op_class, "factor": f.factor, "num_corun_spans": f.num_corun_spans,
                             "num_solo_spans": f.num_solo_spans, "corun_ratio": f.corun_ratio,
                             "solo_ratio": f.solo_ratio, "solo_factor": f.solo_factor, "op": f.op}
                            for f in self.factors],
                "sources": list(self.sources), "event_wait_us": self.event_wait_us,
                "launch_gap_us": self.launch_gap_us, "num_waits": self.num_waits, "num_gaps": self.num_gaps,
                "gpu_name": self.gpu_name}

    @classmethod
    def from_dict(cls, d, where: str = "calibration") -> Calibration:
        try:
            extra = {k: d[k] for k in ("num_waits", "num_gaps", "gpu_name") if k in d}
            return cls(tuple(ClassFactor(**f) for f in d["factors"]), tuple(d["sources"]),
                       d["event_wait_us"], d["launch_gap_us"], **extra)
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
