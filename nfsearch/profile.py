"""Profile tables: measured (or analytic) kernel times by op, impl, size and SM count.

One format, CSV or Parquet, read and written with pandas:
    op, impl, num_tokens, context, sm_count, time_ms[, co_class]
num_tokens counts requests for decode attention; context is its KV length (prefill attention: the
prompt length; 0 elsewhere). Rows with a co_class are co-run times: the op measured while an op of
that class ran beside it on the other SMs (the interference table); rows without one are solo times.
Metadata (GPU, SM count and granularity, peak rates, versions, source, date) travels with the table:
in the Parquet schema's key-value metadata, or as the CSV's first line `# nfsearch-profile {json}`.

Energy (optional, metadata key "energy", `ProfileEnergy`): the GPU's enforced power limit, its static
power, and per op a few points (op, impl, tokens, context) of the board energy per call measured in a
sustained back-to-back loop on the whole GPU with the op's fastest impl (nfsearch/runtime/power.py
says how). The cost model builds the power bound from it (cost.py); a table without it has no bound.
It is metadata, so the fingerprint (rows and required keys) does not change when energy is added.
Energy may also hold pair points (`PairEnergyPoint`): a pair family of the pair table at its best
split, both sides launched together in a sustained loop, against the same two ops back to back on the
whole GPU measured the same way: what overlapping them costs in energy, which ops measured alone
cannot say.
"""

import bisect
import dataclasses
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from nfsearch.errors import NfsearchError
from nfsearch.files import MAX_INPUT_BYTES, parse_json, read_text, shown, write_atomic
from nfsearch.graph import OP_CLASSES
from nfsearch.plan import NO_SHARE_IMPLS
from nfsearch.runreport import Ceilings
from nfsearch.specs import (
    MAX_CONTEXT,
    MAX_SMS,
    MAX_TP,
    GpuSpec,
    Name,
    Rate,
    Text,
    bounded_int,
    describe,
    gpu_by_name,
    load_gpu,
)

COLUMNS = ["op", "impl", "num_tokens", "context", "sm_count", "time_ms"]
KEY_COLUMNS = COLUMNS[:5] + ["co_class"]
CSV_MARK = "# nfsearch-profile "
PARQUET_KEY = b"nfsearch-profile"
REQUIRED_META = ("gpu_name", "num_sms", "sm_granularity", "source")
SOURCES = ("measured", "analytic", "fake")
MAX_ROWS = 2**22
MAX_TIME_MS = 1e5               # 100 s for one kernel: beyond it a time is a unit or parse error
MAX_LABEL_CHARS = 64            # op, impl and co_class names
ENERGY_KEY = "energy"
MAX_POWER_W = 1e5               # a board's power limit beyond this is a unit error
MAX_ENERGY_J = 1e4              # one kernel call
MAX_CLOCK_MHZ = 1e5
# an op's dynamic energy goes about as SM clock^this under the power cap: fitted on H100 plans at
# their 700 W limit (benchmarks/results/energy_2026-11-27/ANALYSIS.md: clock^0.9-1.3)
ENERGY_CLOCK_EXPONENT = 1.0
MAX_ENERGY_POINTS = 10_000


class ProfileMeta(BaseModel):
    """The metadata a table must carry, and the types of the optional keys code reads.
    Other keys (grid, versions, notes of a measured run) travel along unchecked."""
    model_config = ConfigDict(extra="allow")
    gpu_name: Name
    num_sms: bounded_int(1, MAX_SMS)
    sm_granularity: bounded_int(1, MAX_SMS)
    source: Literal[SOURCES]
    gpu_key: Name | None = None
    peak_tflops: Rate | None = None
    mem_bandwidth_tbps: Rate | None = None
    net_bandwidth_gbps: Rate | None = None
    figures_source: Text | None = None
    model: Name | None = None
    tp_degree: bounded_int(1, MAX_TP) | None = None
    ceilings: Ceilings | None = None            # measured profiles (older ones: peak_tflops, mem_bandwidth_tbps)

    @field_validator("ceilings", mode="before")
    @classmethod
    def _read_ceilings(cls, value):
        try:
            return None if value is None else Ceilings.from_dict(value)
        except NfsearchError as exc:
            raise ValueError(str(exc).removeprefix("ceilings").lstrip(": ")) from None


def check_meta(meta) -> ProfileMeta:
    if not isinstance(meta, dict):
        raise NfsearchError("profile metadata must be a JSON object")
    absent = [k for k in REQUIRED_META if k not in meta]
    if absent:
        raise NfsearchError(f"profile metadata lacks {', '.join(absent)}")
    try:
        info = ProfileMeta.model_validate(meta)
    except ValidationError as exc:
        raise NfsearchError(f"profile metadata: {describe(exc)}") from None
    if info.sm_granularity > info.num_sms:
        raise NfsearchError(f"profile metadata: sm_granularity {info.sm_granularity} exceeds num_sms "
                            f"{info.num_sms}")
    return info


def check_rows(rows: pd.DataFrame, num_sms: int) -> pd.DataFrame:
    """The rows with checked dtypes and ranges, exact duplicates dropped, sorted by key.

    Two rows with one key (op, impl, num_tokens, context, sm_count, co_class) and different times
    are refused: which one is right cannot be told here."""
    if not isinstance(rows, pd.DataFrame):
        raise NfsearchError("profile rows must be a table")
    missing = [c for c in COLUMNS if c not in rows.columns]
    if missing:
        raise NfsearchError(f"profile table lacks column(s) {', '.join(missing)}")
    unknown = [shown(c, 30) for c in rows.columns if c not in KEY_COLUMNS + ["time_ms"]]
    if unknown:
        raise NfsearchError(f"profile table has unknown column(s) {', '.join(unknown)}")
    if len(rows) == 0:
        raise NfsearchError("profile table has no rows")
    if len(rows) > MAX_ROWS:
        raise NfsearchError(f"profile table has {len(rows)} rows, more than {MAX_ROWS}")
    rows = rows.reset_index(drop=True).copy()
    if "co_class" not in rows.columns:
        rows["co_class"] = ""
    rows["co_class"] = rows["co_class"].where(rows["co_class"].notna(), "")
    for col in ("op", "impl", "co_class"):
        values = rows[col]
        if not values.map(lambda v: isinstance(v, str)).all():
            raise NfsearchError(f"profile column {col} must hold text")
        may_be_empty = col == "co_class"          # "" marks a solo row
        bad = ~values.map(lambda v, ok_empty=may_be_empty: v.isprintable() and len(v) <= MAX_LABEL_CHARS
                          and (bool(v) or ok_empty))
        if bad.any():
            raise NfsearchError(f"profile column {col} has a bad name {shown(values[bad].iloc[0], 40)!r} "
                                f"(empty, unprintable or over {MAX_LABEL_CHARS} characters)")
    rows["co_class"] = rows["co_class"].astype(str)
    unknown_class = ~rows["co_class"].isin(("",) + OP_CLASSES)
    if unknown_class.any():
        raise NfsearchError(f"profile column co_class has {shown(rows['co_class'][unknown_class].iloc[0], 40)!r}, "
                            f"not an op class ({', '.join(OP_CLASSES)}) or empty")
    for col, low, high in (("num_tokens", 1, MAX_CONTEXT), ("context", 0, MAX_CONTEXT),
                           ("sm_count", 1, num_sms)):
        values = rows[col]
        if not pd.api.types.is_integer_dtype(values) or pd.api.types.is_bool_dtype(values):
            raise NfsearchError(f"profile column {col} must hold integers (has {values.dtype})")
        out = (values < low) | (values > high)
        if out.any():
            raise NfsearchError(f"profile column {col} has {values[out].iloc[0]} outside {low}..{high}")
        rows[col] = values.astype("int64")
    times = rows["time_ms"]
    if not pd.api.types.is_numeric_dtype(times) or pd.api.types.is_bool_dtype(times):
        raise NfsearchError(f"profile column time_ms must hold numbers (has {times.dtype})")
    times = times.astype("float64")
    bad = ~(times.map(math.isfinite) & (times > 0) & (times <= MAX_TIME_MS))
    if bad.any():
        raise NfsearchError(f"profile time_ms {times[bad].iloc[0]!r} is not a positive finite time up to "
                            f"{MAX_TIME_MS:g} ms (row {int(bad.idxmax())})")
    rows["time_ms"] = times
    rows = rows[COLUMNS + ["co_class"]].drop_duplicates()     # (this column order is hashed)
    clash = rows.duplicated(KEY_COLUMNS, keep=False)
    if clash.any():
        first = rows[clash].sort_values(KEY_COLUMNS).iloc[0]
        raise NfsearchError(f"profile has rows with one key and different times: {first.op}/{first.impl} "
                            f"{first.num_tokens} tokens, context {first.context}, {first.sm_count} SMs"
                            + (f", beside {first.co_class}" if first.co_class else ""))
    return rows.sort_values(KEY_COLUMNS).reset_index(drop=True)


def _positive(value, what: str, high: float, may_be_zero: bool = False) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value >= 0 if may_be_zero else value > 0) and value <= high)
    if not ok:
        raise NfsearchError(f"profile energy: {what} must be a {'' if may_be_zero else 'positive '}number up to "
                            f"{high:g}, not {value!r}")
    return float(value)


def _optional(value, what: str, high: float) -> float | None:
    return None if value is None else _positive(value, what, high)


def _short_name(value, what: str) -> str:
    if not (isinstance(value, str) and value and value.isprintable() and len(value) <= MAX_LABEL_CHARS):
        raise NfsearchError(f"profile energy: {what} must be a short name, not {shown(value, 40)!r}")
    return value


def _count(value, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise NfsearchError(f"profile energy: {what} must be an integer in {low}..{high}, not {value!r}")
    return value


def _check_loop(point, prefix: str, what: str) -> None:
    """Check (and store as floats) the readings of one sustained loop of an energy point: the fields
    `prefix` + energy_j, time_ms, power_w, sm_clock_mhz (optional) and capped_share (0..1)."""
    for key, high in (("energy_j", MAX_ENERGY_J), ("time_ms", MAX_TIME_MS), ("power_w", MAX_POWER_W)):
        name = prefix + key
        object.__setattr__(point, name, _positive(getattr(point, name), f"{what} {name}", high))
    name = prefix + "sm_clock_mhz"
    object.__setattr__(point, name, _optional(getattr(point, name), f"{what} {name}", MAX_CLOCK_MHZ))
    name = prefix + "capped_share"
    object.__setattr__(point, name, _positive(getattr(point, name), f"{what} {name}", 1.0, may_be_zero=True))


@dataclass(frozen=True)
class EnergyPoint:
    """One op at one size, run back to back on the whole GPU with `impl` (its fastest there):
    the board energy per call (static power included), the GPU time per call in that loop (at the
    clock the loop ran at, which the power cap may have lowered), the loop's mean board power, median
    SM clock and the share of NVML samples with the SW power cap on."""
    op: str
    impl: str
    num_tokens: int
    context: int
    energy_j: float
    time_ms: float
    power_w: float
    sm_clock_mhz: float | None = None
    capped_share: float = 0.0

    def __post_init__(self):
        for key in ("op", "impl"):
            _short_name(getattr(self, key), f"point {key}")
        for key, low in (("num_tokens", 1), ("context", 0)):
            _count(getattr(self, key), f"{self.op} {key}", low, MAX_CONTEXT)
        _check_loop(self, "", self.op)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.op, self.num_tokens, self.context)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class PairEnergyPoint:
    """One pair family at one split (sides A and B each on its SMs, launched together, one call
    each per launch, launches back to back) and the same two ops back to back on the whole GPU
    (`b2b_*`, each with its fastest impl there): board energy (static included) and GPU time per
    launch, mean board power, median SM clock, share of samples at the SW power cap."""
    op_a: str
    num_tokens_a: int
    context_a: int
    sms_a: int
    impl_a: str
    op_b: str
    num_tokens_b: int
    context_b: int
    sms_b: int
    impl_b: str
    energy_j: float
    time_ms: float
    power_w: float
    b2b_energy_j: float
    b2b_time_ms: float
    b2b_power_w: float
    sm_clock_mhz: float | None = None
    capped_share: float = 0.0
    b2b_sm_clock_mhz: float | None = None
    b2b_capped_share: float = 0.0

    def __post_init__(self):
        for side in ("a", "b"):
            _short_name(getattr(self, f"op_{side}"), f"pair point op_{side}")
            _short_name(getattr(self, f"impl_{side}"), f"pair point impl_{side}")
            _count(getattr(self, f"num_tokens_{side}"), f"pair point num_tokens_{side}", 1, MAX_CONTEXT)
            _count(getattr(self, f"context_{side}"), f"pair point context_{side}", 0, MAX_CONTEXT)
            # 0 SMs: a side that holds no SM share (a copy-engine collective, plan.NO_SHARE_IMPLS)
            low = 0 if getattr(self, f"impl_{side}") in NO_SHARE_IMPLS else 1
            _count(getattr(self, f"sms_{side}"), f"pair point sms_{side}", low, MAX_SMS)
        for prefix in ("", "b2b_"):
            _check_loop(self, prefix, f"pair {self.op_a} x {self.op_b}")

    @property
    def key(self) -> tuple:
        return (self.op_a, self.num_tokens_a, self.context_a, self.op_b, self.num_tokens_b, self.context_b)

    def dynamic_ratio(self, static_power_w: float, alpha: float = ENERGY_CLOCK_EXPONENT) -> float:
        """The pair's dynamic energy (above static power) over the two back to back's, at one SM
        clock: above 1, overlapping them costs energy. Each loop settles at its own clock under the
        power cap, and an op's energy goes about as clock^alpha (voltage falls with the clock), while a
        layer runs its overlaps and its other ops at one clock: so the pair's energy is taken to the
        back-to-back loop's clock where both clocks were read."""
        pair = self.energy_j - static_power_w * self.time_ms / 1e3
        b2b = self.b2b_energy_j - static_power_w * self.b2b_time_ms / 1e3
        if pair <= 0 or b2b <= 0:
            raise NfsearchError(f"profile energy: {self.op_a} x {self.op_b} spends no energy above the "
                                f"static power {static_power_w:.0f} W")
        at_one_clock = 1.0
        if self.sm_clock_mhz and self.b2b_sm_clock_mhz:
            at_one_clock = (self.b2b_sm_clock_mhz / self.sm_clock_mhz) ** alpha
        return pair / b2b * at_one_clock

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ProfileEnergy:
    """The energy part of a profile (module doc): the power limit and static power of the GPU (W),
    and the op points. `method` and `static_method` say how they were measured."""
    power_limit_w: float
    static_power_w: float
    points: tuple[EnergyPoint, ...]
    method: str = ""
    static_method: str = ""
    idle_power_w: float | None = None
    static_sm_clock_mhz: float | None = None
    max_sm_clock_mhz: float | None = None
    date: str = ""
    failures: tuple[str, ...] = ()          # points that could not be measured, one line each
    pair_points: tuple[PairEnergyPoint, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "points", tuple(self.points))
        object.__setattr__(self, "pair_points", tuple(self.pair_points))
        object.__setattr__(self, "failures", tuple(str(f)[:300] for f in self.failures))
        limit = _positive(self.power_limit_w, "power_limit_w", MAX_POWER_W)
        static = _positive(self.static_power_w, "static_power_w", MAX_POWER_W)
        if static >= limit:
            raise NfsearchError(f"profile energy: static power {static:g} W is not below the power limit {limit:g} W")
        object.__setattr__(self, "power_limit_w", limit)
        object.__setattr__(self, "static_power_w", static)
        for key in ("idle_power_w", "static_sm_clock_mhz", "max_sm_clock_mhz"):
            object.__setattr__(self, key, _optional(getattr(self, key), key,
                                                    MAX_POWER_W if key == "idle_power_w" else MAX_CLOCK_MHZ))
        for key in ("method", "static_method", "date"):
            value = getattr(self, key)
            if not isinstance(value, str) or len(value) > 4000:
                raise NfsearchError(f"profile energy: {key} must be a text, not {shown(value, 40)!r}")
        if not all(isinstance(p, EnergyPoint) for p in self.points):
            raise NfsearchError("profile energy: points must be energy points")
        if not 1 <= len(self.points) <= MAX_ENERGY_POINTS:
            raise NfsearchError(f"profile energy: needs 1..{MAX_ENERGY_POINTS} points, has {len(self.points)}")
        keys = [p.key for p in self.points]
        if len(set(keys)) != len(keys):
            twice = next(k for k in keys if keys.count(k) > 1)
            raise NfsearchError(f"profile energy: two points for {twice[0]} at {twice[1]} tokens, context {twice[2]}")
        if not all(isinstance(p, PairEnergyPoint) for p in self.pair_points):
            raise NfsearchError("profile energy: pair_points must be pair energy points")
        if len(self.pair_points) > MAX_ENERGY_POINTS:
            raise NfsearchError(f"profile energy: more than {MAX_ENERGY_POINTS} pair points")
        pair_keys = [p.key for p in self.pair_points]
        if len(set(pair_keys)) != len(pair_keys):
            raise NfsearchError(f"profile energy: two pair points for {next(k for k in pair_keys if pair_keys.count(k) > 1)}")

    def merged(self, newer: "ProfileEnergy") -> "ProfileEnergy":
        """`newer`'s limit, static power and points, with this one's points (and pair points) it did
        not re-measure."""
        mine = {p.key: p for p in self.points}
        mine.update({p.key: p for p in newer.points})
        pairs = {p.key: p for p in self.pair_points}
        pairs.update({p.key: p for p in newer.pair_points})
        return ProfileEnergy(newer.power_limit_w, newer.static_power_w, tuple(sorted(mine.values(), key=lambda p: p.key)),
                             newer.method, newer.static_method, newer.idle_power_w, newer.static_sm_clock_mhz,
                             newer.max_sm_clock_mhz, newer.date, newer.failures,
                             tuple(sorted(pairs.values(), key=lambda p: p.key)))

    def to_dict(self) -> dict:
        return {"power_limit_w": self.power_limit_w, "static_power_w": self.static_power_w,
                "points": [p.to_dict() for p in self.points], "method": self.method,
                "static_method": self.static_method, "idle_power_w": self.idle_power_w,
                "static_sm_clock_mhz": self.static_sm_clock_mhz, "max_sm_clock_mhz": self.max_sm_clock_mhz,
                "date": self.date, "failures": list(self.failures),
                "pair_points": [p.to_dict() for p in self.pair_points]}

    @classmethod
    def from_dict(cls, d) -> "ProfileEnergy":
        if not isinstance(d, dict):
            raise NfsearchError("profile energy must be a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise NfsearchError(f"profile energy: unknown keys {', '.join(shown(k, 30) for k in unknown[:5])}")
        for key in ("power_limit_w", "static_power_w", "points"):
            if key not in d:
                raise NfsearchError(f"profile energy lacks {key}")
        parsed = _parse_points(d["points"], EnergyPoint, "points", "point")
        failures = d.get("failures", [])
        if not isinstance(failures, list):
            raise NfsearchError("profile energy: failures must be a list")
        pairs = _parse_points(d.get("pair_points", []), PairEnergyPoint, "pair_points", "pair point")
        rest = {k: d[k] for k in known - {"points", "failures", "power_limit_w", "static_power_w", "pair_points"}
                if k in d}
        return cls(d["power_limit_w"], d["static_power_w"], parsed, failures=tuple(failures), pair_points=pairs,
                   **rest)


def _parse_points(items, point_cls, key: str, what: str) -> tuple:
    """The `point_cls` objects (EnergyPoint, PairEnergyPoint) of the list of JSON objects `items`
    found under `key` of a profile's energy; one line naming what is wrong otherwise."""
    if not isinstance(items, list) or not all(isinstance(p, dict) for p in items):
        raise NfsearchError(f"profile energy: {key} must be a list of objects")
    if len(items) > MAX_ENERGY_POINTS:
        raise NfsearchError(f"profile energy: more than {MAX_ENERGY_POINTS} {what}s")
    fields_ = point_cls.__dataclass_fields__
    required = [f for f, spec in fields_.items() if spec.default is dataclasses.MISSING]
    parsed = []
    for p in items:
        odd = sorted(str(k) for k in p if k not in fields_)
        if odd:
            raise NfsearchError(f"profile energy: unknown {what} keys {', '.join(shown(k, 30) for k in odd[:5])}")
        missing = [f for f in required if f not in p]
        if missing:
            raise NfsearchError(f"profile energy: a {what} lacks {', '.join(missing)}")
        parsed.append(point_cls(**p))
    return tuple(parsed)


def energy_from_meta(meta: dict) -> ProfileEnergy | None:
    """The profile's energy (checked), or None where it has none."""
    entry = meta.get(ENERGY_KEY) if isinstance(meta, dict) else None
    return None if entry is None else ProfileEnergy.from_dict(entry)


class ProfileMiss(NfsearchError):
    """The table cannot answer a lookup (names the op, size and SM count)."""


@dataclass
class ProfileTable:
    """A checked table (see check_rows, check_meta); `info` is the metadata's typed view."""
    rows: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.info = check_meta(self.meta)
        self.rows = check_rows(self.rows, self.info.num_sms)
        self.energy = energy_from_meta(self.meta)        # None: no energy measured, no power bound
        self._slices = {key: ProfileGrid(df) for key, df in self.rows.groupby(["op", "impl", "co_class"])}

    @property
    def is_analytic(self) -> bool:
        return self.meta["source"] == "analytic"

    @property
    def label(self) -> str:
        return f"{self.meta['source']} profile of {self.meta['gpu_name']}"

    def with_energy(self, energy: ProfileEnergy) -> "ProfileTable":
        """The same rows and metadata with `energy` (same fingerprint: energy is metadata)."""
        return ProfileTable(self.rows, {**self.meta, ENERGY_KEY: energy.to_dict()})

    def fingerprint(self) -> str:
        text = self.rows.to_csv(index=False, float_format="%.6g") + json.dumps(
            {k: self.meta[k] for k in REQUIRED_META}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def impls(self, op: str, co_class: str = "") -> list[str]:
        return sorted(impl for (o, impl, c) in self._slices if o == op and c == co_class)

    def has_corun(self) -> bool:
        return bool((self.rows["co_class"] != "").any())

    def time_ms(self, op: str, num_tokens: int, sm_count: int, context: int = 0, impl: str | None = None,
                co_class: str = "", allow_extrapolation: bool = False) -> tuple[float, str]:
        """Interpolated time of `op` (the fastest impl unless one is named) and the impl used."""
        candidates = [impl] if impl else self.impls(op, co_class)
        if not candidates or (op, candidates[0], co_class) not in self._slices:
            what = f"co-run with {co_class}" if co_class else "solo"
            raise ProfileMiss(f"profile has no {what} rows for op {op}" + (f" impl {impl}" if impl else ""))
        times, misses = [], []
        for i in candidates:
            what = f"({op}/{i}, {num_tokens} tokens, context {context}, {sm_count} SMs)"
            try:
                times.append((self._slices[(op, i, co_class)].lookup(num_tokens, context, sm_count,
                                                                     allow_extrapolation, what), i))
            except ProfileMiss as miss:       # another impl may still answer
                misses.append(miss)
        if not times:
            raise misses[0]
        return min(times)

    def write(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix == ".parquet":
            write_atomic(path, lambda tmp: self._write_parquet(tmp))
        elif path.suffix == ".csv":
            write_atomic(path, lambda tmp: Path(tmp).write_text(self.to_csv()))
        else:
            raise NfsearchError(f"{path}: a profile is written as .csv or .parquet")

    def to_csv(self) -> str:
        return CSV_MARK + json.dumps(self.meta, sort_keys=True) + "\n" + self.rows.to_csv(
            index=False, float_format="%.6g")

    def _write_parquet(self, tmp: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.Table.from_pandas(self.rows, preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[PARQUET_KEY] = json.dumps(self.meta, sort_keys=True).encode()
        pq.write_table(table.replace_schema_metadata(meta), tmp)


def load(path: str | Path) -> ProfileTable:
    path = Path(path)
    if not path.is_file():
        raise NfsearchError(f"{shown(path)}: no such profile file")
    if path.suffix not in (".parquet", ".csv"):
        raise NfsearchError(f"{shown(path)}: a profile is a .csv or .parquet file")
    if path.stat().st_size > MAX_INPUT_BYTES:
        raise NfsearchError(f"{shown(path)}: larger than {MAX_INPUT_BYTES // 2**20} MiB")
    try:
        rows, meta = _read_parquet(path) if path.suffix == ".parquet" else _read_csv(path)
    except NfsearchError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types for a bad file
        raise NfsearchError(f"{shown(path)}: not a readable profile table ({type(exc).__name__})") from None
    try:
        return ProfileTable(rows, meta)
    except NfsearchError as exc:
        raise NfsearchError(f"{shown(path)}: {exc}") from None


def _read_csv(path: Path) -> tuple[pd.DataFrame, dict]:
    first, _, body = read_text(path).partition("\n")
    if not first.startswith(CSV_MARK):
        raise NfsearchError(f"{shown(path)}: missing the '{CSV_MARK.strip()} {{...}}' metadata line")
    meta = _parse_meta(first[len(CSV_MARK):], path)
    rows = pd.read_csv(io.StringIO(body), keep_default_na=False, dtype={"co_class": str})
    return rows, meta


def _read_parquet(path: Path) -> tuple[pd.DataFrame, dict]:
    import pyarrow.parquet as pq
    source = pq.ParquetFile(path)
    if source.metadata.num_rows > MAX_ROWS:
        raise NfsearchError(f"{shown(path)}: {source.metadata.num_rows} rows, more than {MAX_ROWS}")
    raw = (source.schema_arrow.metadata or {}).get(PARQUET_KEY)
    if raw is None:
        raise NfsearchError(f"{shown(path)}: parquet file has no nfsearch-profile metadata")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NfsearchError(f"{shown(path)}: profile metadata is not UTF-8 text") from None
    meta = _parse_meta(text, path)
    return source.read().to_pandas(), meta


def _parse_meta(text: str, path: Path) -> dict:
    """The metadata JSON: an object, or one line saying what is wrong with it."""
    try:
        return parse_json(text, f"{shown(path)}: profile metadata")
    except NfsearchError as exc:
        if "expected a JSON object" in str(exc):
            raise NfsearchError(f"{shown(path)}: profile metadata must be a JSON object") from None
        raise


class ProfileGrid:
    """Times of one (op, impl, co_class) over a grid of contexts x tokens x SM counts, and their
    interpolation: linear in the context, bilinear in tokens and SM counts between grid points.

    With extrapolation allowed, a point outside the grid in tokens or context takes the nearest
    edge (times above the token grid grow linearly with tokens). SM counts are never extrapolated
    below the table's smallest: the table's SM grid is what the device partitions into, and a
    share below it is not one the executor builds."""

    def __init__(self, df: pd.DataFrame):
        self.points = {(int(r.context), int(r.num_tokens), int(r.sm_count)): float(r.time_ms)
                       for r in df.itertuples()}
        self.contexts = sorted({c for c, _, _ in self.points})
        self.tokens = {c: sorted({t for cc, t, _ in self.points if cc == c}) for c in self.contexts}
        self.sms = {c: sorted({s for cc, _, s in self.points if cc == c}) for c in self.contexts}

    def lookup(self, tokens: int, context: int, sms: int, extrapolate: bool, what: str) -> float:
        lo, hi, w = bracket(self.contexts, context, extrapolate, f"context {context} outside the table for {what}")
        if lo == hi:
            return self.at_context(lo, tokens, sms, extrapolate, what)
        a = self.at_context(lo, tokens, sms, extrapolate, what)
        b = self.at_context(hi, tokens, sms, extrapolate, what)
        return a + (b - a) * w

    def at_context(self, c: int, tokens: int, sms: int, extrapolate: bool, what: str) -> float:
        t0, t1, wt = bracket(self.tokens[c], tokens, extrapolate, f"no profile entry for {what}")
        if sms < self.sms[c][0]:
            raise ProfileMiss(f"no profile entry for {what} (the table's smallest SM count is "
                              f"{self.sms[c][0]}; fewer SMs are never extrapolated)")
        s0, s1, ws = bracket(self.sms[c], sms, extrapolate, f"no profile entry for {what}")
        corners = {}
        for t in {t0, t1}:
            for s in {s0, s1}:
                if (c, t, s) not in self.points:
                    raise ProfileMiss(f"no profile entry for {what} (grid point {t} tokens, {s} SMs missing)")
                corners[(t, s)] = self.points[(c, t, s)]
        at_s0 = corners[(t0, s0)] + (corners[(t1, s0)] - corners[(t0, s0)]) * wt
        at_s1 = corners[(t0, s1)] + (corners[(t1, s1)] - corners[(t0, s1)]) * wt
        time = at_s0 + (at_s1 - at_s0) * ws
        top = self.tokens[c][-1]
        return time * (tokens / top if tokens > top else 1.0)


def bracket(grid: list[int], x: int, extrapolate: bool, message: str) -> tuple[int, int, float]:
    """Neighbours lo <= x <= hi on the grid and the weight of hi; clamps to the edge if allowed."""
    if x < grid[0] or x > grid[-1]:
        if not extrapolate:
            raise ProfileMiss(message + f" (table covers {grid[0]}..{grid[-1]}; allow extrapolation"
                                        " to go beyond)")
        edge = grid[0] if x < grid[0] else grid[-1]
        return edge, edge, 0.0
    i = bisect.bisect_left(grid, x)
    if grid[i] == x:
        return x, x, 0.0
    lo, hi = grid[i - 1], grid[i]
    return lo, hi, (x - lo) / (hi - lo)


def gpu_from_profile(profile: ProfileTable) -> GpuSpec:
    """The GPU a profile was made on, with the profile's own measured rates where it has them."""
    info = profile.info
    known = load_gpu(info.gpu_key) if info.gpu_key else gpu_by_name(info.gpu_name)
    base = known or load_gpu("h100-sxm")
    return GpuSpec(key=info.gpu_key or base.key, name=info.gpu_name, num_sms=info.num_sms,
                   sm_granularity=info.sm_granularity,
                   peak_tflops=(info.ceilings.gemm_tflops if info.ceilings else info.peak_tflops) or base.peak_tflops,
                   mem_bandwidth_tbps=((info.ceilings.copy_tbps if info.ceilings else info.mem_bandwidth_tbps)
                                       or base.mem_bandwidth_tbps),
                   net_bandwidth_gbps=info.net_bandwidth_gbps or base.net_bandwidth_gbps,
                   figures_source=info.figures_source or info.source)
