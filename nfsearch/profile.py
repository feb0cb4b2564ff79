"""Profile tables: measured (or analytic) kernel times by op, impl, size and SM count.

One format, CSV or Parquet, read and written with pandas:
    op, impl, num_tokens, context, sm_count, time_ms[, co_class]
num_tokens counts requests for decode attention; context is its KV length (prefill attention: the
prompt length; 0 elsewhere). Rows with a co_class are co-run times: the op measured while an op of
that class ran beside it on the other SMs (the interference table); rows without one are solo times.
Metadata (GPU, SM count and granularity, peak rates, versions, source, date) travels with the table:
in the Parquet schema's key-value metadata, or as the CSV's first line `# nfsearch-profile {json}`.
"""

import bisect
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from nfsearch.errors import NfsearchError
from nfsearch.files import write_atomic
from nfsearch.specs import GpuSpec, gpu_by_name, load_gpu

COLUMNS = ["op", "impl", "num_tokens", "context", "sm_count", "time_ms"]
CSV_MARK = "# nfsearch-profile "
PARQUET_KEY = b"nfsearch-profile"
REQUIRED_META = ("gpu_name", "num_sms", "sm_granularity", "source")
SOURCES = ("measured", "analytic", "fake")


class ProfileMiss(NfsearchError):
    """The table cannot answer a lookup (names the op, size and SM count)."""


@dataclass
class ProfileTable:
    rows: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = [c for c in COLUMNS if c not in self.rows.columns]
        if missing:
            raise NfsearchError(f"profile table lacks column(s) {', '.join(missing)}")
        absent = [k for k in REQUIRED_META if k not in self.meta]
        if absent:
            raise NfsearchError(f"profile metadata lacks {', '.join(absent)}")
        if self.meta["source"] not in SOURCES:
            raise NfsearchError(f"profile source must be one of {', '.join(SOURCES)}")
        rows = self.rows.copy()
        if "co_class" not in rows.columns:
            rows["co_class"] = ""
        rows["co_class"] = rows["co_class"].fillna("").astype(str)
        for col in ("num_tokens", "context", "sm_count"):
            rows[col] = rows[col].astype("int64")
        rows["time_ms"] = rows["time_ms"].astype("float64")
        if (rows["time_ms"] <= 0).any() or rows["time_ms"].isna().any():
            raise NfsearchError("profile table has non-positive or missing times")
        self.rows = rows.sort_values(COLUMNS[:5] + ["co_class"]).reset_index(drop=True)
        self._slices = {key: _Grid(df) for key, df in self.rows.groupby(["op", "impl", "co_class"])}

    @property
    def is_analytic(self) -> bool:
        return self.meta["source"] == "analytic"

    @property
    def label(self) -> str:
        return f"{self.meta['source']} profile of {self.meta['gpu_name']}"

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
        raise NfsearchError(f"{path}: no such profile file")
    try:
        if path.suffix == ".parquet":
            return _read_parquet(path)
        if path.suffix == ".csv":
            return _read_csv(path)
    except NfsearchError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types for a bad file
        raise NfsearchError(f"{path}: not a readable profile table ({type(exc).__name__})") from None
    raise NfsearchError(f"{path}: a profile is a .csv or .parquet file")


def _read_csv(path: Path) -> ProfileTable:
    text = path.read_text()
    first, _, body = text.partition("\n")
    if not first.startswith(CSV_MARK):
        raise NfsearchError(f"{path}: missing the '{CSV_MARK.strip()} {{...}}' metadata line")
    meta = json.loads(first[len(CSV_MARK):])
    rows = pd.read_csv(io.StringIO(body), keep_default_na=False, dtype={"co_class": str})
    return ProfileTable(rows, meta)


def _read_parquet(path: Path) -> ProfileTable:
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(PARQUET_KEY)
    if raw is None:
        raise NfsearchError(f"{path}: parquet file has no nfsearch-profile metadata")
    return ProfileTable(table.to_pandas(), json.loads(raw))


class _Grid:
    """Times of one (op, impl, co_class) over a grid of contexts x tokens x SM counts."""

    def __init__(self, df: pd.DataFrame):
        self.points = {(int(r.context), int(r.num_tokens), int(r.sm_count)): float(r.time_ms)
                       for r in df.itertuples()}
        self.contexts = sorted({c for c, _, _ in self.points})
        self.tokens = {c: sorted({t for cc, t, _ in self.points if cc == c}) for c in self.contexts}
        self.sms = {c: sorted({s for cc, _, s in self.points if cc == c}) for c in self.contexts}

    def lookup(self, tokens: int, context: int, sms: int, extrapolate: bool, what: str) -> float:
        lo, hi, w = _bracket(self.contexts, context, extrapolate, f"context {context} outside the table for {what}")
        if lo == hi:
            return self._at_context(lo, tokens, sms, extrapolate, what)
        a = self._at_context(lo, tokens, sms, extrapolate, what)
        b = self._at_context(hi, tokens, sms, extrapolate, what)
        return a + (b - a) * w

    def _at_context(self, c: int, tokens: int, sms: int, extrapolate: bool, what: str) -> float:
        t0, t1, wt = _bracket(self.tokens[c], tokens, extrapolate, f"no profile entry for {what}")
        s0, s1, ws = _bracket(self.sms[c], sms, extrapolate, f"no profile entry for {what}")
        corners = {}
        for t in {t0, t1}:
            for s in {s0, s1}:
                if (c, t, s) not in self.points:
                    raise ProfileMiss(f"no profile entry for {what} (grid point {t} tokens, {s} SMs missing)")
                corners[(t, s)] = self.points[(c, t, s)]
        at_s0 = corners[(t0, s0)] + (corners[(t1, s0)] - corners[(t0, s0)]) * wt
        at_s1 = corners[(t0, s1)] + (corners[(t1, s1)] - corners[(t0, s1)]) * wt
        time = at_s0 + (at_s1 - at_s0) * ws
        return time * _outside_scale(self.tokens[c], tokens, self.sms[c], sms)


def _bracket(grid: list[int], x: int, extrapolate: bool, message: str) -> tuple[int, int, float]:
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


def _outside_scale(tokens_grid, tokens, sms_grid, sms) -> float:
    """Beyond the table: time grows linearly with tokens above it and as 1/SMs below it."""
    scale = 1.0
    if tokens > tokens_grid[-1]:
        scale *= tokens / tokens_grid[-1]
    if sms < sms_grid[0]:
        scale *= sms_grid[0] / sms
    return scale

def gpu_from_profile(profile: ProfileTable) -> GpuSpec:
    """The GPU a profile was made on, with the profile's own measured rates where it has them."""
    meta = profile.meta
    known = load_gpu(meta["gpu_key"]) if meta.get("gpu_key") else gpu_by_name(meta["gpu_name"])
    base = known or load_gpu("h100-sxm")
    return GpuSpec(key=meta.get("gpu_key", base.key), name=meta["gpu_name"], num_sms=int(meta["num_sms"]),
                   sm_granularity=int(meta["sm_granularity"]),
                   peak_tflops=float(meta.get("peak_tflops", base.peak_tflops)),
                   mem_bandwidth_tbps=float(meta.get("mem_bandwidth_tbps", base.mem_bandwidth_tbps)),
                   net_bandwidth_gbps=float(meta.get("net_bandwidth_gbps", base.net_bandwidth_gbps)),
                   figures_source=meta.get("figures_source", meta["source"]))
