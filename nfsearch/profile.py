"""Profile tables: measured (or analytic) kernel times by op, impl, size and SM count.

One format, CSV or Parquet, read and written with pandas:
    op, impl, num_tokens, context, sm_count, time_ms[, co_class]
num_tokens counts requests for decode attention; context is its KV length (prefill attention: the
prompt length; 0 elsewhere). Rows with a co_class are co-run times: the op measured while an op of
that class ran beside it on the other SMs (the interference table); rows without one are solo times.
Metadata (GPU, SM count and granularity, peak rates, versions, source, date) travels with the table:
in the Parquet schema's key-value metadata, or as the CSV's first line `# nfsearch-profile {json}`.

Energy (optional, metadata key "energy", `energy.ProfileEnergy`): the GPU's power limit, its static
power and per-op energy points (nfsearch/energy.py). The cost model builds the power bound from it
(cost.py); a table without it has no bound.
"""

import bisect
import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Strict, ValidationError, field_validator

from nfsearch.energy import ENERGY_KEY, ProfileEnergy, energy_from_meta
from nfsearch.errors import NfsearchError
from nfsearch.files import MAX_INPUT_BYTES, parse_json, read_text, shown, write_atomic
from nfsearch.graph import OP_CLASSES, shard_signature
from nfsearch.plan import ENGINE_IMPLS
from nfsearch.specs import (
    MAX_CONTEXT,
    MAX_LABEL_CHARS,
    MAX_MEMORY_BYTES,
    MAX_SMS,
    MAX_TIME_MS,
    MAX_TP,
    Ceilings,
    Dtype,
    GpuSpec,
    ModelSpec,
    Name,
    Rate,
    Text,
    Workload,
    bounded_int,
    bundled_names,
    describe,
    gpu_by_name,
    load_gpu,
    load_model,
)

COLUMNS = ["op", "impl", "num_tokens", "context", "sm_count", "time_ms"]
KEY_COLUMNS = COLUMNS[:5] + ["co_class"]
CSV_MARK = "# nfsearch-profile "
PARQUET_KEY = b"nfsearch-profile"
REQUIRED_META = ("gpu_name", "num_sms", "sm_granularity", "source")
SOURCES = ("measured", "analytic", "fake")
MAX_ROWS = 2**22


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
    dtype: Dtype | None = None                  # of the data measured (None: bf16, what the profiler uses)
    # the model's per-GPU layer shapes measured (graph.shard_signature; older profiles name the model only)
    shard: dict[Name, Annotated[int, Strict()] | Annotated[bool, Strict()] | Name] | None = None
    memory_bytes: bounded_int(1, MAX_MEMORY_BYTES) | None = None      # the device's memory
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


class ProfileMiss(NfsearchError):
    """The table cannot answer a lookup (names the op, size and SM count)."""


@dataclass(frozen=True)
class Scaling:
    """How a lookup outside the measured grid (in tokens or context) scales: the time at the nearest
    measured point x shape(the point asked) / shape(that point), never below floor(the point asked).
    shape(num_tokens, context, sm_count) is a time of the op's shape (the cost model passes the
    op's analytic time, roofline.op_scaling); floor(num_tokens, context) its roofline on the GPU."""
    shape: Callable[[int, float, int], float]
    floor: Callable[[int, float], float]
    is_held_below: bool = False         # below the grid: the edge's time (shape not applied)

    def ratio(self, x: tuple[int, float, int], edge: tuple[int, float, int]) -> float:
        if self.is_held_below and x < edge:
            return 1.0
        return self.shape(*x) / self.shape(*edge)


# allow_extrapolation without a Scaling (what the runtime asks, to choose among impls): linear in tokens
# and in context above the grid, the edge's time below it (never less than the smallest size measured)
LINEAR = Scaling(lambda n, c, s: float(n) * max(c, 1.0), lambda n, c: 0.0, is_held_below=True)


@dataclass
class ProfileTable:
    """A checked table (see check_rows, check_meta); `info` is the metadata's typed view.

    Rows of plan.ENGINE_IMPLS (the serving engine's paged attention) are kept but left out of the
    lookups that choose an impl (`impls`, `covers`, `time_ms` without one), unless the table is a plan
    family's engine view (family.attention.engine_view: `is_engine_view`, the fingerprint of the
    profile it was made from in `base_fingerprint`)."""
    rows: pd.DataFrame
    meta: dict = field(default_factory=dict)
    is_engine_view: bool = False
    base_fingerprint: str | None = None

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
        if self.base_fingerprint is not None:     # a view prices with the rows of the file it came from
            return self.base_fingerprint
        text = self.rows.to_csv(index=False, float_format="%.6g") + json.dumps(
            {k: self.meta[k] for k in REQUIRED_META}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def impls(self, op: str, co_class: str = "") -> list[str]:
        """The impls a lookup of `op` chooses among (engine-only ones only in an engine view)."""
        return sorted(impl for (o, impl, c) in self._slices if o == op and c == co_class
                      and (self.is_engine_view or impl not in ENGINE_IMPLS))

    def covers(self, op: str, num_tokens: int, context: int = 0) -> bool:
        """Whether some impl of `op` measured (solo) the point without scaling it."""
        return any(self._slices[(op, impl, "")].covers(num_tokens, context) for impl in self.impls(op))

    def has_corun(self) -> bool:
        return bool((self.rows["co_class"] != "").any())

    def time_ms(self, op: str, num_tokens: int, sm_count: int, context: int = 0, impl: str | None = None,
                co_class: str = "", allow_extrapolation: bool = False,
                scaling: Scaling | None = None) -> tuple[float, str]:
        """Interpolated time of `op` (the fastest impl unless one is named) and the impl used. Outside
        the measured tokens and contexts: scaled by `scaling` (ProfileGrid), else with
        `allow_extrapolation` linearly beyond the top and at the edge below the bottom, else ProfileMiss."""
        scaling = scaling or (LINEAR if allow_extrapolation else None)
        candidates = [impl] if impl else self.impls(op, co_class)
        if not candidates or (op, candidates[0], co_class) not in self._slices:
            what = f"co-run with {co_class}" if co_class else "solo"
            raise ProfileMiss(f"profile has no {what} rows for op {op}" + (f" impl {impl}" if impl else ""))
        times, misses = [], []
        for i in candidates:
            what = f"({op}/{i}, {num_tokens} tokens, context {context}, {sm_count} SMs)"
            try:
                times.append((self._slices[(op, i, co_class)].lookup(num_tokens, context, sm_count,
                                                                     scaling, what), i))
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

    Outside the grid in tokens or context (where allowed) the time is the nearest measured point's,
    scaled by a Scaling: a time is never clamped to the table's edge. SM counts are never
    extrapolated below the table's smallest: the table's SM grid is what the device partitions
    into, and a share below it is not one the executor builds."""

    def __init__(self, df: pd.DataFrame):
        self.points = {(int(r.context), int(r.num_tokens), int(r.sm_count)): float(r.time_ms)
                       for r in df.itertuples()}
        self.contexts = sorted({c for c, _, _ in self.points})
        self.tokens = {c: sorted({t for cc, t, _ in self.points if cc == c}) for c in self.contexts}
        self.sms = {c: sorted({s for cc, _, s in self.points if cc == c}) for c in self.contexts}

    def covers(self, tokens: int, context: int) -> bool:
        """Whether (tokens, context) lies inside the measured grid (no scaling)."""
        if not self.contexts[0] <= context <= self.contexts[-1]:
            return False
        lo, hi, _ = bracket(self.contexts, context, False, "")
        return all(self.tokens[c][0] <= tokens <= self.tokens[c][-1] for c in {lo, hi})

    def lookup(self, tokens: int, context: int, sms: int, scaling: Scaling | None, what: str) -> float:
        edge = min(max(context, self.contexts[0]), self.contexts[-1])
        if edge != context and scaling is None:
            raise ProfileMiss(f"context {context} outside the table for {what} (table covers "
                              f"{self.contexts[0]}..{self.contexts[-1]}; allow extrapolation to go beyond)")
        lo, hi, w = bracket(self.contexts, edge, False, "")
        time = self.at_context(lo, tokens, sms, scaling, what)
        if lo != hi:
            time += (self.at_context(hi, tokens, sms, scaling, what) - time) * w
        if edge == context:
            return time
        scaled = time * scaling.ratio((tokens, context, sms), (tokens, edge, sms))
        return max(scaled, scaling.floor(tokens, context))

    def at_context(self, c: int, tokens: int, sms: int, scaling: Scaling | None, what: str) -> float:
        grid = self.tokens[c]
        edge = min(max(tokens, grid[0]), grid[-1])
        if edge != tokens and scaling is None:
            raise ProfileMiss(f"no profile entry for {what} (table covers {grid[0]}..{grid[-1]}; allow "
                              "extrapolation to go beyond)")
        t0, t1, wt = bracket(grid, edge, False, "")
        if sms < self.sms[c][0]:
            raise ProfileMiss(f"no profile entry for {what} (the table's smallest SM count is "
                              f"{self.sms[c][0]}; fewer SMs are never extrapolated)")
        s0, s1, ws = bracket(self.sms[c], sms, scaling is not None, f"no profile entry for {what}")
        corners = {}
        for t in {t0, t1}:
            for s in {s0, s1}:
                if (c, t, s) not in self.points:
                    raise ProfileMiss(f"no profile entry for {what} (grid point {t} tokens, {s} SMs missing)")
                corners[(t, s)] = self.points[(c, t, s)]
        at_s0 = corners[(t0, s0)] + (corners[(t1, s0)] - corners[(t0, s0)]) * wt
        at_s1 = corners[(t0, s1)] + (corners[(t1, s1)] - corners[(t0, s1)]) * wt
        time = at_s0 + (at_s1 - at_s0) * ws
        if edge == tokens:
            return time
        scaled = time * scaling.ratio((tokens, c, sms), (edge, c, sms))
        return max(scaled, scaling.floor(tokens, c))


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


def check_profile_model(profile: ProfileTable, model: ModelSpec, workload: Workload) -> None:
    """A profile prices only the layer it measured: refuse it for another model's shapes (one GPU's
    shard under TP), another TP degree or another data type, naming the differences. Its shapes are
    its metadata's "shard" (graph.shard_signature), else those of the bundled model it names; a
    profile of a model it cannot resolve must name this model; one that names no model (a hand-made
    table) is taken as it is."""
    reason = model_mismatch(profile.info, model, workload)
    if reason:
        raise NfsearchError(f"the {profile.label} {reason}")


def model_mismatch(info: ProfileMeta, model: ModelSpec, workload: Workload) -> str:
    """Why a profile of metadata `info` cannot price `model` under `workload` ("" where it can)."""
    if info.model is None and info.shard is None:
        return ""
    tp, dtype = info.tp_degree or 1, info.dtype or "bf16"
    want = shard_signature(model, workload.tp_degree, workload.dtype)
    if info.shard is not None:
        got = dict(info.shard)
    elif info.model in bundled_names("models"):
        got = shard_signature(load_model(info.model), tp, dtype)
    else:
        got = {**want, "model": info.model, "tp_degree": tp, "dtype": dtype}
        want = {**want, "model": model.name}
    differ = [f"{key} {got.get(key)!r} (this one {want[key]!r})" for key in want if got.get(key) != want[key]]
    if not differ:
        return ""
    return (f"measured {info.model or 'another model'} at TP={tp}, {dtype}, not {model.name} at "
            f"TP={workload.tp_degree}, {workload.dtype}: its {', '.join(differ[:4])} differ; measure this model "
            "(nfsearch profile) or leave --profile out for the analytic profile")


def read_meta(path: str | Path) -> ProfileMeta:
    """A profile file's checked metadata alone (its rows not read)."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            raw = (pq.read_schema(path).metadata or {}).get(PARQUET_KEY)
            if raw is None:
                raise NfsearchError(f"{shown(path)}: parquet file has no nfsearch-profile metadata")
            return check_meta(_parse_meta(raw.decode("utf-8"), path))
        first = read_text(path).partition("\n")[0]
        return check_meta(_parse_meta(first.removeprefix(CSV_MARK), path))
    except (OSError, UnicodeDecodeError) as exc:
        raise NfsearchError(f"{shown(path)}: not a readable profile ({type(exc).__name__})") from None


def gpu_from_profile(profile: ProfileTable | ProfileMeta) -> GpuSpec:
    """The GPU a profile (or its metadata) was made on, with its own measured rates where it has them."""
    info = profile.info if isinstance(profile, ProfileTable) else profile
    known = load_gpu(info.gpu_key) if info.gpu_key else gpu_by_name(info.gpu_name)
    base = known or load_gpu("h100-sxm")
    return GpuSpec(key=info.gpu_key or base.key, name=info.gpu_name, num_sms=info.num_sms,
                   sm_granularity=info.sm_granularity,
                   peak_tflops=(info.ceilings.gemm_tflops if info.ceilings else info.peak_tflops) or base.peak_tflops,
                   mem_bandwidth_tbps=((info.ceilings.copy_tbps if info.ceilings else info.mem_bandwidth_tbps)
                                       or base.mem_bandwidth_tbps),
                   net_bandwidth_gbps=info.net_bandwidth_gbps or base.net_bandwidth_gbps,
                   figures_source=info.figures_source or info.source,
                   memory_bytes=info.memory_bytes or (base.memory_bytes if known else 0))
