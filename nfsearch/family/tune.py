"""`nfsearch tune --family`: per bucket, the family's plan against the same plan run op by op, both
measured on one live engine; the faster stays (issue 25 item 5).

The measurement is `nfsearch bench --plans F --compare` (runtime.family_tune runs it): the engine
alternates every ~100 iterations between the family's plans ("plan": overlapped where a plan splits or
overlaps ops) and the same family run sequentially ("sequential": same buckets and kernels per op, no
side streams), so both see the same stream of batches. Per bucket this module (torch-free) pools each
variant's measured iteration times (median ms), decides, and writes the tuned family:
- a bucket whose plan is sequential already, or with fewer than MIN_ITERATIONS iterations of either
  variant, keeps the plan the search chose (the record says why);
- else the faster median: the searched plan, or the search's sequential plan for the bucket's batch
  (search.baselines.sequential_plan, verified and predicted like the search's own), a tie keeping the
  searched one. The sequential plan names the kernels the cost model finds fastest at the full GPU,
  which may differ from the searched plan's (the ones measured): the record lists any that differ.
Each bucket carries a "tune" record (what was measured, what was kept, why), the family a "tune" record
of the run, and the trace prediction is redone from the kept plans.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from nfsearch.errors import NfsearchError
from nfsearch.family.artifact import BucketPlan, Family
from nfsearch.family.engine_shape import bucket_to_list
from nfsearch.family.predict import predict_trace
from nfsearch.serving.batch import Bucket

MIN_ITERATIONS = 20              # per variant and bucket, for a measured choice
VARIANTS = ("plan", "sequential")  # the engine's variant names: the family's plans, and the same run op by op
DENSE_OPS = ("norm1", "kqv", "o", "norm2", "ug", "act", "d")


@dataclass(frozen=True)
class VariantTime:
    num_iterations: int
    median_ms: float | None          # None without iterations

    @classmethod
    def of(cls, times_ms: list[float]) -> VariantTime:
        return cls(len(times_ms), statistics.median(times_ms) if times_ms else None)

    def to_dict(self) -> dict:
        return {"num_iterations": self.num_iterations, "median_ms": self.median_ms}


@dataclass(frozen=True)
class BucketCompare:
    """One bucket under `bench --plans F --compare`."""
    bucket: Bucket
    is_overlapped: bool              # the family's plan ran overlapped (else both variants are the same)
    plan: VariantTime
    sequential: VariantTime
    predicted_ms: float              # the family's prediction for its plan
    sequential_predicted_ms: float   # and for the search's sequential plan of the same batch

    def to_dict(self) -> dict:
        return {"bucket": bucket_to_list(self.bucket), "is_overlapped": self.is_overlapped,
                "plan": self.plan.to_dict(), "sequential": self.sequential.to_dict(),
                "predicted_ms": self.predicted_ms, "sequential_predicted_ms": self.sequential_predicted_ms}

    @classmethod
    def from_dict(cls, d: dict) -> BucketCompare:
        return cls(Bucket(*d["bucket"]), d["is_overlapped"], VariantTime(**d["plan"]),
                   VariantTime(**d["sequential"]), d["predicted_ms"], d["sequential_predicted_ms"])


def compare_buckets(family: Family, buckets: list[Bucket], overlapped: set[Bucket], iterations) -> list[BucketCompare]:
    """Per engine bucket (`buckets`, the engine's order): each variant's iteration times. iterations:
    records with .bucket (index into buckets), .variant and .time_ms (runtime.engine.IterationRecord)."""
    times: dict[tuple[int, str], list[float]] = {}
    for it in iterations:
        times.setdefault((it.bucket, it.variant), []).append(it.time_ms)
    planned = {b.bucket: b.prediction for b in family.buckets}
    return [BucketCompare(b, b in overlapped, VariantTime.of(times.get((k, "plan"), [])),
                          VariantTime.of(times.get((k, "sequential"), [])), planned[b].iteration_ms,
                          planned[b].sequential_iteration_ms) for k, b in enumerate(buckets)]


@dataclass(frozen=True)
class Choice:
    kept: str                        # "searched" (the family's plan) or "sequential"
    reason: str


def choose(c: BucketCompare, min_iterations: int = MIN_ITERATIONS) -> Choice:
    """Which plan the bucket keeps, and why."""
    if not c.is_overlapped:
        return Choice("searched", "its plan runs op by op already: both variants are the same")
    few = min(c.plan.num_iterations, c.sequential.num_iterations)
    if few < min_iterations:
        return Choice("searched", f"too few iterations to choose ({c.plan.num_iterations} overlapped, "
                                  f"{c.sequential.num_iterations} sequential; {min_iterations} per variant needed)")
    over, seq = c.plan.median_ms, c.sequential.median_ms
    if seq < over:
        return Choice("sequential", f"sequential {seq:.4f} ms < overlapped {over:.4f} ms (medians)")
    return Choice("searched", f"overlapped {over:.4f} ms <= sequential {seq:.4f} ms (medians)")


def kernel_differences(searched, sequential) -> dict[str, list[str]]:
    """Dense ops whose impl differs between two plans: op -> [searched impls, sequential impls]."""
    def impls(plan) -> dict[str, str]:
        named: dict[str, set[str]] = {}
        for op in plan.nano_ops:
            named.setdefault(op.op, set()).add(op.impl)
        return {op: ",".join(sorted(v)) for op, v in named.items()}
    a, b = impls(searched), impls(sequential)
    return {op: [a.get(op, ""), b.get(op, "")] for op in DENSE_OPS if a.get(op) != b.get(op)}


def tuned_family(family: Family, compares: list[BucketCompare], make_sequential, run: dict,
                 min_iterations: int = MIN_ITERATIONS) -> Family:
    """The family with each bucket's kept plan and its tune record. make_sequential(BucketPlan) ->
    (Schedule, BucketPrediction): the search's sequential plan of the bucket's batch, asked only for the
    buckets that keep it. run: the measurement's context (trace, requests, device, ...), recorded."""
    by_bucket = {c.bucket: c for c in compares}
    missing = [b.bucket for b in family.buckets if b.bucket not in by_bucket]
    if missing:
        raise NfsearchError(f"the measured run has no bucket {bucket_to_list(missing[0])} of the family")
    buckets = []
    for bp in family.buckets:
        c = by_bucket[bp.bucket]
        choice = choose(c, min_iterations)
        record = {"kept": choice.kept, "reason": choice.reason, "min_iterations": min_iterations,
                  "is_overlapped": c.is_overlapped, "overlapped": c.plan.to_dict(),
                  "sequential": c.sequential.to_dict(), "predicted_ms": c.predicted_ms,
                  "sequential_predicted_ms": c.sequential_predicted_ms}
        if choice.kept == "sequential":
            plan, prediction = make_sequential(bp)
            record["replaced"] = {"plan_source": bp.plan_source, "iteration_ms": bp.prediction.iteration_ms,
                                  "kernel_differences": kernel_differences(bp.plan, plan)}
            bp = replace(bp, plan=plan, prediction=prediction, plan_source="sequential (tune: measured faster)")
        buckets.append(replace(bp, tune=record))
    num_tokens = family.scheduler_run["num_real_tokens"]
    prediction = predict_trace([(b.num_iterations, b.prediction) for b in buckets], num_tokens)
    summary = {**run, "min_iterations": min_iterations,
               "num_sequential": sum(b.tune["kept"] == "sequential" for b in buckets),
               "num_too_few": sum(b.tune["reason"].startswith("too few") for b in buckets)}
    return replace(family, buckets=tuple(buckets), prediction=prediction, tune=summary)


def format_compare(compares: list[BucketCompare], choices: list[Choice] | None = None) -> list[str]:
    """Per bucket: iterations and median ms of each variant beside the predicted ms (and the choice)."""
    lines = [f"{'bucket':>20} {'overlapped: its/median/pred ms':>31} {'sequential: its/median/pred ms':>31}"]
    for k, c in enumerate(compares):
        name = "/".join(str(x) for x in bucket_to_list(c.bucket))
        cells = [f"{v.num_iterations:>5} {_ms(v.median_ms):>9} {p:>9.3f}" for v, p in
                 ((c.plan, c.predicted_ms), (c.sequential, c.sequential_predicted_ms))]
        tail = "" if c.is_overlapped else "  (plan sequential: same kernels both ways)"
        if choices is not None:
            tail += f"  -> {choices[k].kept}: {choices[k].reason}"
        lines.append(f"{name:>20} {cells[0]:>31} {cells[1]:>31}{tail}")
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def sequential_maker(family: Family, spec, profile_path: str | None = None):
    """make_sequential for tuned_family: each bucket's batch priced with the profile the family was solved
    with (the bundled one of the model, or the analytic H100's, unless profile_path is given; refused when
    it is not the family's: a file by its fingerprint, the analytic profile by its label)."""
    from nfsearch.cost import make_problem
    from nfsearch.family import build
    from nfsearch.family.predict import predict_bucket
    from nfsearch.search.baselines import sequential_plan
    from nfsearch.simulate import verify
    path = build._profile_path(profile_path, spec)
    kv_cache_dtype = family.memory.get("kv_cache_dtype") or "auto"

    def make(bp: BucketPlan):
        task = build.BucketTask(0, bp.bucket, bp.composition, spec, path, 0.0, 0, 128, 0.0, kv_cache_dtype)
        workload = task.workload()
        profile = build._profile(path, spec, workload, kv_cache_dtype)     # its engine view for the family's cache
        # an analytic profile is made per batch (its fingerprint with it): its label must match
        same = profile.label == family.profile["label"] if path is None else \
            profile.fingerprint() == family.profile["fingerprint"]
        if not same:
            raise NfsearchError(f"the family was solved with profile {family.profile['label']!r}, not "
                                f"{profile.label!r}: pass the family's profile (--profile)")
        problem = make_problem(spec, workload, profile, bp.plan.num_layers)
        plan = build.whole_ops_at_rows(sequential_plan(problem), problem, bp.bucket.max_tokens)
        verify(plan)
        return plan, predict_bucket(problem, plan, bp.bucket)
    return make
