"""Stage 2 with Gurobi (optional: pip install nfsearch[gurobi]): the same model as cpsat.py as a MILP.

Gurobi has no interval variables, so the rules become big-M disjunctions over pairs of tasks that
may run at the same time (different DAG branches): one order binary per pair on a stream, and the
SM cap checked at every task's start (usage only rises at starts). Start times are integers in the
same units as CP-SAT, so both backends have the same optimum. Determinism: Gurobi is deterministic
for a fixed Seed and Threads; the limit is `WorkLimit` (deterministic work units), not the clock.
gurobipy is imported lazily; the size-limited pip licence allows 2000 variables and constraints.
"""

import time

import networkx as nx

from nfsearch.solvers.base import Solver, Stage2Data, Stage2Result

PIP_LICENCE_LIMIT = 2000
_LIMIT_CACHE: dict = {}


def _gurobipy():
    import gurobipy  # noqa: PLC0415 - optional dependency, imported on use
    return gurobipy


def licence_limit() -> tuple[int | None, str]:
    """(size limit or None for unlimited, reason) for this machine's Gurobi; raises if unusable."""
    if "limit" not in _LIMIT_CACHE:
        gp = _gurobipy()
        with gp.Env(params={"OutputFlag": 0}) as env, gp.Model(env=env) as m:
            xs = m.addVars(PIP_LICENCE_LIMIT + 1)
            m.setObjective(xs.sum())
            try:
                m.optimize()
                _LIMIT_CACHE["limit"] = None
            except gp.GurobiError as exc:
                if getattr(exc, "errno", None) != 10010:
                    raise
                _LIMIT_CACHE["limit"] = PIP_LICENCE_LIMIT
    return _LIMIT_CACHE["limit"], ""


def model_size(data: Stage2Data) -> tuple[int, int]:
    """(variables, constraints) of the MILP built for `data`."""
    plan = _pairs(data)
    groups = data.groups()
    nvars = sum(len(data.tasks[m[0]].choices) for m in groups.values()) + len(data.tasks) + 1
    nvars += len(plan["stream_pairs"]) + 3 * len(plan["active_pairs"])
    ncons = len(groups) + 2 * len(data.tasks) + len(data.edges) + 2 * len(plan["stream_pairs"])
    ncons += 3 * len(plan["active_pairs"]) + len(data.tasks) + 1
    return nvars, ncons


def _pairs(data: Stage2Data) -> dict:
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(data.tasks)))
    dag.add_edges_from(data.edges)
    closure = nx.transitive_closure_dag(dag)
    n = len(data.tasks)
    free = [(i, j) for i in range(n) for j in range(i + 1, n)
            if not closure.has_edge(i, j) and not closure.has_edge(j, i)]
    stream_pairs = [(i, j) for i, j in free if data.tasks[i].stream == data.tasks[j].stream]
    cross = [(i, j) for i, j in free if data.tasks[i].stream != data.tasks[j].stream]
    active_pairs = [(j, i) for i, j in cross] + [(i, j) for i, j in cross]   # (j active at start of i)
    return {"stream_pairs": stream_pairs, "active_pairs": active_pairs}


class GurobiSolver(Solver):
    name = "gurobi"

    def available(self, data: Stage2Data | None = None) -> tuple[bool, str]:
        try:
            _gurobipy()
        except ImportError:
            return False, "gurobipy is not installed (pip install gurobipy)"
        try:
            limit, _ = licence_limit()
        except Exception as exc:  # GurobiError: no licence, expired, ...
            return False, f"gurobipy has no usable licence ({str(exc).splitlines()[0]})"
        if data is not None and limit is not None:
            nvars, ncons = model_size(data)
            if max(nvars, ncons) > limit:
                return False, (f"the model ({nvars} variables, {ncons} constraints) exceeds the "
                               f"size-limited Gurobi licence ({limit})")
        return True, ""

    def settings(self, time_limit_s: float, threads: int, seed: int) -> str:
        return f"gurobi Threads={threads}, Seed={seed}, WorkLimit={time_limit_s:g}"

    def build(self, data: Stage2Data) -> dict:
        gp = _gurobipy()
        GRB = gp.GRB
        # data
        tasks, big_m, cap = data.tasks, data.horizon, data.num_sms
        pairs = _pairs(data)
        env = gp.Env(params={"OutputFlag": 0})
        m = gp.Model("stage2", env=env)

        # variables: SM pick per group (shared by the layers), integer start per task
        pick = {(g, sms): m.addVar(vtype=GRB.BINARY, name=f"{g}@{sms}")
                for g, members in data.groups().items() for sms, _ in tasks[members[0]].choices}
        start = [m.addVar(vtype=GRB.INTEGER, lb=0, ub=big_m, name=f"{t.id}.start") for t in tasks]
        makespan = m.addVar(lb=0, ub=big_m, name="makespan")
        dur = [gp.quicksum(d * pick[t.group, sms] for sms, d in t.choices) for t in tasks]
        demand = [gp.quicksum(sms * pick[t.group, sms] for sms, _ in t.choices) for t in tasks]
        end = [start[i] + dur[i] for i in range(len(tasks))]

        # rule: each nano-op runs on exactly one SM count, the same in every layer
        for g, members in data.groups().items():
            m.addConstr(gp.quicksum(pick[g, sms] for sms, _ in tasks[members[0]].choices) == 1, name=f"one.{g}")

        # rule: one op at a time per stream (order binary per pair that is not ordered by the DAG)
        for i, j in pairs["stream_pairs"]:
            before = m.addVar(vtype=GRB.BINARY, name=f"{tasks[i].id}<{tasks[j].id}")
            m.addConstr(start[j] >= end[i] - big_m * (1 - before))
            m.addConstr(start[i] >= end[j] - big_m * before)

        # rule: the SMs in use at every task's start never exceed the GPU's
        used = {i: [] for i in range(len(tasks))}
        for j, i in pairs["active_pairs"]:
            later = m.addVar(vtype=GRB.BINARY, name=f"{tasks[j].id}>{tasks[i].id}")     # j starts after i
            done = m.addVar(vtype=GRB.BINARY, name=f"{tasks[j].id}|{tasks[i].id}")      # j ended by i's start
            share = m.addVar(lb=0, ub=cap, name=f"{tasks[j].id}@{tasks[i].id}")
            m.addConstr(start[j] >= start[i] + 1 - big_m * (1 - later))
            m.addConstr(end[j] <= start[i] + big_m * (1 - done))
            m.addConstr(share >= demand[j] - cap * (later + done))
            used[i].append(share)
        for i in range(len(tasks)):
            if used[i]:
                m.addConstr(demand[i] + gp.quicksum(used[i]) <= cap, name=f"sms.{tasks[i].id}")

        # rule: a nano-op starts after the nano-ops it reads from end
        for i, j in data.edges:
            m.addConstr(start[j] >= end[i] + data.lag(i, j))

        # rule: the makespan covers every task; energy cut as in the CP-SAT model
        for i in range(len(tasks)):
            m.addConstr(makespan >= end[i])
        m.addConstr(gp.quicksum(sms * d * pick[t.group, sms] for t in tasks for sms, d in t.choices)
                    <= cap * makespan)

        # objective
        m.setObjective(makespan, GRB.MINIMIZE)
        for i, (hint_start, hint_sms) in data.hint.items():
            start[i].Start = hint_start
        for i, (_, hint_sms) in data.hint.items():
            for sms, _ in tasks[i].choices:
                pick[tasks[i].group, sms].Start = int(sms == hint_sms)
        return {"model": m, "env": env, "data": data, "start": start, "pick": pick, "makespan": makespan}

    def solve(self, model: dict, time_limit_s: float, threads: int, seed: int):
        m = model["model"]
        m.Params.Threads = max(1, int(threads))
        m.Params.Seed = int(seed)
        m.Params.WorkLimit = float(time_limit_s)
        m.Params.MIPGap = 0.0
        began = time.perf_counter()
        m.optimize()
        return time.perf_counter() - began

    def extract(self, model: dict, wall) -> Stage2Result | None:
        gp = _gurobipy()
        m, data = model["model"], model["data"]
        try:
            if m.SolCount == 0:
                return None
            sm_counts, durations, starts = [], [], []
            for i, t in enumerate(data.tasks):
                sms, d = max(t.choices, key=lambda c: model["pick"][t.group, c[0]].X)
                sm_counts.append(sms)
                durations.append(d)
                starts.append(int(round(model["start"][i].X)))
            makespan = max(s + d for s, d in zip(starts, durations))
            status = "optimal" if m.Status == gp.GRB.OPTIMAL else "feasible"
            bound = min(float(m.ObjBound), makespan)
            return Stage2Result(status, tuple(starts), tuple(sm_counts), tuple(durations), makespan, bound, wall)
        finally:
            m.dispose()
            model["env"].dispose()
