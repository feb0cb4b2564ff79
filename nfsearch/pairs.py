"""The pair table: where running two ops side by side on split SMs beats running them back to back.

A measured profile (`nfsearch profile`) holds, beside its solo and co-run rows, a table of pair
points in its metadata under "pairs" ({"columns": PAIR_COLUMNS, "rows": [...], "method": ...,
"failures": n}). One pair point is two ops launched together, side A on `sms_a` SMs and side B on
the other `sms_b` SMs of one two-way green-context split:

* corun_a_ms, corun_b_ms: each side's time from the common start to its own end (launched together);
* makespan_ms: the pair's time, the later of the two ends;
* part_a_ms, part_b_ms: each side alone on its own partition (same stream, no partner);
* full_a_ms, full_b_ms: each side alone on the whole GPU (its fastest impl there);
* impl_a, impl_b: the impl each side ran, the fastest alone on its partition;
* a side of 0 SMs holds no share (a copy-engine collective, plan.NO_SHARE_IMPLS, on a plain stream
  beside the other side on the whole GPU): its family is apart from the same ops on a split
  (`family_op`);
* sm_clock_mhz: the SM clock right after the pair ran (a spin kernel's cycles over its time);
  nvml_sm_clock_mhz: what NVML reported then (None where NVML was not available).

A pair family is the two ops at given sizes (e.g. ug over 2048 tokens x decode_attn over 512
requests at context 1024); its points are the splits. `make_report` takes, per family, the split
with the shortest makespan and sets it against the two run back to back on the whole GPU
(full_a_ms + full_b_ms): overlap pays where that split is at least GAIN (5%) faster. Families with a
collective (op class "network") are reported apart (`is_network=True`, `analyze --pairs P --tp N`).

A PairPoint is also what measuring a pair gives: the profilers build it as they measure
(runtime/measurements.py `Plan.pair_point`, carried in `Measurement.pair`, kept whole in the
checkpoint by `to_json`), so the table is those points as measured.

Torch-free: reads and reports tables, measures nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from nfsearch.errors import NfsearchError
from nfsearch.files import write_text_atomic
from nfsearch.plan import NO_SHARE_IMPLS
from nfsearch.profile import load

GAIN = 0.05          # overlap "pays" when the best split is at least this much faster than back to back

PAIR_COLUMNS = ("op_a", "impl_a", "class_a", "tokens_a", "context_a", "sms_a",
                "op_b", "impl_b", "class_b", "tokens_b", "context_b", "sms_b",
                "corun_a_ms", "corun_b_ms", "makespan_ms", "part_a_ms", "part_b_ms", "full_a_ms", "full_b_ms",
                "sm_clock_mhz", "nvml_sm_clock_mhz")
_TIMES = ("corun_a_ms", "corun_b_ms", "makespan_ms", "part_a_ms", "part_b_ms", "full_a_ms", "full_b_ms")
NO_SHARE_TAG = "@noshare"


def family_op(op: str, sm_count: int) -> str:
    """The op as pair families name it: a side that holds no SM share (0 SMs) is a family of its own,
    apart from the same op on a split."""
    return op + NO_SHARE_TAG if sm_count == 0 else op


@dataclass(frozen=True)
class PairSide:
    """One side of a pair: an op at a size (num_tokens counts requests for decode attention)."""
    op: str
    op_class: str
    num_tokens: int
    context: int = 0

    def __post_init__(self):
        if not self.op or self.num_tokens <= 0 or self.context < 0:
            raise ValueError(f"bad pair side {self}")

    def describe(self) -> str:
        unit = "req" if self.op == "decode_attn" else "tok"
        ctx = f" ctx {self.context}" if self.context else ""
        return f"{self.op} {self.num_tokens} {unit}{ctx}"


@dataclass(frozen=True)
class PairPoint:
    """One measured split of a pair family (times in ms; see the module docstring)."""
    a: PairSide
    b: PairSide
    impl_a: str
    impl_b: str
    sms_a: int
    sms_b: int
    corun_a_ms: float
    corun_b_ms: float
    makespan_ms: float
    part_a_ms: float
    part_b_ms: float
    full_a_ms: float
    full_b_ms: float
    sm_clock_mhz: float | None = None
    nvml_sm_clock_mhz: float | None = None

    def __post_init__(self):
        for sms, impl in ((self.sms_a, self.impl_a), (self.sms_b, self.impl_b)):
            if sms < 0 or (sms == 0 and impl not in NO_SHARE_IMPLS):
                raise ValueError(f"pair point needs positive SM counts (0 only for impls "
                                 f"{sorted(NO_SHARE_IMPLS)}), got {self.sms_a} ({self.impl_a}) + "
                                 f"{self.sms_b} ({self.impl_b})")
        for name in _TIMES:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"pair point {name} must be a positive finite time, got {v!r}")
        for name in ("sm_clock_mhz", "nvml_sm_clock_mhz"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"pair point {name} must be positive or None, got {v!r}")

    @property
    def family(self) -> tuple[PairSide, PairSide]:
        return self.a, self.b

    def to_row(self) -> list:
        return [self.a.op, self.impl_a, self.a.op_class, self.a.num_tokens, self.a.context, self.sms_a,
                self.b.op, self.impl_b, self.b.op_class, self.b.num_tokens, self.b.context, self.sms_b,
                *(round(float(getattr(self, n)), 6) for n in _TIMES),
                *(None if v is None else round(float(v), 1) for v in (self.sm_clock_mhz, self.nvml_sm_clock_mhz))]

    def to_json(self) -> str:
        """Every field at full precision (a profile checkpoint's pair row; to_row rounds)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PairPoint:
        fields = json.loads(text)
        return cls(PairSide(**fields.pop("a")), PairSide(**fields.pop("b")), **fields)

    @classmethod
    def from_row(cls, row) -> PairPoint:
        r = dict(zip(PAIR_COLUMNS, row))
        return cls(PairSide(str(r["op_a"]), str(r["class_a"]), int(r["tokens_a"]), int(r["context_a"])),
                   PairSide(str(r["op_b"]), str(r["class_b"]), int(r["tokens_b"]), int(r["context_b"])),
                   str(r["impl_a"]), str(r["impl_b"]), int(r["sms_a"]), int(r["sms_b"]),
                   *(float(r[n]) for n in _TIMES),
                   *(None if r[n] is None else float(r[n]) for n in ("sm_clock_mhz", "nvml_sm_clock_mhz")))


def pairs_meta(points: list[PairPoint], method: str, num_failures: int = 0,
               failure_examples: list[str] | None = None) -> dict:
    """The profile metadata entry that carries the pair table."""
    return {"columns": list(PAIR_COLUMNS), "rows": [p.to_row() for p in points], "method": method,
            "failures": int(num_failures), "failure_examples": list(failure_examples or [])[:20]}


def points_from_meta(meta: dict, where: str = "profile") -> list[PairPoint]:
    """The pair points of a profile's metadata; [] when it has none. Malformed: NfsearchError."""
    entry = meta.get("pairs")
    if entry is None:
        return []
    try:
        if list(entry["columns"]) != list(PAIR_COLUMNS):
            raise ValueError(f"columns {entry['columns']} (expected {list(PAIR_COLUMNS)})")
        return [PairPoint.from_row(row) for row in entry["rows"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise NfsearchError(f"{where}: malformed pair table ({str(exc)[:200]})") from None


# ------------------------------------------------------------------------------------ the report
@dataclass(frozen=True)
class FamilyResult:
    """A pair family's best split against the two ops back to back on the whole GPU."""
    a: PairSide
    b: PairSide
    best: PairPoint
    num_splits: int
    back_to_back_ms: float      # the fastest full-GPU solo of A plus that of B
    gain: float = GAIN

    @property
    def name(self) -> str:
        return f"{self.a.describe()} x {self.b.describe()}"

    @property
    def classes(self) -> str:
        return f"{self.a.op_class} x {self.b.op_class}"

    @property
    def ratio(self) -> float:
        """Best makespan over back to back: below 1 the overlap is faster."""
        return self.best.makespan_ms / self.back_to_back_ms

    @property
    def speedup(self) -> float:
        return self.back_to_back_ms / self.best.makespan_ms

    @property
    def is_paying(self) -> bool:
        return self.speedup >= 1.0 + self.gain - 1e-12

    @property
    def stretch(self) -> float:
        """Best makespan over the slower side alone on its partition: what interference costs."""
        return self.best.makespan_ms / max(self.best.part_a_ms, self.best.part_b_ms)

    def to_dict(self) -> dict:
        b = self.best
        return {"family": self.name, "classes": self.classes, "a": asdict(self.a), "b": asdict(self.b),
                "splits": self.num_splits, "best_sms_a": b.sms_a, "best_sms_b": b.sms_b,
                "impl_a": b.impl_a, "impl_b": b.impl_b,
                "makespan_ms": round(b.makespan_ms, 5), "corun_a_ms": round(b.corun_a_ms, 5),
                "corun_b_ms": round(b.corun_b_ms, 5), "part_a_ms": round(b.part_a_ms, 5),
                "part_b_ms": round(b.part_b_ms, 5), "full_a_ms": round(b.full_a_ms, 5),
                "full_b_ms": round(b.full_b_ms, 5), "back_to_back_ms": round(self.back_to_back_ms, 5),
                "ratio": round(self.ratio, 4), "speedup": round(self.speedup, 4), "pays": self.is_paying,
                "stretch": round(self.stretch, 4), "sm_clock_mhz": b.sm_clock_mhz,
                "nvml_sm_clock_mhz": b.nvml_sm_clock_mhz}


@dataclass(frozen=True)
class PairReport:
    gpu_name: str
    families: tuple[FamilyResult, ...]
    is_network: bool = False
    gain: float = GAIN
    num_failures: int = 0

    @property
    def num_paying(self) -> int:
        return sum(f.is_paying for f in self.families)

    @property
    def fraction_paying(self) -> float:
        return self.num_paying / len(self.families) if self.families else 0.0

    def to_dict(self) -> dict:
        return {"gpu": self.gpu_name, "kind": "collectives x GEMMs and decode attention" if self.is_network else "ops",
                "gain_threshold": self.gain, "families": [f.to_dict() for f in self.families],
                "num_families": len(self.families), "num_paying": self.num_paying,
                "fraction_paying": round(self.fraction_paying, 4), "failures": self.num_failures,
                "back_to_back": "sum of the two ops' fastest full-GPU solo times",
                "pays": f"best split's makespan at least {self.gain:.0%} below back to back "
                        f"(speedup >= {1 + self.gain:.2f})"}


def is_network_family(a: PairSide, b: PairSide) -> bool:
    return "network" in (a.op_class, b.op_class)


def make_report(points: list[PairPoint], is_network: bool = False, gpu_name: str = "", gain: float = GAIN,
                num_failures: int = 0) -> PairReport:
    """Per family (collective families only if is_network, the others otherwise): the best split."""
    by_family: dict[tuple[PairSide, PairSide], list[PairPoint]] = {}
    for p in points:
        if is_network_family(p.a, p.b) == is_network:
            by_family.setdefault(p.family, []).append(p)
    families = []
    for (a, b), pts in by_family.items():
        best = min(pts, key=lambda p: (p.makespan_ms, p.sms_a))
        back_to_back = min(p.full_a_ms for p in pts) + min(p.full_b_ms for p in pts)
        families.append(FamilyResult(a, b, best, len({(p.sms_a, p.sms_b) for p in pts}), back_to_back, gain))
    families.sort(key=lambda f: (f.classes, f.a.op, f.a.num_tokens, f.b.op, f.b.num_tokens, f.b.context))
    return PairReport(gpu_name, tuple(families), is_network, gain, num_failures)


def format_report(report: PairReport) -> str:
    """The report as a text table, one line per family, then the fraction where overlap pays."""
    kind = "collectives x GEMMs and decode attention" if report.is_network else "pairs"
    head = f"{kind} on {report.gpu_name or 'unknown GPU'}: best split vs back to back on the whole GPU"
    cols = ("family", "best split", "impls", "co-run ms", "back-to-back ms", "ratio", "stretch", "pays")
    rows = []
    for f in report.families:
        b = f.best
        rows.append((f.name, f"{b.sms_a}+{b.sms_b}", f"{b.impl_a}/{b.impl_b}", f"{b.makespan_ms:.4f}",
                     f"{f.back_to_back_ms:.4f}", f"{f.ratio:.3f}", f"{f.stretch:.2f}",
                     "yes" if f.is_paying else "no"))
    out = [head, *_text_table(cols, rows, num_left=3)]
    out.append(f"overlap pays (best split >= {report.gain:.0%} faster than back to back) in "
               f"{report.num_paying} of {len(report.families)} families ({report.fraction_paying:.0%})"
               + (f"; {report.num_failures} pair measurements failed" if report.num_failures else ""))
    out.append("ratio = best co-run makespan / back to back; stretch = makespan / slower side alone on its "
               "partition")
    return "\n".join(out)


def _text_table(cols: tuple[str, ...], rows: list[tuple[str, ...]], num_left: int) -> list[str]:
    """Header, rule and rows in columns as wide as their widest cell; the first `num_left` columns
    flush left, the rest (numbers) flush right."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(v.ljust(w) if i < num_left else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return [line(cols), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]


def energy_rows(energy, gain: float = GAIN) -> list[dict]:
    """Per pair energy point of a profile's energy (energy.ProfileEnergy): the pair in a sustained
    loop at its best split against back to back, at the power limit as the GPU ran them."""
    rows = []
    for p in energy.pair_points:
        a = PairSide(p.op_a, "", p.num_tokens_a, p.context_a).describe()
        b = PairSide(p.op_b, "", p.num_tokens_b, p.context_b).describe()
        time_ratio = p.time_ms / p.b2b_time_ms
        try:
            energy_ratio = round(p.dynamic_ratio(energy.static_power_w), 4)
        except NfsearchError:       # no energy above static power (a bad window): the bound prices nothing
            energy_ratio = None
        rows.append({"family": f"{a} x {b}",
                     "split": f"{p.sms_a}+{p.sms_b}", "time_ratio": round(time_ratio, 4),
                     "energy_ratio": energy_ratio,
                     "power_w": round(p.power_w), "b2b_power_w": round(p.b2b_power_w),
                     "capped_share": p.capped_share, "b2b_capped_share": p.b2b_capped_share,
                     "pays": time_ratio <= 1.0 / (1.0 + gain) + 1e-12})
    return rows


def format_energy_rows(rows: list[dict], gain: float = GAIN) -> str:
    """The sustained pairs as a text table, then where overlap pays at the power limit."""
    cols = ("family (sustained, best split)", "split", "time ratio", "energy ratio", "W together / back to back",
            "pays")
    lines = [(r["family"], r["split"], f"{r['time_ratio']:.3f}",
              "-" if r["energy_ratio"] is None else f"{r['energy_ratio']:.3f}",
              f"{r['power_w']} / {r['b2b_power_w']}", "yes" if r["pays"] else "no") for r in rows]
    num_paying = sum(r["pays"] for r in rows)
    return "\n".join(_text_table(cols, lines, num_left=2) + [
        f"sustained, at the power limit as the GPU ran them: overlap pays (>= {gain:.0%} faster than back to "
        f"back) in {num_paying} of {len(rows)} families; time ratio = sustained loop together / back to back, "
        f"energy ratio = dynamic energy together / back to back at one SM clock (what the plan's power bound "
        f"charges an overlap; '-' where a loop spent no energy above static power, which the bound skips)"])


def analyze_pairs(profile_path: str | None, json_path: str | None = None, tp_degree: int = 1,
                  ignored_flags: tuple[str, ...] = ()) -> str:
    """`nfsearch analyze --pairs PROFILE [--tp N] [--json FILE]`: the report's text (JSON written if asked)."""
    if not profile_path:
        raise NfsearchError("--json goes with --pairs PROFILE")
    if ignored_flags:
        raise NfsearchError(f"--pairs reads a profile; {', '.join(ignored_flags)} do(es) not apply to it")
    if tp_degree < 1:
        raise NfsearchError(f"--tp must be >= 1, got {tp_degree}")
    if json_path and not str(json_path).endswith(".json"):
        raise NfsearchError(f"{json_path}: --json output must end with .json")
    if json_path and not Path(json_path).parent.is_dir():
        raise NfsearchError(f"{json_path}: cannot write (no directory {Path(json_path).parent})")
    table = load(profile_path)
    meta = table.meta
    points = points_from_meta(meta, str(profile_path))
    is_network = tp_degree > 1
    entry = meta.get("pairs") or {}
    report = make_report(points, is_network, str(meta.get("gpu_name", "")),
                         num_failures=int(entry.get("failures", 0) or 0))
    if not report.families:
        what = "collective x GEMM" if is_network else "pair"
        raise NfsearchError(f"{profile_path}: no {what} rows (measured with `nfsearch profile` "
                            f"{'on a tensor-parallel setup' if is_network else 'with --pairs'}; "
                            f"this table has {len(points)} pair points)")
    sustained = energy_rows(table.energy, report.gain) if table.energy is not None and not is_network else []
    if json_path:
        data = report.to_dict()
        data["profile"] = str(profile_path)
        data["method"] = entry.get("method")
        data["sustained"] = sustained
        write_text_atomic(json_path, json.dumps(data, indent=1) + "\n")
    text = format_report(report)
    return text + "\n\n" + format_energy_rows(sustained, report.gain) if sustained else text
