"""The schedule (plan) type and its versioned JSON form, validated on every read and write.

A Schedule is what stage 2 of the search, or a hand-made plan, hands to the simulator and the
executor: every nano-op of the unrolled layers with its stream, issue order, SM count, impl,
dependencies and predicted start/end.
"""

import json
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import jsonschema

from nfsearch.errors import NfsearchError
from nfsearch.files import read_json, write_text_atomic
from nfsearch.specs import ModelSpec, Workload

SCHEMA_VERSION = 1


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
    start_ms: float
    end_ms: float

    @property
    def num_tokens(self) -> int:
        return self.tokens[1] - self.tokens[0]


@dataclass(frozen=True)
class Schedule:
    model: ModelSpec
    workload: Workload
    gpu: dict
    profile: dict
    num_layers: int
    nano_ops: tuple[PlannedOp, ...]
    predicted: dict
    solver: dict = field(default_factory=dict)

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

    def with_times(self, times: dict[str, tuple[float, float]], predicted: dict) -> "Schedule":
        ops = tuple(replace(op, start_ms=times[op.id][0], end_ms=times[op.id][1]) for op in self.nano_ops)
        return replace(self, nano_ops=ops, predicted=predicted)

    def to_dict(self) -> dict:
        ops = sorted(self.nano_ops, key=lambda o: o.order)
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model.to_dict(),
            "workload": self.workload.to_dict(),
            "gpu": dict(self.gpu),
            "profile": dict(self.profile),
            "num_layers": self.num_layers,
            "streams": self.streams,
            "nano_batches": self.nano_batches(),
            "nano_ops": [_op_dict(op) for op in ops],
            "predicted": {k: round(float(v), 6) for k, v in self.predicted.items()},
            "solver": dict(self.solver),
        }


def to_json(schedule: Schedule) -> str:
    data = schedule.to_dict()
    validate(data, "plan")
    return json.dumps(data, indent=1, sort_keys=False) + "\n"


def write(schedule: Schedule, path: str | Path) -> None:
    write_text_atomic(path, to_json(schedule))


def read(path: str | Path) -> Schedule:
    return from_dict(read_json(path), str(path))


def from_dict(data: dict, where: str = "plan") -> Schedule:
    validate(data, where)
    try:
        model = ModelSpec(**data["model"])
        workload = Workload(**{**data["workload"], "prefill_lengths": tuple(data["workload"]["prefill_lengths"])})
    except TypeError as exc:
        raise NfsearchError(f"{where}: {exc}") from None
    ops = tuple(PlannedOp(**{**o, "tokens": tuple(o["tokens"]), "deps": tuple(o["deps"])})
                for o in data["nano_ops"])
    schedule = Schedule(model, workload, data["gpu"], data["profile"], data["num_layers"], ops,
                        data["predicted"], data["solver"])
    check_structure(schedule, where)
    return schedule


def validate(data: dict, where: str) -> None:
    validator = _StrictValidator(_schema())
    error = next(iter(sorted(validator.iter_errors(data), key=lambda e: list(e.path))), None)
    if error is not None:
        location = "/".join(str(p) for p in error.absolute_path) or "(top)"
        raise NfsearchError(f"{where}: does not match the plan schema at {location}: "
                            f"{_short(error.message)}")


def check_structure(schedule: Schedule, where: str) -> None:
    """What the schema cannot say: unique ids and orders, known deps issued earlier, valid ranges."""
    ids = [op.id for op in schedule.nano_ops]
    orders = [op.order for op in schedule.nano_ops]
    if len(set(ids)) != len(ids):
        raise NfsearchError(f"{where}: nano-op ids are not unique")
    if len(set(orders)) != len(orders):
        raise NfsearchError(f"{where}: two nano-ops share an issue order")
    by_id = schedule.by_id()
    for op in schedule.nano_ops:
        if op.id != f"L{op.layer}.{op.op}#{op.index}":
            raise NfsearchError(f"{where}: nano-op id {op.id} does not match its layer/op/index")
        if not op.tokens[0] < op.tokens[1] or op.end_ms < op.start_ms:
            raise NfsearchError(f"{where}: nano-op {op.id} has an empty token range or ends before it starts")
        if op.layer >= schedule.num_layers or op.sm_count > schedule.gpu["num_sms"]:
            raise NfsearchError(f"{where}: nano-op {op.id} is outside the plan's layers or SMs")
        for dep in op.deps:
            if dep not in by_id:
                raise NfsearchError(f"{where}: nano-op {op.id} depends on unknown {dep}")
            if by_id[dep].order >= op.order:
                raise NfsearchError(f"{where}: nano-op {op.id} is issued before its dependency {dep}")


def _op_dict(op: PlannedOp) -> dict:
    d = asdict(op)
    d["tokens"] = list(op.tokens)
    d["deps"] = list(op.deps)
    d["start_ms"] = round(op.start_ms, 6)
    d["end_ms"] = round(op.end_ms, 6)
    return d


# JSON Schema counts 2.0 as an integer; a plan's counts and indices must be true integers
_StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, x: isinstance(x, int) and not isinstance(x, bool)))


def _schema() -> dict:
    return json.loads((resources.files("nfsearch") / "schema" / "plan-v1.json").read_text())


def _short(message: str) -> str:
    return message if len(message) <= 160 else message[:157] + "..."
