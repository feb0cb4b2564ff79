"""The plan family file: one plan per engine bucket, with what the family was made for and predicts.

One JSON, validated on every read and write: the envelope by schema/family-v1.json, each bucket's
plan by the plan schema and checks (plan.from_dict). The engine side refuses a family made for
another model, dense batch or bucket set (`Family.check_engine`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jsonschema

from nfsearch import plan as plan_mod
from nfsearch.errors import NfsearchError
from nfsearch.family.collect import Composition
from nfsearch.family.engine_shape import EngineShape, bucket_to_list
from nfsearch.family.predict import BucketPrediction, TracePrediction
from nfsearch.files import read_json, write_text_atomic
from nfsearch.plan import Schedule
from nfsearch.serving.batch import Bucket

SCHEMA_VERSION = 1
KIND = "plan family"


@dataclass(frozen=True)
class BucketPlan:
    bucket: Bucket
    num_iterations: int              # scheduler iterations over the trace that landed in this bucket
    composition: Composition         # the batch the plan was solved for
    is_nominal: bool                 # no iteration landed here: a neighbouring bucket's batch, fitted to it
    prediction: BucketPrediction
    plan_source: str                 # which candidate the search wrote (its last note)
    solve_s: float
    plan: Schedule
    tune: dict | None = None         # `tune --family`: measured times, the plan kept and why (family.tune)

    def to_dict(self) -> dict:
        out = {"bucket": bucket_to_list(self.bucket), "num_iterations": self.num_iterations,
               "composition": self.composition.to_dict(), "is_nominal": self.is_nominal,
               "prediction": self.prediction.to_dict(), "plan_source": self.plan_source,
               "solve_s": self.solve_s, "plan": self.plan.to_dict()}
        return out | ({"tune": self.tune} if self.tune is not None else {})


@dataclass(frozen=True)
class Family:
    model: str
    trace: dict                      # spec, name, num_requests, seed, description
    engine: EngineShape
    memory: dict                     # total_bytes, utilization, other_bytes, dtype
    scheduler_run: dict              # num_iterations, num_real_tokens, num_finished, num_refused, num_preemptions
    profile: dict                    # fingerprint, label
    buckets: tuple[BucketPlan, ...]  # the engine's buckets, smallest first
    prediction: TracePrediction
    solve: dict                      # wall_s, num_workers, time_limit_s, seed
    tune: dict | None = None         # `tune --family`: the measuring run (trace, device, ...) and its outcome

    @property
    def num_iterations(self) -> int:
        return sum(b.num_iterations for b in self.buckets)

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": KIND, "model": self.model, "trace": self.trace,
                "engine": self.engine.to_dict(), "memory": self.memory, "scheduler_run": self.scheduler_run,
                "profile": self.profile, "buckets": [b.to_dict() for b in self.buckets],
                "prediction": self.prediction.to_dict(), "solve": self.solve} | \
            ({"tune": self.tune} if self.tune is not None else {})

    def check_engine(self, model: str, dense_batch: int, buckets: list[Bucket]) -> None:
        """NfsearchError (one line) unless the family was made for this model, dense batch and buckets."""
        if model != self.model:
            raise NfsearchError(f"plan family made for model {self.model}, not {model}")
        if dense_batch != self.engine.dense_batch:
            raise NfsearchError(f"plan family made for dense batch {self.engine.dense_batch}, the engine has "
                                f"{dense_batch} (pass --dense-batch {self.engine.dense_batch} or solve the family "
                                f"with --dense-batch {dense_batch})")
        mine, theirs = sorted(self.engine.buckets), sorted(buckets)
        if mine != theirs:
            raise NfsearchError(f"plan family made for buckets {_short_buckets(mine)}, the engine has "
                                f"{_short_buckets(theirs)}")


def _short_buckets(buckets: list[Bucket]) -> str:
    return ", ".join(f"{b.max_tokens}/{b.max_decode}/{b.max_segments}/{b.max_context}" for b in buckets)


def to_json(family: Family) -> str:
    data = family.to_dict()
    validate(data, "plan family")
    try:
        return json.dumps(data, indent=1, allow_nan=False) + "\n"
    except ValueError:
        raise NfsearchError("plan family holds a non-finite number; refusing to write it") from None


def write(family: Family, path: str | Path) -> None:
    write_text_atomic(path, to_json(family))


def is_family(data) -> bool:
    return isinstance(data, dict) and data.get("kind") == KIND


def read(path: str | Path) -> Family:
    return from_dict(read_json(path), str(path))


def from_dict(data: dict, where: str = "plan family") -> Family:
    validate(data, where)
    buckets = []
    for k, b in enumerate(data["buckets"]):
        plan = plan_mod.from_dict(b["plan"], f"{where}: bucket {k + 1}'s plan")
        buckets.append(BucketPlan(Bucket(*b["bucket"]), b["num_iterations"], Composition.from_dict(b["composition"]),
                                  b["is_nominal"], BucketPrediction.from_dict(b["prediction"]), b["plan_source"],
                                  b["solve_s"], plan, b.get("tune")))
    engine = EngineShape.from_dict(data["engine"])
    if sorted(b.bucket for b in buckets) != sorted(engine.buckets):
        raise NfsearchError(f"{where}: its plans' buckets are not the engine buckets it names")
    p = data["prediction"]
    return Family(data["model"], data["trace"], engine, data["memory"], data["scheduler_run"], data["profile"],
                  tuple(sorted(buckets, key=lambda b: b.bucket)),
                  TracePrediction(p["tokens_per_s"], p["sequential_tokens_per_s"], p["gpu_s"], p["sequential_gpu_s"]),
                  data["solve"], data.get("tune"))


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, x: isinstance(x, int) and not isinstance(x, bool)))


def validate(data, where: str) -> None:
    schema = json.loads((resources.files("nfsearch") / "schema" / "family-v1.json").read_text())
    error = next(iter(sorted(_Validator(schema).iter_errors(data), key=lambda e: list(e.path))), None)
    if error is not None:
        location = "/".join(str(p) for p in error.absolute_path) or "(top)"
        message = error.message if len(error.message) <= 160 else error.message[:157] + "..."
        raise NfsearchError(f"{where}: does not match the plan family schema at {location}: {message}")
