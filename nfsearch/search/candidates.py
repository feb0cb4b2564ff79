"""The plans the search weighs (a typed Candidate each), its log, and the solver section of the plan
it writes, which describes that plan: a stage-2 solution's own solve, or that the plan is a stage-1
incumbent or a baseline (no stage-2 gap then: W4's sequential plan once stated a stage-2 model's
"gap 1.95%")."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from nfsearch.cost import Problem
from nfsearch.plan import Schedule, SolverInfo
from nfsearch.search.durations import UNITS_PER_MS
from nfsearch.search.stage1 import Incumbent, structure_of
from nfsearch.simulate import Judgement, judge
from nfsearch.solvers import Stage2Result

Progress = Callable[[str], None] | None

STAGE2, STAGE1, BASELINE = "stage 2", "stage 1", "baseline"

GAP_SCOPE = ("stage-2 model of the chosen structure (pessimistic co-run durations, SM options: the "
             "structure's two-way split or the whole GPU)")


@dataclass(frozen=True)
class Candidate:
    """A plan the search may write, where it comes from, and its judgement (simulate.judge)."""
    source: str                             # "cpsat solution #1", "partition-sweep incumbent #2", ... (+ " + polish")
    kind: str                               # STAGE2 | STAGE1 | BASELINE
    plan: Schedule                          # replay-timed
    rank: int                               # among equal judgements the lower rank wins
    judged: Judgement
    result: Stage2Result | None = None      # the stage-2 solve it is a solution of
    incumbent: Incumbent | None = None      # its structure's stage-1 incumbent (None: a baseline)

    @property
    def makespan_ms(self) -> float:
        """Replayed, of the whole plan (all its layers)."""
        return self.plan.predicted.makespan_ms

    def key(self) -> tuple[float, float, int]:
        """What the search minimises: the judge's ranked time of the whole plan; among plans the power
        bound ties (power-bound alike), the replay; then the rank."""
        return (round(self.judged.ranked_makespan_ms, 9), round(self.makespan_ms, 9), self.rank)


def candidate(problem: Problem, source: str, kind: str, plan: Schedule, rank: int,
              result: Stage2Result | None = None, incumbent: Incumbent | None = None) -> Candidate:
    return Candidate(source, kind, plan, rank, judge(plan, problem.cost), result, incumbent)


@dataclass
class Log:
    """The search's notes (one line each), each also said to `progress` as it is made."""
    progress: Progress = None
    notes: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)

    def add(self, line: str) -> None:
        self.notes.append(line)
        self.say(line)


def plan_ms(makespan_ms: float, problem: Problem) -> str:
    """A whole plan's time, labelled as one: '3.8370 ms for 2 layers'."""
    return f"{makespan_ms:.4f} ms for {problem.num_layers} layer{'s' if problem.num_layers > 1 else ''}"


def solver_info(best: Candidate, backend: str, why: str, settings: str, seed: int, threads: int,
                time_limit_s: float, problem: Problem) -> SolverInfo:
    """The plan's solver section: the search's settings, and the gap, model figures, structure and
    split of the plan written (a stage-1 incumbent's or a baseline's say so, with no gap)."""
    result = best.result if best.kind == STAGE2 else None
    status = {STAGE2: result.status if result else None, STAGE1: "incumbent", BASELINE: "fallback"}[best.kind]
    if result is not None:
        scope = GAP_SCOPE
    elif best.kind == STAGE1:
        scope = "none: the plan is a stage-1 incumbent (partition sweep), not a stage-2 solution"
    else:
        scope = f"none: the plan is the {best.source.split(' + ')[0]}, not a stage-2 solution"
    return SolverInfo(
        name=backend, status=status, gap=round(result.gap, 6) if result else None, seed=int(seed),
        threads=threads, time_limit_s=float(time_limit_s), note=settings, source=best.source, choice=why,
        model_makespan_ms=round(result.makespan / UNITS_PER_MS, 6) if result else None,
        # (a backend that proved no bound may report -inf; the plan then states none)
        model_bound_ms=(round(max(0.0, result.bound) / UNITS_PER_MS, 6)
                        if result and math.isfinite(result.bound) else None),
        gap_scope=scope, structure=structure_of(problem, best.plan).describe(),
        memory_sms=best.incumbent.memory_sms if best.incumbent is not None else None)
