"""Stage-2 backends: hand-solved optima, exhaustive enumeration on tiny instances, CP-SAT = Gurobi."""

import itertools
import random

import pytest

from nfsearch.errors import NfsearchError
from nfsearch.solvers import Stage2Data, Task, get_solver, resolve
from nfsearch.solvers import gurobi as gurobi_backend


def _data(tasks, edges=(), num_sms=4):
    return Stage2Data(tuple(tasks), tuple(edges), num_sms, 10_000)


def _solve(data, name="cpsat", limit=20.0):
    result = get_solver(name).run(data, limit, 1, 0)
    assert result is not None
    return result


def test_two_independent_tasks_share_the_gpu():
    # on 2 SMs each takes 10, on 4 SMs 6: side by side (10) beats one after the other (12)
    a = Task("L0.a#0", "a#0", "compute", ((2, 10), (4, 6)))
    b = Task("L0.b#0", "b#0", "memory", ((2, 10), (4, 6)))
    result = _solve(_data([a, b]))
    assert result.makespan == 10 and result.sm_counts == (2, 2) and result.status == "optimal"
    assert result.gap == 0.0


def test_dependency_or_shared_stream_serialises():
    a = Task("L0.a#0", "a#0", "compute", ((2, 10), (4, 6)))
    b = Task("L0.b#0", "b#0", "memory", ((2, 10), (4, 6)))
    assert _solve(_data([a, b], [(0, 1)])).makespan == 12
    b_same_stream = Task("L0.b#0", "b#0", "compute", ((2, 10), (4, 6)))
    assert _solve(_data([a, b_same_stream])).makespan == 12


def test_same_group_shares_sm_count_across_layers():
    # group g runs twice; alone the best is 4 SMs, but beside a long task it must take 2 both times
    t0 = Task("L0.g#0", "g#0", "compute", ((2, 10), (4, 6)))
    t1 = Task("L1.g#0", "g#0", "compute", ((2, 10), (4, 6)))
    result = _solve(_data([t0, t1], [(0, 1)]))
    assert result.sm_counts[0] == result.sm_counts[1] and result.makespan == 12


# ---- exhaustive enumeration (independent of the solvers): every mode vector x every precedence-
# feasible list, serial schedule generation with insertion; its best is the optimum (active schedules)

def _enumerate(data: Stage2Data) -> int:
    n = len(data.tasks)
    preds = {j: {i for i, jj in data.edges if jj == j} for j in range(n)}
    groups = sorted({t.group for t in data.tasks})
    best = None
    for modes in itertools.product(*[range(len(next(t for t in data.tasks if t.group == g).choices))
                                     for g in groups]):
        pick = dict(zip(groups, modes))
        for perm in itertools.permutations(range(n)):
            pos = {t: k for k, t in enumerate(perm)}
            if any(pos[i] > pos[j] for i, j in data.edges):
                continue
            placed, ends = [], {}
            for t in perm:
                sms, d = data.tasks[t].choices[pick[data.tasks[t].group]]
                est = max((ends[p] for p in preds[t]), default=0)
                for s in sorted({est} | {e for _, e, _, _ in placed if e > est}):
                    clash = any(a < s + d and s < e and st == data.tasks[t].stream for a, e, _, st in placed)
                    pts = [s] + [a for a, _, _, _ in placed if s < a < s + d]
                    over = any(sum(q for a, e, q, _ in placed if a <= x < e) + sms > data.num_sms for x in pts)
                    if not clash and not over:
                        break
                placed.append((s, s + d, sms, data.tasks[t].stream))
                ends[t] = s + d
            span = max(ends.values())
            best = span if best is None else min(best, span)
    return best


def _random_instance(rng: random.Random, n: int) -> Stage2Data:
    tasks = []
    for k in range(n):
        d_full = rng.randint(3, 12)
        slow = d_full + rng.randint(1, d_full)
        stream = rng.choice(["compute", "memory", "other"])
        tasks.append(Task(f"L0.t{k}#0", f"t{k}#0", stream, ((2, slow), (4, d_full))))
    edges = [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < 0.25]
    return _data(tasks, edges)


@pytest.mark.parametrize("seed", range(6))
def test_cpsat_matches_exhaustive_enumeration(seed):
    rng = random.Random(seed)
    data = _random_instance(rng, 5 if seed % 2 else 6)
    result = _solve(data)
    assert result.status == "optimal"
    assert result.makespan == _enumerate(data)


def test_unknown_solver_and_unavailable_gurobi(monkeypatch):
    with pytest.raises(NfsearchError, match="unknown solver"):
        resolve("glpk")

    def missing():
        raise ImportError("no gurobipy")
    monkeypatch.setattr(gurobi_backend, "_gurobipy", missing)
    with pytest.raises(NfsearchError, match="solver gurobi is unavailable"):
        resolve("gurobi")
    solver, why = resolve("auto")
    assert solver.name == "cpsat" and "not installed" in why and "\n" not in why


def test_auto_falls_back_when_model_exceeds_licence(monkeypatch):
    pytest.importorskip("gurobipy")
    monkeypatch.setattr(gurobi_backend, "licence_limit", lambda: (10, ""))
    a = Task("L0.a#0", "a#0", "compute", ((2, 10), (4, 6)))
    b = Task("L0.b#0", "b#0", "memory", ((2, 10), (4, 6)))
    solver, why = resolve("auto", _data([a, b]))
    assert solver.name == "cpsat" and "exceeds the size-limited Gurobi licence" in why


def test_cpsat_and_gurobi_agree_on_small_w2():
    pytest.importorskip("gurobipy")
    ok, why = get_solver("gurobi").available()
    if not ok:
        pytest.skip(why)
    from nfsearch.cost import default_profile, make_problem
    from nfsearch.search.durations import Durations
    from nfsearch.search.stage1 import sweep
    from nfsearch.search.stage2 import stage2_from
    from nfsearch.specs import load_model, load_workload
    model, workload = load_model("llama-3-8b"), load_workload("W2")
    problem = make_problem(model, workload, default_profile(model, workload), num_layers=1)
    data = stage2_from(problem, sweep(problem, 512)[0], Durations(problem))
    assert max(gurobi_backend.model_size(data)) <= 2000
    cp = _solve(data, "cpsat", 60)
    gu = _solve(data, "gurobi", 60)
    assert cp.status == gu.status == "optimal"
    assert cp.makespan == gu.makespan


def test_without_ortools_a_search_is_refused_in_one_line(monkeypatch):
    """Running or tuning a plan imports the search's modules but needs no solver; a search without
    OR-Tools (and no Gurobi licence) is refused with the reason, not an AttributeError."""
    import pytest

    from nfsearch import solvers
    from nfsearch.errors import NfsearchError
    from nfsearch.solvers import cpsat
    monkeypatch.setattr(cpsat, "cp_model", None)
    monkeypatch.setattr(solvers.GurobiSolver, "available", lambda self, data=None: (False, "not licensed"))
    with pytest.raises(NfsearchError, match="ortools is not installed"):
        solvers.resolve("auto")
    with pytest.raises(NfsearchError, match="ortools is not installed"):
        solvers.resolve("cpsat")
