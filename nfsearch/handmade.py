"""Plans built by rule rather than by search: the sequential plan and equal-split plans.

They serve as baselines for the solver and as simulator inputs that need no solver.
"""

import networkx as nx

from nfsearch.graph import NanoOp, split_layers
from nfsearch.plan import PlannedOp, Schedule
from nfsearch.problem import Problem
from nfsearch.simulate import replay

DEFAULT_SHARES = {"compute": 96, "memory": 36, "network": 16, "other": 36}


def sequential_plan(problem: Problem) -> Schedule:
    """Every op whole, one stream, the whole GPU each."""
    nano = split_layers(problem.layer, {}, problem.num_layers, problem.workload)
    sms = problem.gpu.num_sms
    placement = {n: ("main", sms) for n in nano.nodes}
    return timed(problem, nano, placement, topo_order(nano), {"name": "sequential"})


def equal_split_plan(problem: Problem, num_batches: int = 2, shares: dict[str, int] | None = None,
                     chunk: int = 1) -> Schedule:
    """Every op split into `num_batches` near-equal nano-batches; one stream per op class."""
    shares = shares or DEFAULT_SHARES
    sizes = {name: equal_sizes(*problem.layer.nodes[name]["token_range"], num_batches, chunk)
             for name in problem.layer.nodes}
    nano = split_layers(problem.layer, sizes, problem.num_layers, problem.workload)
    placement = {n: (cls, min(shares[cls], problem.gpu.num_sms))
                 for n in nano.nodes for cls in [problem.cost.op_class(n.op)]}
    return timed(problem, nano, placement, topo_order(nano), {"name": f"equal-split-{num_batches}"})


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


def timed(problem: Problem, nano: nx.DiGraph, placement: dict, order: list[NanoOp], solver: dict) -> Schedule:
    """A schedule whose predicted times come from replaying it through the cost model."""
    cost = problem.cost
    ops = tuple(
        PlannedOp(id=n.id, layer=n.layer, op=n.op, index=n.index, op_class=cost.op_class(n.op),
                  tokens=(n.start, n.end), stream=placement[n][0], order=i, sm_count=placement[n][1],
                  impl=cost.impl(n.op, n.num_tokens, placement[n][1]),
                  deps=tuple(sorted(p.id for p in nano.predecessors(n))), start_ms=0.0, end_ms=0.0)
        for i, n in enumerate(order))
    draft = Schedule(problem.model, problem.workload, problem.plan_gpu(), problem.plan_profile(),
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
