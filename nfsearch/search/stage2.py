"""Stage 2: an SM-allocation model of the incumbent's structure, solved by a backend (solvers/).

Each nano-op group (same op and nano-batch in every layer) picks an SM count: the whole GPU or its
side of the incumbent's two-way split (m SMs for memory/network ops, N - m for the ops that may run
beside them), so every plan it gives runs on the buildable layout (m, N - m); durations are co-run times against the worst
other op class in the plan (solo time at the full GPU), 1 us units; one op at a time per stream; SMs
capped. The incumbent, timed at these durations, is a complete hint, so the solver only improves on
it; its gap is the one it proves on this model. The solver's SM counts and order are then timed by
simulate.replay like every other plan.

The order is the solver's across streams too: where two tasks of different streams cannot run side
by side (their SM counts together exceed the GPU's), the plan says which goes first (a nano-op's
`after`), as the solver chose. Without it the replay and the GPU start whichever is ready first: on
W2 (bundled H100 profile) a 32-SM decode attention took the SMs while a whole-GPU norm waited
3 us for its event, and the solution the model put at 3.85 ms (2 layers) replayed at 5.17.
"""

import networkx as nx

from nfsearch.cost import Problem
from nfsearch.errors import NfsearchError
from nfsearch.graph import NanoOp
from nfsearch.plan import Schedule, SolverInfo
from nfsearch.search.durations import UNITS_PER_MS, Durations
from nfsearch.search.listsched import timed, topo_order
from nfsearch.search.stage1 import Frame, Incumbent, group_of
from nfsearch.solvers import Stage2Data, Stage2Result, Task


def stage2_from(problem: Problem, cand: Incumbent, durs: Durations, wait: int | None = None) -> Stage2Data:
    """The stage-2 model of a candidate's structure: per group the full GPU or the candidate's count
    (groups that never overlap keep the full GPU only); the hint is the candidate's issue order timed
    at the model durations (feasible in the model)."""
    nano, full = cand.frame.nano, problem.gpu.num_sms
    order = topo_order(nano)
    index = {n: i for i, n in enumerate(order)}
    tasks = []
    for n in order:
        g = group_of(n)
        # the group's side of the candidate's split, or the whole GPU: any co-running set then
        # fits the one buildable layout (m, N - m)
        allowed = {full, cand.sms[g]}
        tasks.append(Task(id=n.id, group=g, stream=problem.cost.op_class(n.op),
                          choices=durs.choices(n.op, n.num_tokens, allowed)))
    edges = tuple(sorted((index[u], index[v]) for u, v in nano.edges))
    issue = [index[n] for n in _nodes_in_issue_order(cand.plan, nano)]
    sms = [cand.sms[t.group] for t in tasks]
    dur = [dict(t.choices)[sms[i]] for i, t in enumerate(tasks)]
    wait = durs.wait_units if wait is None else wait
    starts = model_timing(len(tasks), edges, [t.stream for t in tasks], issue, sms, dur, full, wait)
    hint = {i: (starts[i], sms[i]) for i in range(len(tasks))}
    return Stage2Data(tuple(tasks), edges, full, UNITS_PER_MS, hint, wait)


def _nodes_in_issue_order(plan: Schedule, nano: nx.DiGraph) -> list[NanoOp]:
    by_id = {n.id: n for n in nano.nodes}
    return [by_id[o.id] for o in sorted(plan.nano_ops, key=lambda o: o.order)]


def model_timing(n: int, edges, streams, issue, sms, dur, num_sms: int, wait: int = 0) -> list[int]:
    """Integer start times as the executor would run `issue` at fixed durations: each stream issues
    its ops in order; an op starts once its stream is free, its inputs are done (an input from
    another stream `wait` units after it ends: the event wait) and its SMs are free."""
    preds: list[list[int]] = [[] for _ in range(n)]
    for i, j in edges:
        preds[j].append(i)
    queues: dict[str, list[int]] = {}
    for i in issue:
        queues.setdefault(streams[i], []).append(i)
    pos = {s: 0 for s in queues}
    rank = {i: k for k, i in enumerate(issue)}
    end: dict[int, int] = {}
    starts = [0] * n
    running: dict[str, tuple[int, int]] = {}          # stream -> (task, end)
    now, used, left = 0, 0, n
    while left:
        heads = sorted((queues[s][pos[s]] for s in queues if s not in running and pos[s] < len(queues[s])),
                       key=rank.get)
        later = []
        for i in heads:
            if not all(p in end for p in preds[i]):
                continue
            ready = max((end[p] + (wait if streams[p] != streams[i] else 0) for p in preds[i]), default=0)
            if ready > now:
                later.append(ready)
            elif used + sms[i] <= num_sms:
                starts[i] = now
                running[streams[i]] = (i, now + dur[i])
                used += sms[i]
                pos[streams[i]] += 1
        if not running and not later:
            raise NfsearchError("model timing deadlocked (an issue order that breaks a dependency)")
        now = min([e for _, e in running.values()] + later)
        for s, (i, e) in list(running.items()):
            if e == now:
                del running[s]
                end[i] = e
                used -= sms[i]
                left -= 1
    return starts


def plan_from_result(problem: Problem, frame: Frame, data: Stage2Data, result: Stage2Result,
                     durs: Durations) -> Schedule:
    """The solver's SM counts and order (by start, across streams included: `solver_order`), timed
    by simulate.replay like every other plan."""
    order = topo_order(frame.nano)
    by_idx = dict(enumerate(order))
    issue = sorted(range(len(data.tasks)), key=lambda i: (result.starts[i], i))
    placement = {by_idx[i]: (data.tasks[i].stream, result.sm_counts[i]) for i in range(len(data.tasks))}
    after = {by_idx[j]: tuple(by_idx[i] for i in before) for j, before in solver_order(data, result).items()}
    return timed(problem, frame.nano, placement, [by_idx[i] for i in issue], SolverInfo("stage 2"),
                 durs.plan_profile, after)


def solver_order(data: Stage2Data, result: Stage2Result) -> dict[int, tuple[int, ...]]:
    """task -> the tasks of other streams the solution runs before it that could not run beside it
    (SM counts together above the GPU's), leaving out those its data edges, its stream's order and
    the order already kept imply: per other stream only the latest such task."""
    n, full = len(data.tasks), data.num_sms
    starts, sms = result.starts, result.sm_counts
    ends = [starts[i] + result.durations[i] for i in range(n)]
    preds: list[list[int]] = [[] for _ in range(n)]
    for i, j in data.edges:
        preds[j].append(i)
    last_on: dict[str, int] = {}
    anc = [0] * n                     # bitsets: what each task is known to start after
    out: dict[int, tuple[int, ...]] = {}
    for j in sorted(range(n), key=lambda k: (starts[k], k)):
        stream = data.tasks[j].stream
        known = 0
        for p in preds[j] + ([last_on[stream]] if stream in last_on else []):
            known |= anc[p] | (1 << p)
        latest: dict[str, int] = {}
        for i in range(n):
            other = data.tasks[i].stream
            if other != stream and ends[i] <= starts[j] and sms[i] + sms[j] > full and \
                    (other not in latest or starts[i] > starts[latest[other]]):
                latest[other] = i
        kept = []
        for i in sorted(latest.values(), key=lambda k: (-starts[k], k)):
            if not known >> i & 1:
                kept.append(i)
                known |= anc[i] | (1 << i)
        if kept:
            out[j] = tuple(sorted(kept))
        anc[j] = known
        last_on[stream] = j
    return out
