"""A judged polish of the search's best plans: small moves, each kept only if simulate.judge (the
replay, and the plan's own power bound where the profile prices overlaps) says the plan got faster
and simulate.verify still accepts it (buildable layouts).

Moves, tried in a fixed order (deterministic): give one nano-op group (same op and nano-batch in
every layer) the whole GPU or the other SM count the plan already uses on its side of the split;
swap two neighbouring nano-ops of different streams in the issue order (where no dependency, and
no cross-stream order the plan carries (`after`), orders them). The plan's `after` is kept as it is.
First improvement wins; passes repeat until one finds nothing or the evaluation budget ends.
The stage-2 model's durations are pessimistic stand-ins; this step lets the judge itself tune.
"""

import networkx as nx

from nfsearch.cost import Problem
from nfsearch.graph import split_layers
from nfsearch.plan import Schedule
from nfsearch.profile import ProfileMiss
from nfsearch.search.listsched import timed
from nfsearch.simulate import PlanInvalid, check_layouts, judge

MAX_EVALUATIONS = 300
MIN_GAIN_MS = 1e-6


def polish(problem: Problem, plan: Schedule, max_evaluations: int = MAX_EVALUATIONS) -> tuple[Schedule, int]:
    """The plan after hill climbing (or the plan itself), and how many moves were kept."""
    sizes = {op: tuple(e - s for s, e in ranges) for op, ranges in plan.nano_batches().items()}
    nano = split_layers(problem.layer, sizes, problem.num_layers, problem.workload)
    by_id = {n.id: n for n in nano.nodes}
    ops = sorted(plan.nano_ops, key=lambda o: o.order)
    order = [by_id[o.id] for o in ops]
    placement = {by_id[o.id]: (o.stream, o.sm_count) for o in ops}
    after = {by_id[o.id]: tuple(by_id[a] for a in o.after) for o in ops if o.after}
    full = problem.gpu.num_sms
    sides = sorted({o.sm_count for o in ops if o.sm_count < full})
    groups: dict[tuple[str, int], list] = {}
    for n in order:
        groups.setdefault((n.op, n.index), []).append(n)
    ordered = nx.DiGraph(nano)
    ordered.add_edges_from((a, n) for n, before in after.items() for a in before)
    reach = nx.transitive_closure_dag(ordered)
    best, best_ms, kept, evaluations = plan, judge(plan, problem.cost).ranked_makespan_ms, 0, 0
    info = plan.solver

    def evaluate(new_placement, new_order):
        nonlocal evaluations
        evaluations += 1
        try:
            candidate = timed(problem, nano, new_placement, new_order, info, plan.profile, after)
            check_layouts(candidate)
        except (ProfileMiss, PlanInvalid):
            return None, None
        return candidate, judge(candidate, problem.cost).ranked_makespan_ms

    improved = True
    while improved and evaluations < max_evaluations:
        improved = False
        # SM-count moves
        for key, members in groups.items():
            current = placement[members[0]][1]
            for sms in [full, *sides]:
                if sms == current or evaluations >= max_evaluations:
                    continue
                trial = dict(placement)
                for n in members:
                    trial[n] = (trial[n][0], sms)
                cand, ms = evaluate(trial, order)
                if cand is not None and ms < best_ms - MIN_GAIN_MS:
                    best, best_ms, placement, kept, improved = cand, ms, trial, kept + 1, True
                    current = sms
        # order moves
        for i in range(len(order) - 1):
            if evaluations >= max_evaluations:
                break
            a, b = order[i], order[i + 1]
            if placement[a][0] == placement[b][0] or reach.has_edge(a, b):
                continue
            trial_order = order[:i] + [b, a] + order[i + 2:]
            cand, ms = evaluate(placement, trial_order)
            if cand is not None and ms < best_ms - MIN_GAIN_MS:
                best, best_ms, order, kept, improved = cand, ms, trial_order, kept + 1, True
    return best, kept
