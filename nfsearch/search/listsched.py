"""List scheduling of a nano-op DAG, and plans timed by replaying them through the cost model."""

import networkx as nx

from nfsearch.cost import Problem
from nfsearch.graph import NanoOp
from nfsearch.plan import PlannedOp, PlanProfile, Predicted, Schedule, SolverInfo
from nfsearch.simulate import replay


def list_schedule(nano: nx.DiGraph, dur: dict, stream_of) -> dict:
    """Start/end of each nano-op in a list schedule: one op at a time per stream, streams overlap
    freely (no SM limit); the ready op that can start first goes next (ties: longest remaining
    path, then topological order). Deterministic."""
    order = topo_order(nano)
    rank = {n: i for i, n in enumerate(order)}
    tail = {}
    for n in reversed(order):
        tail[n] = dur[n] + max((tail[s] for s in nano.successors(n)), default=0.0)
    waiting = {n: nano.in_degree(n) for n in order}
    ready_at = {n: 0.0 for n in order}
    ready = [n for n in order if waiting[n] == 0]
    free: dict[str, float] = {}
    times = {}
    while ready:
        n = min(ready, key=lambda m: (max(ready_at[m], free.get(stream_of(m), 0.0)), -tail[m], rank[m]))
        ready.remove(n)
        start = max(ready_at[n], free.get(stream_of(n), 0.0))
        times[n] = (start, start + dur[n])
        free[stream_of(n)] = start + dur[n]
        for s in nano.successors(n):
            ready_at[s] = max(ready_at[s], start + dur[n])
            waiting[s] -= 1
            if waiting[s] == 0:
                ready.append(s)
    return times


def list_order(nano: nx.DiGraph, dur: dict, stream_of) -> list[NanoOp]:
    """An issue order: the nano-ops by start time in `list_schedule`."""
    times = list_schedule(nano, dur, stream_of)
    rank = {n: i for i, n in enumerate(topo_order(nano))}
    return sorted(nano.nodes, key=lambda n: (times[n][0], rank[n]))


def topo_order(nano: nx.DiGraph) -> list[NanoOp]:
    """A topological order that prefers earlier layers, then earlier ops, then earlier nano-batches."""
    return list(nx.lexicographical_topological_sort(nano, key=lambda n: (n.layer, n.index, n.start, n.op)))


def timed(problem: Problem, nano: nx.DiGraph, placement: dict, order: list[NanoOp], solver: SolverInfo,
          plan_profile: PlanProfile | None = None, after: dict | None = None) -> Schedule:
    """A schedule whose predicted times come from replaying it through the cost model.
    (`plan_profile`: problem.plan_profile(), when the caller already has it: it hashes the table;
    `after`: nano-op -> the nano-ops of other streams it starts after, the plan's cross-stream order.)"""
    cost, after = problem.cost, after or {}
    ops = tuple(
        PlannedOp(id=n.id, layer=n.layer, op=n.op, index=n.index, op_class=cost.op_class(n.op),
                  tokens=(n.start, n.end), stream=placement[n][0], order=i, sm_count=placement[n][1],
                  impl=cost.impl(n.op, n.num_tokens, placement[n][1]),
                  deps=tuple(sorted(p.id for p in nano.predecessors(n))), start_ms=0.0, end_ms=0.0,
                  after=tuple(sorted(a.id for a in after.get(n, ()))))
        for i, n in enumerate(order))
    draft = Schedule(problem.model, problem.workload, problem.plan_gpu(), plan_profile or problem.plan_profile(),
                     problem.num_layers, ops, None, solver)
    result = replay(draft, cost).timeline
    times = {s.id: (s.start_ms, s.end_ms) for s in result.spans}
    return draft.with_times(times, predicted_figures(problem, result.makespan_ms))


def sequential_layer_ms(problem: Problem) -> float:
    """One layer's ops one after another on the whole GPU, each after the launch gap (as replay runs
    the sequential plan)."""
    cost, sms = problem.cost, problem.gpu.num_sms
    return sum(cost.solo_ms(name, end - start, sms) + cost.launch_gap_ms
               for name, (start, end) in ((n, problem.layer.nodes[n]["token_range"]) for n in problem.layer.nodes))


def predicted_figures(problem: Problem, makespan_ms: float) -> Predicted:
    return Predicted(makespan_ms=makespan_ms, layer_time_ms=makespan_ms / problem.num_layers,
                     sequential_layer_time_ms=sequential_layer_ms(problem), bound_ms=problem.bound_ms)
