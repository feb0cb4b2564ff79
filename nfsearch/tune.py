"""Tune: run candidate plans on the GPU and keep the fastest one that measured correct.

The candidates are either plan files from a folder, or the solved plan plus the hand-made baselines of
one problem. Every candidate's run report is kept (a failed one records its error), so the choice can
be audited afterwards. Tensor-parallel candidates run as `nfsearch run` runs them (runtime.tp.run_plan:
one process per GPU, each candidate checked against the TP=1 reference), one after another.

The candidates that ran correctly are then timed against each other in one process (under TP, one
process per GPU), interleaved (executor.time_plans, runtime.tp.time_plans), and the choice goes by
those times: candidates timed minutes apart see the clock under the power cap and the temperature
drift between them. The runtime (torch) is imported inside the functions that run plans: reading
candidates and choosing among measured results work without it.
"""

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nfsearch import plan
from nfsearch.cost import Problem
from nfsearch.errors import NfsearchError
from nfsearch.files import write_text_atomic
from nfsearch.plan import Schedule
from nfsearch.runtime.device import check_device, require_cuda
from nfsearch.search import solve
from nfsearch.search.baselines import baselines

Progress = Callable[[str], None] | None


@dataclass(frozen=True)
class Candidate:
    name: str
    schedule: Schedule

    def __post_init__(self):
        if not self.name:
            raise ValueError("a candidate needs a name")


@dataclass(frozen=True)
class Trial:
    """One candidate's run: its measured layer time (None when it failed), its full run report and,
    where the candidates were timed against each other, that record (the measured time is then its
    interleaved median)."""
    name: str
    schedule: Schedule
    measured_layer_ms: float | None
    report: dict
    interleaved: dict | None = None

    def __post_init__(self):
        if self.measured_layer_ms is not None and not (math.isfinite(self.measured_layer_ms)
                                                       and self.measured_layer_ms > 0):
            raise ValueError(f"{self.name}: measured layer time must be finite and positive")


@dataclass(frozen=True)
class TuneResult:
    best: Trial
    trials: tuple[Trial, ...]

    def __post_init__(self):
        if self.best not in self.trials:
            raise ValueError("the best trial must be one of the trials")


def read_candidates(plans_dir: str | Path) -> list[Candidate]:
    """Every *.json plan in `plans_dir`, named by file stem, in name order."""
    folder = Path(plans_dir)
    if not folder.is_dir():
        raise NfsearchError(f"{plans_dir}: no such folder")
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise NfsearchError(f"{plans_dir}: no plan JSON files")
    return [Candidate(p.stem, plan.read(p)) for p in paths]


def solved_candidates(problem: Problem, time_limit_s: float, progress: Progress = None) -> list[Candidate]:
    """The searched plan first; where solve's margin kept the sequential plan, the best overlapped plan
    next (solve --min-gain 0), which the GPU may still find faster: at the power cap the model cannot
    rank plans predicted within a few percent (W3's overlapped plan, predicted 0.4% from its
    sequential twin, runs 1.5-3.2% faster on H100s); then the hand-made baselines it must beat on
    the GPU too. A plan already among them is not run twice."""
    best, _notes = solve(problem, time_limit_s=time_limit_s, progress=progress)
    candidates = [Candidate("solved", best)]
    if best.solver.source == "sequential baseline":
        overlapped, _notes = solve(problem, time_limit_s=time_limit_s, progress=progress, min_gain=0.0)
        candidates.append(Candidate("overlapped", overlapped))
    for name, s in sorted(baselines(problem).items()):
        candidates.append(Candidate(name, s))
    unique = []
    for c in candidates:
        if not any(c.schedule.nano_ops == u.schedule.nano_ops for u in unique):
            unique.append(c)
    return unique


INTERLEAVED_REPEATS = 5          # rounds of the candidates timed against each other (executor.time_plans)


def run_candidates(candidates: list[Candidate], *, mode: str = "green", iters: int = 30, use_graph: bool = True,
                   force: bool = False, progress: Progress = None, profile=None) -> TuneResult:
    """Run each candidate on the CUDA GPU (baselines and ceilings measured once, with the first) and
    return all trials with the fastest correct one. A candidate that fails is recorded, not fatal.
    profile: the table the candidates were solved with; where it has energy, each report's prediction
    is max(replay, power bound) as `nfsearch run --profile` gives it (the choice is by measured time)."""
    if not candidates:
        raise NfsearchError("no candidate plans to tune")
    if len({c.schedule.workload.tp_degree for c in candidates}) > 1:
        raise NfsearchError("candidate plans mix tensor-parallel degrees: tune one TP degree at a time")
    require_cuda("nfsearch tune")
    if candidates[0].schedule.workload.tp_degree > 1:
        from nfsearch.runtime import tp
        for candidate in candidates:
            check_device(candidate.schedule, candidate.name, force)
        trials = run_tp_candidates(candidates, tp.run_plan, mode=mode, iters=iters, use_graph=use_graph,
                                   progress=progress, profile=profile)
        return pick_best(time_against_each_other(trials, lambda plans: tp.time_plans(
            plans, mode=mode, iters=iters, repeats=INTERLEAVED_REPEATS, use_graph=use_graph)))
    from nfsearch.runtime import bench, executor
    say = progress or (lambda _msg: None)
    trials: list[Trial] = []
    ceilings = None
    with executor.ExecContext("cuda", mode) as ctx:
        for candidate in candidates:
            check_device(candidate.schedule, candidate.name, force)

            def run_one(schedule=candidate.schedule):
                nonlocal ceilings
                run = executor.execute(schedule, ctx=ctx, iters=iters, use_graph=use_graph,
                                       with_baselines=not trials, ceilings=ceilings, profile=profile)
                ceilings = ceilings or run.ceilings or bench.ceilings()
                return run.to_dict(), run.measured_layer_ms
            trials.append(_trial(candidate, run_one, say))
        trials = time_against_each_other(trials, lambda plans: executor.time_plans(
            plans, ctx, iters=iters, repeats=INTERLEAVED_REPEATS, use_graph=use_graph, progress=say))
    return pick_best(trials)


def time_against_each_other(trials: list[Trial], time_plans: Callable[[dict], tuple[dict, list[str]]]
                            ) -> list[Trial]:
    """The trials with the candidates that ran timed again against each other: `time_plans(name ->
    plan)` -> (name -> Timing, notes) (executor.time_plans). Each such trial's measured time becomes
    the interleaved median and its `interleaved` the record of every candidate's timing (its report
    stays its own run's); a candidate that ran but failed there is no longer timed, its report's
    error saying why. With fewer than two candidates that ran the trials stay as they were; when the
    interleaved timing fails (out of GPU memory for several graphs, say), too, with a note."""
    ran = [t for t in trials if t.measured_layer_ms is not None]
    if len(ran) < 2:
        return trials
    try:
        timings, notes = time_plans({t.name: t.schedule for t in ran})
    except (NfsearchError, RuntimeError) as exc:     # (torch's errors, out of memory among them, are RuntimeErrors)
        why = {"note": f"interleaved timing failed ({str(exc).splitlines()[0][:200]}); chosen by each "
                       f"candidate's own run"}
        return [Trial(t.name, t.schedule, t.measured_layer_ms, t.report, why) for t in trials]
    record = {"how": f"{INTERLEAVED_REPEATS} interleaved rounds in one process; tune chose by these",
              "timings": {name: timing.to_dict() for name, timing in timings.items()}, "notes": notes}
    out = []
    for t in trials:
        if t.measured_layer_ms is None:
            out.append(t)
            continue
        timing = timings.get(t.name)
        if timing is None:
            why = next((n for n in notes if n.startswith(f"{t.name}:")), f"{t.name}: not timed in the interleaved rounds")
            out.append(Trial(t.name, t.schedule, None, {**t.report, "error": why}, record))
        else:
            out.append(Trial(t.name, t.schedule, timing.layer_ms, t.report, record))
    return out


def interleaved_line(result: TuneResult) -> str:
    """One line: the interleaved times the choice went by, or "" where there were none."""
    timings = (result.best.interleaved or {}).get("timings")
    if not timings:
        return ""
    return "chosen by the interleaved timing: " + "; ".join(
        f"{name} {t['layer_ms']:.4f} ms [{t['min_layer_ms']:.4f}-{t['max_layer_ms']:.4f}]"
        for name, t in timings.items())


def run_tp_candidates(candidates: list[Candidate], run_plan: Callable[..., dict], progress: Progress = None,
                      **run_kwargs) -> list[Trial]:
    """Each TP candidate through `run_plan(plan_path, **kwargs)` (runtime.tp.run_plan on the GPUs: it
    spawns the ranks and returns rank 0's report, raising NfsearchError when a rank fails or the output
    differs from the TP=1 reference); the baselines are timed with the first candidate only."""
    say = progress or (lambda _msg: None)
    trials: list[Trial] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, candidate in enumerate(candidates):
            path = Path(tmp) / f"{i}.json"
            plan.write(candidate.schedule, path)

            def run_one(path=path):
                report = run_plan(str(path), with_baselines=not trials, **run_kwargs)
                return report, float(report["measured_layer_ms"])
            trials.append(_trial(candidate, run_one, say))
    return trials


def _trial(candidate: Candidate, run_one: Callable[[], tuple[dict, float]], say) -> Trial:
    """The candidate's trial from run_one() -> (report, measured layer ms); a failure (NfsearchError) is
    recorded as the candidate's error, so one wrong or unbuildable candidate costs the others nothing."""
    try:
        report, measured = run_one()
    except NfsearchError as exc:
        report, measured = {"workload": candidate.schedule.workload.name, "error": str(exc)}, None
    say(f"{candidate.name}: " + (f"{measured:.4f} ms/layer" if measured is not None
                                 else f"failed ({report.get('error', 'no time measured')})"))
    return Trial(candidate.name, candidate.schedule, measured, report)


def pick_best(trials: list[Trial]) -> TuneResult:
    """The fastest trial that measured a time; ties go to the earlier candidate (the solved plan first)."""
    timed = [t for t in trials if t.measured_layer_ms is not None]
    if not timed:
        raise NfsearchError("no candidate plan ran correctly")
    best = min(timed, key=lambda t: t.measured_layer_ms)
    return TuneResult(best, tuple(trials))


def write_result(result: TuneResult, output: str | Path, command: str) -> Path:
    """Write the best plan to `output` and every trial's report beside it as <stem>.tune.json."""
    record_path = Path(output).with_suffix(".tune.json")
    plan.write(result.best.schedule, output)
    record = {"best": result.best.name, "command": command,
              "candidates": [{"candidate": t.name, **t.report,
                              **({"interleaved": t.interleaved} if t.interleaved is not None else {})}
                             for t in result.trials]}
    write_text_atomic(record_path, json.dumps(record, indent=1, default=float) + "\n")
    return record_path
