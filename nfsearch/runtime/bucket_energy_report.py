"""What runtime.bucket_energy reports per bucket, as the bench JSON's "buckets_energy" block, and its
printed lines (a table of its own for a plain run; measured J, floor and closeness beside the family's
predictions under --plans). Torch-free.

Per bucket: J per iteration = fitted mean power x measured mean iteration ms; floor_ms = J / power
limit (the shortest the iteration could take spending that energy at the cap); closeness = measured ms
/ floor ms = power limit / fitted power (1.00: at its floor, 1.03: 3% above it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

NOT_SEPARABLE = "not separable (never holds more than half of a window)"


@dataclass
class BucketEnergy:
    variant: str
    bucket: int                      # index into the engine's buckets
    dims: list[int] | None           # max_tokens, max_decode, max_segments, max_context
    num_iterations: int
    iteration_fraction: float        # of the run's iterations
    mean_ms: float                   # measured GPU time per iteration (host time on the CPU)
    num_windows: int                 # windows it holds more than half of: what informs its power
    power_w: float | None            # fitted mean power; None: not separable
    power_se_w: float | None         # the fit's standard error (None where too few windows)
    energy_j: float | None           # per iteration
    floor_ms: float | None
    closeness: float | None
    sm_clock_mhz: float | None       # median over the samples in the windows it dominates
    capped_share: float | None       # share of those samples with the SW power cap on

    @classmethod
    def of(cls, variant, bucket, dims, num_iterations, fraction, mean_ms, num_windows, power_w, power_se_w,
           power_limit_w, sm_clock_mhz, capped_share) -> BucketEnergy:
        energy = floor = closeness = None
        if power_w is not None:
            energy = power_w * mean_ms / 1e3
            if power_limit_w and energy > 0:
                floor = energy / power_limit_w * 1e3
                closeness = mean_ms / floor
        se = None if power_se_w is None or math.isnan(power_se_w) else power_se_w   # nan: unknown
        return cls(variant, bucket, dims, num_iterations, fraction, mean_ms, num_windows,
                   None if power_w is None else float(power_w), None if se is None else float(se),
                   energy, floor, closeness, sm_clock_mhz, capped_share)


@dataclass
class Pooled:
    """Idle, or the keys that could not be separated, as one fitted power."""
    names: list[str]
    seconds: float
    power_w: float | None
    num_windows: int = 0


@dataclass
class BucketEnergyReport:
    method: str | None               # bucket_energy.COUNTER | POWER_ONLY | None (nothing measured)
    power_limit_w: float | None
    num_windows: int
    min_window_s: float
    note: str | None = None
    mean_window_s: float | None = None
    residual_pct: float | None = None   # rms of the fit's residuals / mean window energy
    window_energy_j: float | None = None   # the counter's energy over the windows (what was split)
    lag_ms: float | None = None      # the reading's fitted lag behind its sample (bucket_energy's doc)
    idle: Pooled | None = None
    rest: Pooled | None = None
    buckets: list[BucketEnergy] = field(default_factory=list)
    num_unlisted: int = 0            # buckets under MIN_FRACTION of the iterations (fitted, not listed)
    unlisted_fraction: float = 0.0

    def fit(self, energies, spans, rms_j: float, lag_s: float) -> None:
        self.lag_ms = 1e3 * lag_s
        mean_j = float(sum(energies)) / max(len(energies), 1)
        self.mean_window_s = float(sum(spans)) / max(len(spans), 1)
        self.residual_pct = 100.0 * rms_j / mean_j if mean_j > 0 else None
        if self.method is not None and self.method.startswith("energy counter"):
            self.window_energy_j = float(sum(energies))

    def add(self, bucket: BucketEnergy) -> None:
        self.buckets.append(bucket)

    def to_dict(self) -> dict:
        return asdict(self)


def _bucket_name(b: dict, with_variant: bool) -> str:
    name = "/".join(map(str, b["dims"])) if b["dims"] else f"bucket {b['bucket']}"
    return f"{b['variant']} {name}" if with_variant else name


def _f(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else fmt.format(value)


def headline(r: dict) -> str:
    if r["method"] is None:
        return f"energy per bucket: none measured ({r['note']})"
    return (f"energy per bucket ({r['method']}, {r['num_windows']} windows of {r['mean_window_s']:.2f} s on "
            f"average, readings {_f(r.get('lag_ms'), '{:.0f}')} ms late; fit residual "
            f"{_f(r['residual_pct'], '{:.1f}')}% of a window's energy; power limit {_f(r['power_limit_w'], '{:.0f}')} W)")


def format_lines(r: dict) -> list[str]:
    """The plain run's table: one row per bucket with >= 1% of the iterations."""
    lines = [headline(r)]
    if r["method"] is None:
        return lines
    many = len({b["variant"] for b in r["buckets"]}) > 1
    lines.append(f"{'bucket':>26} {'iters':>6} {'ms':>8} {'W':>6} {'J':>8} {'floor ms':>9} {'ms/floor':>9} "
                 f"{'windows':>8} {'MHz':>6} {'capped':>7}")
    for b in r["buckets"]:
        row = (f"{_bucket_name(b, many):>26} {100 * b['iteration_fraction']:>5.0f}% {b['mean_ms']:>8.2f} "
               f"{_f(b['power_w'], '{:.0f}'):>6} {_f(b['energy_j'], '{:.3f}'):>8} {_f(b['floor_ms'], '{:.2f}'):>9} "
               f"{_f(b['closeness'], '{:.3f}'):>9} {b['num_windows']:>8} {_f(b['sm_clock_mhz'], '{:.0f}'):>6} "
               f"{_f(b['capped_share'], '{:.0%}'):>7}")
        lines.append(row + ("" if b["power_w"] is not None else f"  {NOT_SEPARABLE}"))
    lines += pooled_lines(r)
    return lines


def pooled_lines(r: dict) -> list[str]:
    out = []
    idle, rest = r.get("idle"), r.get("rest")
    if idle and idle["seconds"] > 0:
        out.append(f"  idle {idle['seconds']:.2f} s: " + (f"{idle['power_w']:.0f} W ({idle['num_windows']} windows)"
                                                        if idle["power_w"] is not None else "in the pooled rest"))
    if rest:
        out.append(f"  pooled (not separable): {', '.join(rest['names'])}: {rest['seconds']:.2f} s at "
                   f"{_f(rest['power_w'], '{:.0f}')} W together")
    if r.get("num_unlisted"):
        out.append(f"  {r['num_unlisted']} buckets under 1% of the iterations ({100 * r['unlisted_fraction']:.1f}% "
                   f"together) fitted, not listed")
    return out


def measured(r: dict | None, dims: list[int], variant: str = "plan") -> dict | None:
    """The block's row of one bucket (by its dims) and variant, or None."""
    if not r:
        return None
    return next((b for b in r["buckets"] if b["dims"] == list(dims) and b["variant"] == variant), None)
