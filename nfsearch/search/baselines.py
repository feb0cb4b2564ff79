"""Plans built by rule rather than by search: the sequential plan and equal-split plans.

They are what the search must beat, and simulator inputs that need no solver.

An equal-split plan splits every op into equal halves (or thirds...), runs one stream per op class
and gives each class a fixed SM share. Its issue order is either "layered" (topological, all of
nano-batch 0 before nano-batch 1 where the graph allows: barely overlaps; the default, kept for the
plan fixtures) or "interleaved" (the order of a list schedule of the nano-op DAG at the shares' own
durations: nano-batches of different classes interleave). `best_equal_split_plan` is the baseline
the search must beat: interleaved, the best of a few compute/memory share splits.
"""

from nfsearch.cost import Problem
from nfsearch.graph import split_layers
from nfsearch.plan import Schedule, SolverInfo
from nfsearch.profile import ProfileMiss
from nfsearch.search.listsched import list_order, timed, topo_order


# "other" ops (norms, RoPE, activation) share the compute side: memory ops then always run beside
# ONE op of the other side, so every co-running set fits the buildable layout (96, 36)
DEFAULT_SHARES = {"compute": 96, "memory": 36, "network": 16, "other": 96}


def sequential_plan(problem: Problem) -> Schedule:
    """Every op whole, one stream, the whole GPU each."""
    nano = split_layers(problem.layer, {}, problem.num_layers, problem.workload)
    sms = problem.gpu.num_sms
    placement = {n: ("main", sms) for n in nano.nodes}
    return timed(problem, nano, placement, topo_order(nano), SolverInfo("sequential"))


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
    return timed(problem, nano, placement, issue, SolverInfo(f"equal-split-{num_batches}"))


def best_equal_split_plan(problem: Problem, num_batches: int = 2, chunk: int = 1) -> tuple[Schedule, dict]:
    """The fastest (replayed) interleaved equal-split plan over a few compute/memory share splits."""
    best, best_shares, misses = None, None, []
    for m in BASELINE_MEMORY_SHARES:
        shares = {"compute": problem.gpu.num_sms - m, "memory": m, "network": m, "other": problem.gpu.num_sms - m}
        try:
            plan = equal_split_plan(problem, num_batches, shares, chunk, order="interleaved")
        except ProfileMiss as miss:
            misses.append(miss)
            continue
        if best is None or plan.predicted.makespan_ms < best.predicted.makespan_ms - 1e-12:
            best, best_shares = plan, shares
    if best is None:
        raise misses[0]
    return best, best_shares


def equal_sizes(start: int, end: int, num_batches: int, chunk: int = 1) -> tuple[int, ...]:
    """Split end - start into up to num_batches sizes, multiples of chunk except the last."""
    total = end - start
    units = max(1, -(-total // chunk))
    parts = min(num_batches, units)
    bounds = [round(units * i / parts) * chunk for i in range(parts + 1)]
    bounds[-1] = total
    return tuple(b - a for a, b in zip(bounds, bounds[1:]) if b > a)


def baselines(problem: Problem, chunk: int = 128) -> dict[str, Schedule]:
    """What the search must beat: the sequential plan and the best interleaved equal-split 2-nano-batch
    plan over a few compute/memory shares (handmade.best_equal_split_plan)."""
    out = {"sequential": sequential_plan(problem)}
    try:
        plan, shares = best_equal_split_plan(problem, 2, chunk)
        out[f"equal-split-2 memory@{shares['memory']}"] = plan
    except ProfileMiss:
        pass
    return out
