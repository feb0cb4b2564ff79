"""Golden regression: re-solve each golden case and compare it with the committed plan RE-SCORED
under today's model.

A cases file (YAML) lists the cases and the tolerance:

    tolerance: 0.002                 # a re-solve may be at most 0.2% slower than the re-scored golden
    cases:
      - name: W2
        model: llama-3-8b            # bundled name or path
        workload: W2                 # standard id or path
        profile: default             # "default" (bundled table, else analytic), "analytic", or a path
        plan: W2.plan.json           # relative to the cases file
        solver: cpsat
        time_limit_s: 5
        threads: 2
        seed: 0
        plan_from: search             # "search" (default: the plan solve writes) or "stage2": the
                                      # best stage-2 solution alone, so that a broken stage 2 fails
                                      # the check even where an incumbent or a baseline would win
        min_gain: 0.04                # the search's margin over the sequential plan (default solve's)

Re-scoring: the golden plan's SM counts and issue order are judged (simulate.judge: its replay, and
its power bound where the profile prices overlaps, as the search ranks plans) with today's profile
and cost model, so a change of the model moves the golden and the new plan alike and the check
keeps comparing like with like (the stored predicted time is shown beside it, not used). Times are
of the whole plan (all its unrolled layers). The margin too: a plan that does not clear it over the
sequential plan under today's model scores as the sequential plan, which the search would write
instead (so a model change that makes the search keep the sequential plan does not fail the check
against an overlapped golden; `--update` then replaces that golden).

A case fails when the golden plan is unreadable or invalid, when it can no longer be replayed (the
model's graph or the profile no longer fit it: `check --update` replaces it, and says so), when
the new plan fails simulate.verify, or when its predicted makespan exceeds the re-scored golden's by
more than the tolerance. `check --update` (update_goldens) writes a new plan only where it is better
than the re-scored golden under the same model, or where the golden cannot be replayed.
"""

from dataclasses import dataclass, field
from pathlib import Path

from nfsearch import plan as plan_io
from nfsearch.roofline import analytic_profile
from nfsearch.errors import NfsearchError
from nfsearch.files import read_yaml
from nfsearch.cost import default_profile, make_problem
from nfsearch.profile import load as load_profile
from nfsearch import search
from nfsearch.search.baselines import sequential_plan
from nfsearch.search.solve import MIN_GAIN
from nfsearch.simulate import judge, verify
from nfsearch.specs import load_gpu, load_model, load_workload

DEFAULT_TOLERANCE = 0.002
IMPROVEMENT = 1e-6          # (ms) a new plan replaces a golden only when better by more than this


@dataclass(frozen=True)
class CaseResult:
    name: str
    ok: bool
    golden_ms: float | None          # the golden plan re-scored under today's model
    new_ms: float | None
    message: str
    diff: tuple[str, ...] = ()
    stored_ms: float | None = None   # what the golden plan file states (the model it was made with)


@dataclass(frozen=True)
class CheckResult:
    cases: tuple[CaseResult, ...]
    tolerance: float
    failures: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    def report(self) -> str:
        lines = []
        for c in self.cases:
            figures = ""
            if c.golden_ms is not None and c.new_ms is not None:
                stored = f" (stored {c.stored_ms:.4f})" if c.stored_ms is not None else ""
                figures = (f" per plan: golden re-scored {c.golden_ms:.4f} ms{stored}, new plan {c.new_ms:.4f} ms "
                           f"({c.new_ms / c.golden_ms - 1:+.2%})")
            lines.append(f"{'ok  ' if c.ok else 'FAIL'} {c.name}:{figures} {c.message}".rstrip())
            lines += [f"     {d}" for d in c.diff]
        lines.append(f"{sum(c.ok for c in self.cases)}/{len(self.cases)} golden cases pass "
                     f"(tolerance {self.tolerance:.1%})")
        return "\n".join(lines)


def load_cases(cases_file: str | Path) -> tuple[list[dict], float]:
    path = Path(cases_file)
    if not path.is_file():
        raise NfsearchError(f"{path}: no such cases file")
    data = read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list) or not data["cases"]:
        raise NfsearchError(f"{path}: expected a mapping with a non-empty 'cases' list")
    for i, case in enumerate(data["cases"]):
        if not isinstance(case, dict):
            raise NfsearchError(f"{path}: case {i} is not a mapping")
        missing = [k for k in ("name", "model", "workload", "plan") if k not in case]
        if missing:
            raise NfsearchError(f"{path}: case {i} lacks {', '.join(missing)}")
        _check_case_types(case, f"{path}: case {i}")
    tolerance = data.get("tolerance", DEFAULT_TOLERANCE)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance <= 1:
        raise NfsearchError(f"{path}: tolerance must be a number in 0..1, not {tolerance!r}")
    return data["cases"], float(tolerance)


# case keys and their types (the search checks the values themselves: seeds, threads, limits)
_CASE_TYPES = {"name": str, "model": str, "workload": str, "plan": str, "profile": str, "gpu": str,
               "solver": str, "time_limit_s": (int, float), "threads": int, "seed": int, "chunk": int,
               "num_layers": int, "plan_from": str, "min_gain": (int, float)}
PLAN_FROM = ("search", "stage2")


_KIND_NAMES = {"time_limit_s": "a number", "min_gain": "a number", "threads": "an integer", "seed": "an integer", "chunk": "an integer",
               "num_layers": "an integer"}


def _check_case_types(case: dict, where: str) -> None:
    for key, value in case.items():
        kind = _CASE_TYPES.get(key)
        if kind is None:
            raise NfsearchError(f"{where}: unknown key {key!r} (known: {', '.join(_CASE_TYPES)})")
        if isinstance(value, bool) or not isinstance(value, kind):
            raise NfsearchError(f"{where}: {key} must be {_KIND_NAMES.get(key, 'a string')}, not {value!r}")
        if key == "plan_from" and value not in PLAN_FROM:
            raise NfsearchError(f"{where}: plan_from must be one of {', '.join(PLAN_FROM)}, not {value!r}")


def problem_for(case: dict, base: Path):
    model = load_model(_resolve(case["model"], base))
    workload = load_workload(_resolve(case["workload"], base))
    ref = case.get("profile", "default")
    if ref == "default":
        profile = default_profile(model, workload)
    elif ref == "analytic":
        profile = analytic_profile(model, workload, load_gpu(case.get("gpu", "h100-sxm")))
    else:
        profile = load_profile(_resolve(ref, base))
    return make_problem(model, workload, profile, case.get("num_layers", 2))


def case_margin(case: dict) -> float | None:
    """The search's margin over the sequential plan in this case (None: a stage-2 case has none)."""
    return None if case.get("plan_from", "search") == "stage2" else float(case.get("min_gain", MIN_GAIN))


def solve_problem(case: dict, problem):
    margin = case_margin(case)
    return search.solve(problem, solver=case.get("solver", "cpsat"),
                        time_limit_s=float(case.get("time_limit_s", 5)), threads=case.get("threads", 2),
                        seed=case.get("seed", 0), chunk=case.get("chunk", 128),
                        min_gain=MIN_GAIN if margin is None else margin, only_stage2=margin is None)


def judged_ms(problem, schedule, min_gain: float | None = None) -> float:
    """What the check compares, per plan: simulate.judge's ranked time (as the search ranks plans);
    with a margin, that of the sequential plan where `schedule` does not clear it (module doc)."""
    return _judged(problem, schedule, min_gain)[0]


def _judged(problem, schedule, min_gain: float | None) -> tuple[float, bool]:
    """judged_ms, and whether it is the sequential plan's because `schedule` (another plan) misses
    the margin."""
    judged = judge(schedule, problem.cost)
    if min_gain is None:
        return judged.ranked_makespan_ms, False
    seq = judge(sequential_plan(problem), problem.cost)
    if judged.beats(seq, min_gain):
        return judged.ranked_makespan_ms, False
    return seq.ranked_makespan_ms, abs(judged.ranked_makespan_ms - seq.ranked_makespan_ms) > IMPROVEMENT


def run_check(cases_file: str | Path, tolerance: float | None = None, progress=None) -> CheckResult:
    """Re-solve every golden case; the result says which pass and why the others fail."""
    cases, file_tol = load_cases(cases_file)
    tol = file_tol if tolerance is None else float(tolerance)
    base = Path(cases_file).parent
    results = []
    for case in cases:
        if progress:
            progress(f"checking {case['name']}")
        results.append(_check_case(case, base, tol))
    return CheckResult(tuple(results), tol)


class GoldenUnreplayable(NfsearchError):
    """The golden plan no longer fits today's model (graph, profile) and cannot be re-scored."""


def rescore(golden, problem, min_gain: float | None = None) -> float:
    """The golden plan's time under today's model (its SM counts and order judged), per plan."""
    return _rescored(golden, problem, min_gain)[0]


def _rescored(golden, problem, min_gain: float | None) -> tuple[float, bool]:
    try:
        verify(golden)
        return _judged(problem, golden, min_gain)
    except NfsearchError as exc:
        raise GoldenUnreplayable(str(exc)) from None


def _check_case(case: dict, base: Path, tol: float) -> CaseResult:
    name = case["name"]
    try:
        golden = plan_io.read(base / case["plan"])
    except NfsearchError as exc:
        return CaseResult(name, False, None, None, f"golden plan {case['plan']} is unusable: {exc}")
    stored_ms = golden.predicted.makespan_ms
    try:
        problem = problem_for(case, base)
        golden_ms = rescore(golden, problem, case_margin(case))
    except GoldenUnreplayable as exc:
        return CaseResult(name, False, None, None, f"golden plan {case['plan']} is unusable: it can no longer be "
                          f"replayed under today's model ({exc}); `nfsearch check --update` replaces it",
                          stored_ms=stored_ms)
    try:
        schedule, _ = solve_problem(case, problem)
    except NfsearchError as exc:
        return CaseResult(name, False, golden_ms, None, f"re-solve failed: {exc}", stored_ms=stored_ms)
    new_ms = judged_ms(problem, schedule, case_margin(case))
    try:
        verify(schedule)
    except NfsearchError as exc:
        return CaseResult(name, False, golden_ms, new_ms, f"new plan is invalid: {exc}", plan_diff(golden, schedule),
                          stored_ms)
    if new_ms > golden_ms * (1 + tol):
        return CaseResult(name, False, golden_ms, new_ms, f"slower than the re-scored golden by more than {tol:.1%}",
                          plan_diff(golden, schedule), stored_ms)
    return CaseResult(name, True, golden_ms, new_ms, "", (), stored_ms)


def plan_diff(golden, new) -> tuple[str, ...]:
    """Readable differences: solver, structure (nano-batch sizes per op), SM counts per nano-op."""
    lines = []
    g_solver, n_solver = golden.solver, new.solver
    for key in ("name", "status", "gap", "note"):
        if getattr(g_solver, key) != getattr(n_solver, key):
            lines.append(f"solver {key}: {getattr(g_solver, key)!r} -> {getattr(n_solver, key)!r}")
    g_sizes, n_sizes = _sizes(golden), _sizes(new)
    for op in sorted(set(g_sizes) | set(n_sizes)):
        if g_sizes.get(op) != n_sizes.get(op):
            lines.append(f"{op}: nano-batches {g_sizes.get(op)} -> {n_sizes.get(op)}")
    g_sms = {o.id: o.sm_count for o in golden.nano_ops if o.layer == 0}
    n_sms = {o.id: o.sm_count for o in new.nano_ops if o.layer == 0}
    changed = [f"{i} {g_sms[i]}->{n_sms[i]}" for i in sorted(set(g_sms) & set(n_sms)) if g_sms[i] != n_sms[i]]
    if changed:
        lines.append("SM counts (layer 0): " + ", ".join(changed[:12]) + (" ..." if len(changed) > 12 else ""))
    return tuple(lines)


def _sizes(schedule) -> dict[str, list[int]]:
    return {op: [e - s for s, e in ranges] for op, ranges in schedule.nano_batches().items()}


def _resolve(ref: str, base: Path) -> str:
    if ref.endswith((".yaml", ".yml", ".json", ".csv", ".parquet")) and not Path(ref).is_absolute():
        return str(base / ref)
    return ref


def update_goldens(cases_file: str | Path, progress=None) -> list[str]:
    """Re-solve every case; replace its golden plan only where the new plan is better than the golden
    re-scored under the same (today's) model, or where the golden can no longer be replayed or read,
    was made with another profile, or no longer clears the margin over the sequential plan (then the
    new plan is no worse). Returns one line per case saying what was done."""
    cases, _ = load_cases(cases_file)
    base, lines = Path(cases_file).parent, []
    for case in cases:
        if progress:
            progress(f"solving {case['name']}")
        path = base / case["plan"]
        problem = problem_for(case, base)
        schedule, _ = solve_problem(case, problem)
        verify(schedule)
        new_ms = judged_ms(problem, schedule, case_margin(case))
        is_stale = False            # made with another profile, or the search would no longer write it
        try:
            golden = plan_io.read(path)
            golden_ms, is_stale = _rescored(golden, problem, case_margin(case))
            why = "the golden no longer clears the margin over the sequential plan" if is_stale else None
            if golden.profile.fingerprint != problem.profile.fingerprint():
                is_stale, why = True, "the golden was made with another profile"
        except GoldenUnreplayable as exc:
            golden_ms, why = None, f"the golden could no longer be replayed ({str(exc)[:160]})"
        except NfsearchError as exc:
            golden_ms, why = None, f"the golden was unreadable ({str(exc)[:160]})"
        is_worse = golden_ms is not None and new_ms > golden_ms + IMPROVEMENT
        if golden_ms is not None and (is_worse or (not is_stale and new_ms >= golden_ms - IMPROVEMENT)):
            lines.append(f"{case['name']}: kept {path} (re-scored {golden_ms:.4f} ms; the new plan, "
                         f"{new_ms:.4f} ms, is not better under the same model)")
            continue
        plan_io.write(schedule, path)
        lines.append(f"{case['name']}: wrote {path}, {new_ms:.4f} ms: "
                     + (why or f"better than the re-scored golden ({golden_ms:.4f} ms) under the same model"))
    return lines
