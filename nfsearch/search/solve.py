"""The search pipeline: stage 1 (structures x SM partitions, replayed), stage 2 (SM allocation by a
solver backend), then the best by replay of the solver's plan, the incumbent and the baselines.

Same inputs and seed give a byte-identical plan: everything but CP-SAT is deterministic, and CP-SAT
stops on deterministic work.
"""

import math
import time
from typing import Callable

from nfsearch.cost import Problem
from nfsearch.errors import NfsearchError
from nfsearch.plan import Schedule, SolverInfo, check_seed, check_threads, check_time_limit
from nfsearch.search.baselines import baselines
from nfsearch.search.durations import UNITS_PER_MS, Durations
from nfsearch.search.stage1 import sweep
from nfsearch.search.stage2 import plan_from_result, stage2_from
from nfsearch.simulate import verify
from nfsearch.solvers import resolve

Progress = Callable[[str], None] | None


def solve(problem: Problem, solver: str = "auto", time_limit_s: float = 10.0, threads: int = 2, seed: int = 0,
          chunk: int = 128, progress: Progress = None) -> tuple[Schedule, list[str]]:
    """Search a schedule for `problem`; returns it and notes (one line each) on what was done."""
    # checked here, not only in the CLI: a NaN limit once reached the plan file as invalid JSON
    check_time_limit(time_limit_s)
    check_threads(threads)
    check_seed(seed)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise NfsearchError(f"chunk must be an integer >= 1, not {chunk!r}")
    began = time.perf_counter()
    notes: list[str] = []
    say = progress or (lambda _msg: None)

    # stage 1 + incumbent: every structure of the family at every compute/memory partition, replayed
    say("stage 1: structures x SM partitions, each replayed")
    ranked = sweep(problem, chunk)
    if not ranked:
        raise NfsearchError(f"no nano-batch structure with chunk {chunk} can be timed from the profile")
    inc = ranked[0]
    notes.append(f"stage 1: {inc.frame.structure.describe()} with overlappers on {inc.memory_sms} SMs: "
                 f"replay {inc.judge_ms:.4f} ms ({len(ranked)} structures swept)")
    say(notes[-1])

    # stage 2: the incumbent's structure, SM options near its shares, the incumbent as a full hint
    durs = Durations(problem)
    data = stage2_from(problem, inc, durs)
    backend, why = resolve(solver, data)
    notes.append(f"stage 2 solver: {why}; {len(data.tasks)} tasks, "
                 f"{sum(len(t.choices) for t in data.tasks)} (task, SM count) options")
    say(notes[-1])
    hint_ms = max(data.hint[i][0] + dict(t.choices)[data.hint[i][1]] for i, t in enumerate(data.tasks))
    # CP-SAT stops on deterministic work (reproducible); a wall-clock backend (Gurobi) gets what is left
    limit = time_limit_s if backend.name == "cpsat" else max(0.2 * time_limit_s, time_limit_s - (time.perf_counter() - began))
    result = backend.run(data, limit, threads, seed)
    settings = backend.settings(time_limit_s, threads, seed)

    entries = []                                       # (replay ms, preference, name, plan)
    solved = None
    if result is not None:
        solved = plan_from_result(problem, inc.frame, data, result, durs)
        entries.append((solved.predicted.makespan_ms, 0, f"{backend.name} solution", solved))
        notes.append(f"stage 2: model makespan {result.makespan / UNITS_PER_MS:.4f} ms (hint "
                     f"{hint_ms / UNITS_PER_MS:.4f}), model bound {result.bound / UNITS_PER_MS:.4f}, gap "
                     f"{result.gap:.2%} ({result.status}); replay {solved.predicted.makespan_ms:.4f} ms")
    else:
        notes.append("stage 2 found no schedule in its limit")
    say(notes[-1])
    entries.append((inc.judge_ms, 1, "partition-sweep incumbent", inc.plan))
    for k, (name, plan) in enumerate(sorted(baselines(problem, chunk).items())):
        entries.append((plan.predicted.makespan_ms, 2 + k, f"{name} baseline", plan))
    ms, _, source, plan = min(entries, key=lambda e: (round(e[0], 9), e[1]))
    wall = time.perf_counter() - began
    notes.append(f"plan: {source}, {ms:.4f} ms (replay); search wall time {wall:.2f} s")
    say(notes[-1])
    # (wall time goes to the notes, not the plan: the same inputs and seed give a byte-identical plan)
    status = result.status if result else "no solution"
    info = SolverInfo(
        name=backend.name, status="fallback" if source.endswith("baseline") else status,
        gap=round(result.gap, 6) if result else None, seed=int(seed), threads=int(threads),
        time_limit_s=float(time_limit_s), note=settings, source=source, choice=why,
        model_makespan_ms=round(result.makespan / UNITS_PER_MS, 6) if result else None,
        # (a backend that proved no bound may report -inf; the plan then states none)
        model_bound_ms=(round(max(0.0, result.bound) / UNITS_PER_MS, 6)
                        if result and math.isfinite(result.bound) else None),
        gap_scope=("stage-2 model of the chosen structure (pessimistic co-run durations, "
                   "SM options near the incumbent's)") if result else None,
        structure=inc.frame.structure.describe(), memory_sms=inc.memory_sms)
    schedule = Schedule(plan.model, plan.workload, plan.gpu, plan.profile, plan.num_layers, plan.nano_ops,
                        plan.predicted, info)
    verify(schedule)
    return schedule, notes
