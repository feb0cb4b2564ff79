"""Plans built by rule rather than by search: the sequential plan and equal-split plans.

They serve as baselines for the solver and as simulator inputs that need no solver.

An equal-split plan splits every op into equal halves (or thirds...), runs one stream per op class
and gives each class a fixed SM share. Its issue order is either "layered" (topological, all of
nano-batch 0 before nano-batch 1 where the graph allows: barely overlaps; the default, kept for the
plan fixtures) or "interleaved" (the order of a list schedule of the nano-op DAG at the shares' own
durations: nano-batches of different classes interleave). `best_equal_split_plan` is the baseline
the search must beat: interleaved, the best of a few compute/memory share splits.
"""

import networkx as nx

from nfsearch.graph import NanoOp, split_layers
from nfsearch.plan import PlannedOp, Schedule
from nfsearch.problem import Problem
from nfsearch.profile import ProfileMiss
from nfsearch.simulate import replay

DEFAULT_SHARES = {"compute": 96, "memory": 36, "network": 16, "other": 36}


def sequential_plan(problem: Problem) -> Schedule:
    """Every op whole, one stream, the whole GPU each."""
    nano = split_layers(problem.layer, {}, problem.num_layers, problem.workload)
    sms = problem.gpu.num_sms
    placement = {n: ("main", sms) for n in nano.nodes}
    return timed(problem, nano, placement, topo_order(nano), {"name": "sequential"})


# compute/memory share splits tried by best_equal_split_plan: memory (and network, other) ops get m SMs,
# compute ops the rest
BASELINE_MEMORY_SHARES = (24, 36, 48, 64)


def equal_split_plan(problem: Problem, num_batches: int = 2, shares: dict[str, int] | None = None,
                     chunk: int = 1, order: str = "layered") -> Schedule:
    """Every op split into `num_batches` near-equal nano-batches; one stream per op class."""
    shares = shares or DEFAULT_SHARES
    sizes = {name: equal_sizes(*problem.layer.nodes[name]["token_range"], num_batches, chunk)
             for name in problem.layer.nodes}
    nano = split_layers(problem.layer, sizes, problem.num_layers, problem.workload)
    placement = {n: (cls, min(shares[cls], problem.gpu.num_sms))
                 for n in nano.nodes for cls in [problem.cost.op_class(n.op)]}
    if order == "layered":
        issue = topo_order(nano)
    elif order == "interleaved":
        dur = {n: problem.cost.solo_ms(n.op, n.num_tokens, placement[n][1]) for n in nano.nodes}
        issue = list_order(nano, dur, lambda n: placement[n][0])
    else:
        raise ValueError(f"unknown order {order!r}")
    return timed(problem, nano, placement, issue, {"name": f"equal-split-{num_batches}"})


def best_equal_split_plan(problem: Problem, num_batches: int = 2, chunk: int = 1) -> tuple[Schedule, dict]:
    """The fastest (replayed) interleaved equal-split plan over a few compute/memory share splits."""
    best, best_shares, misses = None, None, []
    for m in BASELINE_MEMORY_SHARES:
        shares = {"compute": problem.gpu.num_sms - m, "memory": m, "network": m, "other": m}
        try:
            plan = equal_split_plan(problem, num_batches, shares, chunk, order="interleaved")
        except ProfileMiss as miss:
            misses.append(miss)
            continue
        if best is None or plan.predicted["makespan_ms"] < best.predicted["makespan_ms"] - 1e-12:
            best, best_shares = plan, shares
    if best is None:
        raise misses[0]
    return best, best_shares


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


def equal_sizes(start: int, end: int, num_batches: int, chunk: int = 1) -> tuple[int, ...]:
    """Split end - start into up to num_batches sizes, multiples of chunk except the last."""
    total = end - start
    units = max(1, -(-total // chunk))
    parts = min(num_batches, units)
    bounds = [round(units * i / parts) * chunk for i in range(parts + 1)]
    bounds[-1] = total
    return tuple(b - a for a, b in zip(bounds, bounds[1:]) if b > a)


def topo_order(nano: nx.DiGraph) -> list[NanoOp]:
    """A topological order that prefers earlier layers, then earlier ops, then earlier nano-batches."""
    return list(nx.lexicographical_topological_sort(nano, key=lambda n: (n.layer, n.index, n.start, n.op)))


def timed(problem: Problem, nano: nx.DiGraph, placement: dict, order: list[NanoOp], solver: dict,
          plan_profile: dict | None = None) -> Schedule:
    """A schedule whose predicted times come from replaying it through the cost model.
    (`plan_profile`: problem.plan_profile(), when the caller already has it: it hashes the table.)"""
    cost = problem.cost
    ops = tuple(
        PlannedOp(id=n.id, layer=n.layer, op=n.op, index=n.index, op_class=cost.op_class(n.op),
                  tokens=(n.start, n.end), stream=placement[n][0], order=i, sm_count=placement[n][1],
                  impl=cost.impl(n.op, n.num_tokens, placement[n][1]),
                  deps=tuple(sorted(p.id for p in nano.predecessors(n))), start_ms=0.0, end_ms=0.0)
        for i, n in enumerate(order))
    draft = Schedule(problem.model, problem.workload, problem.plan_gpu(), plan_profile or problem.plan_profile(),
                     problem.num_layers, ops, {}, solver)
    result = replay(draft, cost).timeline
    times = {s.id: (s.start_ms, s.end_ms) for s in result.spans}
    return draft.with_times(times, predicted_figures(problem, result.makespan_ms))


def sequential_layer_ms(problem: Problem) -> float:
    cost, sms = problem.cost, problem.gpu.num_sms
    return sum(cost.solo_ms(name, end - start, sms)
               for name, (start, end) in ((n, problem.layer.nodes[n]["token_range"]) for n in problem.layer.nodes))


def predicted_figures(problem: Problem, makespan_ms: float) -> dict:
    return {"makespan_ms": makespan_ms, "layer_time_ms": makespan_ms / problem.num_layers,
            "sequential_layer_time_ms": sequential_layer_ms(problem), "bound_ms": problem.bound_ms}
