"""The schedule (plan) type and its versioned JSON form, validated on every read and write.

A Schedule is what stage 2 of the search, or a hand-made plan, hands to the simulator and the
executor: every nano-op of the unrolled layers with its stream, issue order, SM count, impl,
dependencies and predicted start/end, and four typed sections (PlanGpu, PlanProfile, Predicted,
SolverInfo), each with one JSON form (to_dict/from_dict) that the schema plan-v2.json describes.

Version 2 adds a nano-op's `after`: nano-ops of other streams it starts after, though it reads
nothing of theirs. They carry the cross-stream order the search chose (stage 2 holds a small op
back so that a whole-GPU op goes first), which the replay and the executor honour like data
dependencies (an event wait each); without them a stream starts its head as soon as its inputs are
ready. Version 1 plans (no `after`) still load.
"""

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path

import jsonschema

from nfsearch.errors import NfsearchError
from nfsearch.files import read_json, write_text_atomic
from nfsearch.specs import ModelSpec, Workload

SCHEMA_VERSION = 2
READ_VERSIONS = (1, 2)

# Impl names a plan may carry. The runtime registry (nfsearch/runtime/kernels IMPLS) may only use
# names from RUNTIME_IMPLS (a CPU test checks it); profiles nobody measured label their rows with
# one of NON_MEASURED_IMPLS and the executor maps those to runtime impls. Add a new kernel family here.
# The collectives' impls, the default first: NCCL on the nano-op's SM share; the copy engines (no share).
NETWORK_IMPLS = ("nccl", "ce")
RUNTIME_IMPLS = frozenset({"triton", "torch", "tma", "cublaslt", "flash", "cuda", "fp8", "paged", "paged_fp8kv",
                           *NETWORK_IMPLS})
NON_MEASURED_IMPLS = frozenset({"analytic", "fake"})
# Network impls that hold no SM share: the copy engines move the rows, and the sum kernel runs on a
# plain stream beside whatever holds the SMs. Their nano-ops state sm_count 0; the profile's rows of
# them are at the whole GPU (measured alone on a plain stream), their pairs at (whole GPU, 0).
NO_SHARE_IMPLS = frozenset({"ce"})
# Runtime impls a plan may name and the executor runs, which `nfsearch profile` measures only when asked
# (--opt-in-impls): cuBLASLt told its partition's SM count ran faster alone than the TMA GEMM on 96-120 SMs
# of an H100, yet a W2 plan using it drew 15% more energy per layer under the power cap and ran 13%
# slower than the same plan on the TMA GEMM (docs/kernels.md). fp8 (W8A8 e4m3 GEMMs) changes the numerics:
# a plan may use it only where the user asked for it in the profile. paged (ENGINE_IMPLS) is measured at a
# plan family's bucket shapes (`profile --family`): the default grid's contiguous plans never run it.
OPT_IN_IMPLS = frozenset({"cublaslt", "fp8", "paged", "paged_fp8kv"})
# Attention over the serving engine's paged KV cache (runtime/kernels/paged_adapters.py): what the engine
# runs whatever a plan names, so only a plan family prices attention by it (family.attention.engine_view);
# a profile's lookups leave these rows out otherwise (profile.ProfileTable.impls), as the contiguous
# executor's plans must not name them. A profile without them still loads and solves as before.
# paged_fp8kv: the same over the engine's fp8 KV cache (--kv-cache-dtype fp8), for a family solved so.
ENGINE_IMPLS = frozenset({"paged", "paged_fp8kv"})
KNOWN_IMPLS = RUNTIME_IMPLS | NON_MEASURED_IMPLS

PROFILE_SOURCES = ("measured", "analytic", "fake")
# Caps checked before any graph is built, so that an absurd plan is refused at once
MAX_NUM_LAYERS = 1000
MAX_NANO_OPS = 200_000
MAX_SEED = 2**31 - 1
MAX_THREADS = 256


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise NfsearchError(message)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite_nonneg(value, what: str) -> float:
    _require(_is_number(value) and math.isfinite(value) and value >= 0,
             f"{what} must be a finite number >= 0, not {value!r}")
    return float(value)


def _from_fields(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise NfsearchError(f"{where}: expected a mapping, not {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    _require(not unknown, f"{where}: unknown field(s) {', '.join(map(str, unknown))}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise NfsearchError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class PlanGpu:
    """The GPU a plan is for: SM counts must be on its partition grid (see is_on_grid)."""
    name: str
    num_sms: int
    sm_granularity: int

    def __post_init__(self):
        _require(isinstance(self.name, str) and bool(self.name), "plan gpu: name must be a non-empty string")
        _require(_is_int(self.num_sms) and 1 <= self.num_sms <= 100_000,
                 f"plan gpu: num_sms must be an integer in 1..100000, not {self.num_sms!r}")
        _require(_is_int(self.sm_granularity) and 1 <= self.sm_granularity <= self.num_sms,
                 f"plan gpu: sm_granularity must be an integer in 1..num_sms, not {self.sm_granularity!r}")

    def is_on_grid(self, sm_count: int) -> bool:
        """A partition the device can make: a granularity multiple (a front group), or the GPU less
        one (the back side of a split; the whole GPU included)."""
        g = self.sm_granularity
        return 1 <= sm_count <= self.num_sms and (sm_count % g == 0 or (self.num_sms - sm_count) % g == 0)

    def to_dict(self) -> dict:
        return {"name": self.name, "num_sms": self.num_sms, "sm_granularity": self.sm_granularity}

    @classmethod
    def from_dict(cls, data: dict) -> "PlanGpu":
        return _from_fields(cls, data, "plan gpu")


@dataclass(frozen=True)
class PlanProfile:
    """The profile a plan was timed with: its fingerprint (first 16 hex digits of its hash), where its
    times come from, a label for reports, and where co-run figures come from."""
    fingerprint: str
    source: str
    label: str
    interference: str | None = None

    def __post_init__(self):
        _require(isinstance(self.fingerprint, str) and len(self.fingerprint) == 16
                 and all(c in "0123456789abcdef" for c in self.fingerprint),
                 f"plan profile: fingerprint must be 16 lowercase hex digits, not {self.fingerprint!r}")
        _require(self.source in PROFILE_SOURCES,
                 f"plan profile: source must be one of {', '.join(PROFILE_SOURCES)}, not {self.source!r}")
        _require(isinstance(self.label, str), "plan profile: label must be a string")
        _require(self.interference is None or isinstance(self.interference, str),
                 "plan profile: interference must be a string")

    def to_dict(self) -> dict:
        d = {"fingerprint": self.fingerprint, "source": self.source, "label": self.label}
        if self.interference is not None:
            d["interference"] = self.interference
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "PlanProfile":
        return _from_fields(cls, data, "plan profile")


@dataclass(frozen=True)
class Predicted:
    """What the plan's own replay predicts, beside the sequential plan and the roofline bound."""
    makespan_ms: float
    layer_time_ms: float
    sequential_layer_time_ms: float
    bound_ms: float                     # the roofline bound of one layer (not the solver's bound)

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _finite_nonneg(getattr(self, f.name), f"plan predicted: {f.name}"))

    def to_dict(self) -> dict:
        return {f.name: round(getattr(self, f.name), 6) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "Predicted":
        return _from_fields(cls, data, "plan predicted")


@dataclass(frozen=True)
class SolverInfo:
    """Who made the plan and how. Only `name` is required (hand-made and baseline plans have no more).
    model_makespan_ms/model_bound_ms are the stage-2 model's incumbent and proven bound (gap_scope
    says what the gap is of); they are not the roofline bound (Predicted.bound_ms)."""
    name: str
    status: str | None = None
    gap: float | None = None
    seed: int | None = None
    threads: int | None = None
    time_limit_s: float | None = None
    note: str | None = None
    source: str | None = None
    choice: str | None = None
    model_makespan_ms: float | None = None
    model_bound_ms: float | None = None
    gap_scope: str | None = None
    structure: str | None = None
    memory_sms: int | None = None
    wall_s: float | None = None         # only in plans written before solve stopped recording it

    def __post_init__(self):
        _require(isinstance(self.name, str) and bool(self.name), "plan solver: name must be a non-empty string")
        for key in ("status", "note", "source", "choice", "gap_scope", "structure"):
            value = getattr(self, key)
            _require(value is None or isinstance(value, str), f"plan solver: {key} must be a string")
        for key in ("gap", "model_makespan_ms", "model_bound_ms", "wall_s"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, _finite_nonneg(getattr(self, key), f"plan solver: {key}"))
        if self.time_limit_s is not None:
            _require(_is_number(self.time_limit_s) and math.isfinite(self.time_limit_s) and self.time_limit_s > 0,
                     f"time limit must be a finite number of seconds > 0, not {self.time_limit_s!r}")
            object.__setattr__(self, "time_limit_s", float(self.time_limit_s))
        if self.seed is not None:
            check_seed(self.seed)
        if self.threads is not None:
            check_threads(self.threads)
        _require(self.memory_sms is None or (_is_int(self.memory_sms) and self.memory_sms >= 1),
                 f"plan solver: memory_sms must be a positive integer, not {self.memory_sms!r}")

    def to_dict(self) -> dict:
        d = {}
        for f in fields(self):
            value = getattr(self, f.name)
            # a search always states its gap, null where it has none; other unset fields are left out
            if value is not None or (f.name == "gap" and self.status is not None):
                d[f.name] = round(value, 6) if isinstance(value, float) and f.name != "time_limit_s" else value
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "SolverInfo":
        if isinstance(data, dict) and "bound_ms" in data:
            # plans written before the rename: the solver's "bound_ms" was the stage-2 model's bound
            data = {("model_bound_ms" if k == "bound_ms" else k): v for k, v in data.items()}
        return _from_fields(cls, data, "plan solver")


def check_seed(seed) -> int:
    _require(_is_int(seed) and 0 <= seed <= MAX_SEED, f"seed must be an integer in 0..{MAX_SEED}, not {seed!r}")
    return seed


def check_threads(threads) -> int:
    _require(_is_int(threads) and 1 <= threads <= MAX_THREADS,
             f"threads must be an integer in 1..{MAX_THREADS}, not {threads!r}")
    return threads


def check_time_limit(time_limit_s) -> float:
    _require(_is_number(time_limit_s) and math.isfinite(time_limit_s) and time_limit_s > 0,
             f"time limit must be a finite number of seconds > 0, not {time_limit_s!r}")
    return float(time_limit_s)


@dataclass(frozen=True)
class PlannedOp:
    id: str
    layer: int
    op: str
    index: int
    op_class: str
    tokens: tuple[int, int]
    stream: str
    order: int
    sm_count: int
    impl: str
    deps: tuple[str, ...]
    start_ms: float             # 0/0 in a draft that replay has not timed yet
    end_ms: float
    after: tuple[str, ...] = ()  # nano-ops of other streams it starts after: an order, not data (v2)

    def __post_init__(self):
        for key in ("start_ms", "end_ms"):
            value = getattr(self, key)
            _require(_is_number(value) and math.isfinite(value) and value >= 0,
                     f"nano-op {self.id}: {key} must be a finite number >= 0, not {value!r}")
        _require(self.end_ms >= self.start_ms, f"nano-op {self.id} ends before it starts")
        _require(self.impl in KNOWN_IMPLS, f"nano-op {self.id}: unknown impl {self.impl!r} "
                 f"(known: {', '.join(sorted(KNOWN_IMPLS))})")

    @property
    def num_tokens(self) -> int:
        return self.tokens[1] - self.tokens[0]

    @property
    def duration_ms(self) -> float:
        return self.end_ms - self.start_ms

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens"] = list(self.tokens)
        d["deps"] = list(self.deps)
        del d["after"]
        if self.after:              # (left out where empty: a plan without an order reads as before)
            d["after"] = list(self.after)
        d["start_ms"] = round(self.start_ms, 6)
        d["end_ms"] = round(self.end_ms, 6)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "PlannedOp":
        return _from_fields(cls, {**data, "tokens": tuple(data["tokens"]), "deps": tuple(data["deps"]),
                                  "after": tuple(data.get("after", ()))},
                            f"nano-op {data.get('id', '?')}")


@dataclass(frozen=True)
class Schedule:
    model: ModelSpec
    workload: Workload
    gpu: PlanGpu
    profile: PlanProfile
    num_layers: int
    nano_ops: tuple[PlannedOp, ...]
    predicted: Predicted | None          # None only in a draft that replay has not timed yet
    solver: SolverInfo = SolverInfo("hand")

    def __post_init__(self):
        # (wrong section types are the caller's bug, not the user's: TypeError)
        for key, cls in (("gpu", PlanGpu), ("profile", PlanProfile), ("solver", SolverInfo)):
            if not isinstance(getattr(self, key), cls):
                raise TypeError(f"Schedule.{key} must be a {cls.__name__}, not {type(getattr(self, key)).__name__}")
        if not (self.predicted is None or isinstance(self.predicted, Predicted)):
            raise TypeError(f"Schedule.predicted must be a Predicted or None, not {type(self.predicted).__name__}")
        _require(_is_int(self.num_layers) and 1 <= self.num_layers <= MAX_NUM_LAYERS,
                 f"plan num_layers must be in 1..{MAX_NUM_LAYERS}, not {self.num_layers!r}")
        _require(len(self.nano_ops) <= MAX_NANO_OPS,
                 f"plan has {len(self.nano_ops)} nano-ops, more than the {MAX_NANO_OPS} allowed")

    @property
    def streams(self) -> list[str]:
        return list(dict.fromkeys(op.stream for op in sorted(self.nano_ops, key=lambda o: o.order)))

    def by_id(self) -> dict[str, PlannedOp]:
        return {op.id: op for op in self.nano_ops}

    def nano_batches(self) -> dict[str, list[list[int]]]:
        layer0 = sorted((op for op in self.nano_ops if op.layer == 0), key=lambda o: (o.op, o.index))
        batches: dict[str, list[list[int]]] = {}
        for op in layer0:
            batches.setdefault(op.op, []).append(list(op.tokens))
        return batches

    def with_times(self, times: dict[str, tuple[float, float]], predicted: Predicted) -> "Schedule":
        """The plan with these times, its issue order renumbered to follow them (start time, then the
        old order): the executor issues by start time, so `order` says what it will do."""
        timed = sorted(self.nano_ops, key=lambda op: (times[op.id][0], op.order))
        ops = tuple(replace(op, order=i, start_ms=times[op.id][0], end_ms=times[op.id][1]) for i, op in enumerate(timed))
        return replace(self, nano_ops=ops, predicted=predicted)

    def to_dict(self) -> dict:
        _require(self.predicted is not None, "plan has no predicted times (a draft that replay has not timed)")
        ops = sorted(self.nano_ops, key=lambda o: o.order)
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model.to_dict(),
            "workload": self.workload.to_dict(),
            "gpu": self.gpu.to_dict(),
            "profile": self.profile.to_dict(),
            "num_layers": self.num_layers,
            "streams": self.streams,
            "nano_batches": self.nano_batches(),
            "nano_ops": [op.to_dict() for op in ops],
            "predicted": self.predicted.to_dict(),
            "solver": self.solver.to_dict(),
        }


def to_json(schedule: Schedule) -> str:
    data = schedule.to_dict()
    validate(data, "plan")
    try:
        return json.dumps(data, indent=1, sort_keys=False, allow_nan=False) + "\n"
    except ValueError:
        raise NfsearchError("plan holds a non-finite number (NaN or infinity); refusing to write it") from None


def write(schedule: Schedule, path: str | Path) -> None:
    write_text_atomic(path, to_json(schedule))


def read(path: str | Path) -> Schedule:
    return from_dict(read_json(path), str(path))


def load(path: str | Path) -> Schedule:
    """A plan file, read and checked (schema + structure); simulate.verify checks it against the model."""
    return read(path)


def from_dict(data: dict, where: str = "plan") -> Schedule:
    # caps first: an absurd plan must be refused before the schema walks it or a graph is built
    if isinstance(data, dict):
        ops_data = data.get("nano_ops")
        if isinstance(ops_data, list) and len(ops_data) > MAX_NANO_OPS:
            raise NfsearchError(f"{where}: {len(ops_data)} nano-ops, more than the {MAX_NANO_OPS} allowed")
    validate(data, where)
    try:
        model = ModelSpec(**data["model"])
        workload = Workload(**{**data["workload"], "prefill_lengths": tuple(data["workload"]["prefill_lengths"])})
    except TypeError as exc:
        raise NfsearchError(f"{where}: {exc}") from None
    try:
        ops = tuple(PlannedOp.from_dict(o) for o in data["nano_ops"])
        schedule = Schedule(model, workload, PlanGpu.from_dict(data["gpu"]), PlanProfile.from_dict(data["profile"]),
                            data["num_layers"], ops, Predicted.from_dict(data["predicted"]),
                            SolverInfo.from_dict(data["solver"]))
    except NfsearchError as exc:
        raise NfsearchError(f"{where}: {exc}") from None
    check_structure(schedule, where)
    unknown = sorted(set(schedule.streams) - set(data["streams"]))
    if unknown:
        raise NfsearchError(f"{where}: nano-ops run on streams the plan does not list: {', '.join(unknown)}")
    # 'nano_batches' is derived from the nano-ops; where it names an op it must agree with them
    # (ops missing on either side are left to simulate.verify, which says which the model lacks)
    batches, stated = schedule.nano_batches(), data["nano_batches"]
    differ = sorted(o for o in set(batches) & set(stated) if batches[o] != stated[o])
    if differ:
        op = differ[0]
        raise NfsearchError(f"{where}: 'nano_batches' of op {op} ({data['nano_batches'].get(op)}) do not match "
                            f"its layer-0 nano-ops' token ranges ({batches.get(op)})")
    return schedule


def validate(data: dict, where: str) -> None:
    validator = _StrictValidator(_schema())
    error = next(iter(sorted(validator.iter_errors(data), key=lambda e: list(e.path))), None)
    if error is not None:
        location = "/".join(str(p) for p in error.absolute_path) or "(top)"
        raise NfsearchError(f"{where}: does not match the plan schema at {location}: "
                            f"{_short(error.message)}")


def check_structure(schedule: Schedule, where: str = "plan") -> None:
    """What the schema cannot say: unique ids and orders, known deps issued earlier, valid ranges,
    positive stated durations, SM counts the plan's GPU can partition. Cheap: builds no graph."""
    ids = [op.id for op in schedule.nano_ops]
    orders = [op.order for op in schedule.nano_ops]
    if len(set(ids)) != len(ids):
        raise NfsearchError(f"{where}: nano-op ids are not unique")
    if len(set(orders)) != len(orders):
        raise NfsearchError(f"{where}: two nano-ops share an issue order")
    by_id = schedule.by_id()
    gpu, is_draft = schedule.gpu, schedule.predicted is None
    for op in schedule.nano_ops:
        if op.id != f"L{op.layer}.{op.op}#{op.index}":
            raise NfsearchError(f"{where}: nano-op id {op.id} does not match its layer/op/index")
        if not op.tokens[0] < op.tokens[1]:
            raise NfsearchError(f"{where}: nano-op {op.id} has an empty token range")
        if not is_draft and not op.end_ms > op.start_ms:
            raise NfsearchError(f"{where}: nano-op {op.id} has a stated duration of "
                                f"{op.end_ms - op.start_ms:g} ms (must be positive)")
        if op.layer >= schedule.num_layers:
            raise NfsearchError(f"{where}: nano-op {op.id} is outside the plan's {schedule.num_layers} layers")
        if op.sm_count > gpu.num_sms:
            raise NfsearchError(f"{where}: nano-op {op.id} asks for {op.sm_count} SMs, the plan's GPU "
                                f"{gpu.name} has {gpu.num_sms}")
        if op.sm_count == 0:
            if op.op_class != "network" or op.impl not in NO_SHARE_IMPLS:
                raise NfsearchError(f"{where}: nano-op {op.id} asks for 0 SMs; only network nano-ops of impl "
                                    f"{', '.join(sorted(NO_SHARE_IMPLS))} hold no SM share")
        elif not gpu.is_on_grid(op.sm_count):
            raise NfsearchError(f"{where}: nano-op {op.id} asks for {op.sm_count} SMs, not on the GPU's "
                                f"partition grid (a multiple of {gpu.sm_granularity}, or {gpu.num_sms} minus one)")
        for dep in op.deps:
            if dep not in by_id:
                raise NfsearchError(f"{where}: nano-op {op.id} depends on unknown {dep}")
            if by_id[dep].order >= op.order:
                raise NfsearchError(f"{where}: nano-op {op.id} is issued before its dependency {dep}")
        _check_after(op, by_id, where)


def _check_after(op: PlannedOp, by_id: dict[str, PlannedOp], where: str) -> None:
    """An op's `after`: known nano-ops of other streams (its own stream's order says the rest),
    issued earlier, none of them also a data dependency."""
    for other in op.after:
        if other not in by_id:
            raise NfsearchError(f"{where}: nano-op {op.id} starts after unknown {other}")
        if by_id[other].order >= op.order:
            raise NfsearchError(f"{where}: nano-op {op.id} is issued before {other}, which it starts after")
        if by_id[other].stream == op.stream:
            raise NfsearchError(f"{where}: nano-op {op.id} starts after {other} of its own stream "
                                f"(its stream's order already says so)")
        if other in op.deps:
            raise NfsearchError(f"{where}: nano-op {op.id} names {other} both as a dependency and in 'after'")


# JSON Schema counts 2.0 as an integer; a plan's counts and indices must be true integers
_StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, x: isinstance(x, int) and not isinstance(x, bool)))


def _schema() -> dict:
    return json.loads((resources.files("nfsearch") / "schema" / "plan-v2.json").read_text())


def _short(message: str) -> str:
    return message if len(message) <= 160 else message[:157] + "..."
