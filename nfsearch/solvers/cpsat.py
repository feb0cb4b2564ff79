"""Stage 2 with OR-Tools CP-SAT: SM counts and start times of fixed nano-ops, minimum makespan.

Determinism: the same data, seed, thread count and time limit give the same solution. The search
(search/solve.py) always passes one thread (`num_workers=1`: one deterministic search path, the same
on any machine) and runs several structures side by side instead; the solve stops on
`max_deterministic_time` (a work measure, not the clock). A wall-clock limit is kept only as a
safety net far above it; a run that hits it is flagged (and may not be reproducible).
"""

import time

try:        # a dependency, but only a search needs it: running, tuning or checking a plan does not
    from ortools.sat.python import cp_model
except ImportError:
    cp_model = None

from nfsearch.solvers.base import Solver, Stage2Data, Stage2Result

# CP-SAT's deterministic time against the clock on this model with one worker: about 0.3-1 units per
# wall second on a 2-core machine for the W1-W3 stage-2 models (less while other work loads it), so
# a time limit of T s becomes max_deterministic_time = DET_PER_SECOND * T, which keeps a solve within
# about T s even on a loaded machine
DET_PER_SECOND = 0.3
WALL_SAFETY = (3.0, 5.0)          # wall limit = 3 x the time limit + 5 s (a safety net only)


def _heads(data: Stage2Data) -> list[int]:
    """Earliest start of each task with every predecessor at its fastest choice (tasks in DAG order)."""
    fastest = [min(d for _, d in t.choices) for t in data.tasks]
    head = [0] * len(data.tasks)
    preds: dict[int, list[int]] = {}
    for i, j in data.edges:
        preds.setdefault(j, []).append(i)
    for j in range(len(data.tasks)):
        head[j] = max((head[i] + fastest[i] + data.lag(i, j) for i in preds.get(j, ())), default=0)
    return head


class CpSatSolver(Solver):
    name = "cpsat"

    def available(self, data: Stage2Data | None = None) -> tuple[bool, str]:
        return (True, "") if cp_model is not None else (False, "ortools is not installed (pip install ortools)")

    def settings(self, time_limit_s: float, threads: int, seed: int) -> str:
        return (f"cp-sat num_workers={threads}, random_seed={seed}, "
                f"max_deterministic_time={DET_PER_SECOND * time_limit_s:g} (= {DET_PER_SECOND} x the time limit)")

    def build(self, data: Stage2Data) -> dict:
        # data
        tasks, horizon = data.tasks, data.horizon
        model = cp_model.CpModel()

        # variables: one SM choice per group (same nano-op in every layer), start/end per task
        pick = {}
        for group, members in data.groups().items():
            for sms, _ in tasks[members[0]].choices:
                pick[group, sms] = model.new_bool_var(f"{group}@{sms}")
        start, end, dur, master, by_choice = [], [], [], [], []
        for i, t in enumerate(tasks):
            s = model.new_int_var(0, horizon, f"{t.id}.start")
            e = model.new_int_var(0, horizon, f"{t.id}.end")
            duration = model.new_int_var_from_domain(
                cp_model.Domain.from_values([d for _, d in t.choices]), f"{t.id}.duration")
            model.add(duration == sum(d * pick[t.group, sms] for sms, d in t.choices))
            master.append(model.new_interval_var(s, duration, e, f"{t.id}"))
            dur.append(duration)
            by_choice.append([(sms, model.new_optional_fixed_size_interval_var(
                s, d, pick[t.group, sms], f"{t.id}@{sms}")) for sms, d in t.choices])
            start.append(s)
            end.append(e)
        makespan = model.new_int_var(0, horizon, "makespan")

        # rule: each nano-op runs on exactly one SM count, the same in every layer
        for group, members in data.groups().items():
            model.add_exactly_one(pick[group, sms] for sms, _ in tasks[members[0]].choices)

        # rule: one op at a time per stream
        for stream in sorted({t.stream for t in tasks}):
            model.add_no_overlap(master[i] for i, t in enumerate(tasks) if t.stream == stream)

        # rule: the SMs in use never exceed the GPU's
        model.add_cumulative([iv for row in by_choice for _, iv in row],
                            [sms for row in by_choice for sms, _ in row], data.num_sms)

        # rule: a nano-op starts after the nano-ops it reads from end
        for i, j in data.edges:
            model.add(start[j] >= end[i] + data.lag(i, j))

        # rule: the makespan covers every task; redundant energy cut (SM x time) tightens the bound
        for i in range(len(tasks)):
            model.add(makespan >= end[i])
        model.add(sum(sms * d * pick[t.group, sms] for t in tasks for sms, d in t.choices)
                  <= data.num_sms * makespan)
        # redundant stream cuts: a stream's ops run one after another, so the makespan covers their
        # durations plus the shortest path into the stream's first op (a lower bound for every op)
        head = _heads(data)
        for stream in sorted({t.stream for t in tasks}):
            members = [i for i, t in enumerate(tasks) if t.stream == stream]
            model.add(makespan >= min(head[i] for i in members) + sum(dur[i] for i in members))

        # objective
        model.minimize(makespan)

        # a complete hint (start, end, duration, SM pick, makespan) is a feasible first solution
        hint_end = 0
        for i, (hint_start, hint_sms) in sorted(data.hint.items()):
            d = dict(tasks[i].choices)[hint_sms]
            model.add_hint(start[i], hint_start)
            model.add_hint(end[i], hint_start + d)
            model.add_hint(dur[i], d)
            hint_end = max(hint_end, hint_start + d)
        if len(data.hint) == len(tasks):
            model.add_hint(makespan, hint_end)
        hinted = {tasks[i].group: sms for i, (_, sms) in data.hint.items()}
        for (group, sms), var in pick.items():
            if group in hinted:
                model.add_hint(var, int(hinted[group] == sms))
        return {"model": model, "data": data, "start": start, "pick": pick, "makespan": makespan}

    def solve(self, model: dict, time_limit_s: float, threads: int, seed: int):
        solver = cp_model.CpSolver()
        params = solver.parameters
        params.num_workers = max(1, int(threads))
        params.interleave_search = int(threads) > 1       # (deterministic batches when several workers)
        params.random_seed = int(seed)
        params.max_deterministic_time = DET_PER_SECOND * float(time_limit_s)
        params.max_time_in_seconds = WALL_SAFETY[0] * float(time_limit_s) + WALL_SAFETY[1]
        began = time.perf_counter()
        status = solver.solve(model["model"])
        wall = time.perf_counter() - began
        return solver, status, wall, wall >= params.max_time_in_seconds * 0.99

    def extract(self, model: dict, raw) -> Stage2Result:
        solver, status, wall, hit_wall = raw
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return None
        data: Stage2Data = model["data"]
        starts = tuple(int(solver.value(s)) for s in model["start"])
        sm_counts, durations = [], []
        for t in data.tasks:
            sms, d = next((sms, d) for sms, d in t.choices if solver.boolean_value(model["pick"][t.group, sms]))
            sm_counts.append(sms)
            durations.append(d)
        makespan = int(solver.value(model["makespan"]))
        bound = float(solver.best_objective_bound)
        state = "optimal" if status == cp_model.OPTIMAL else "feasible"
        return Stage2Result(state + (" (wall-clock safety limit hit)" if hit_wall else ""), starts,
                            tuple(sm_counts), tuple(durations), makespan, min(bound, makespan), wall)
