"""The two-stage search: structure (nano-batch sizes and order), then SM counts and start times.

Stage 1 + incumbent (`sweep`). A small family of structures (unsplit; k equal pieces; cuts at the
decode/prefill boundary, alone or with either side halved; cuts are multiples of `chunk`) is crossed
with every compute/memory SM partition m: memory and network ops get m SMs, the ops that may run
beside them (incomparable in the nano-op DAG) get the rest, ops that can never overlap get the whole
GPU (each count replaced by the fewest SMs that are no slower). The issue order comes from a list
schedule at the stage-2 model durations; every candidate is timed by simulate.replay (the judge),
and the best one is the incumbent. (The free-overlap relaxation, `stage1`, misranked structures and is
kept only as a tool.)

Stage 2 is a CP-SAT (or Gurobi) model of the incumbent's structure: each nano-op group (same op and
nano-batch in every layer) picks an SM count among the full GPU and the counts within OPTION_RADIUS of
the incumbent's; durations are co-run times against the worst other op class in the plan (solo time
at the full GPU), 1 us units; one op at a time per stream; SMs capped. The incumbent, timed at these
durations, is a complete hint, so the solver only improves on it; its gap is the one it proves on
this model. The solver's SM counts and order are then timed by simulate.replay like every other plan.

The plan returned is the best by replay of: the solver's, the incumbent, the sequential plan and the
best interleaved equal-split 2-nano-batch plan (solver.source says which). Same inputs and seed give
a byte-identical plan: everything but CP-SAT is deterministic, and CP-SAT stops on deterministic work.
"""

import math
import time
from dataclasses import dataclass
from typing import Callable

import networkx as nx

from nfsearch.errors import NfsearchError
from nfsearch.graph import NanoOp, split_layers
from nfsearch.handmade import (best_equal_split_plan, list_order, list_schedule, sequential_plan,
                              timed, topo_order)
from nfsearch.plan import Schedule
from nfsearch.problem import Problem
from nfsearch.profile import ProfileMiss
from nfsearch.simulate import verify
from nfsearch.solvers.base import Stage2Data, Stage2Result, Task, resolve

UNITS_PER_MS = 1_000              # stage-2 time unit: 1 us
MAX_PIECES = 6                    # nano-batches per op at most
MAX_STAGE1_EVALS = 1500
SM_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)
Progress = Callable[[str], None] | None
Sizes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Structure:
    sizes: tuple[tuple[str, tuple[int, ...]], ...]    # (op, nano-batch sizes), ops in layer order
    stage1_ms: float                                   # the relaxation's makespan

    def as_dict(self) -> Sizes:
        return dict(self.sizes)

    def describe(self) -> str:
        return ", ".join(f"{op}={'/'.join(map(str, s))}" for op, s in self.sizes if len(s) > 1) or "unsplit"


def solve(problem: Problem, solver: str = "auto", time_limit_s: float = 10.0, threads: int = 2, seed: int = 0,
          chunk: int = 128, progress: Progress = None) -> tuple[Schedule, list[str]]:
    """Search a schedule for `problem`; returns it and notes (one line each) on what was done."""
    if time_limit_s <= 0 or threads < 1 or chunk < 1:
        raise NfsearchError("time limit must be positive, threads and chunk at least 1")
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
        entries.append((solved.predicted["makespan_ms"], 0, f"{backend.name} solution", solved))
        notes.append(f"stage 2: model makespan {result.makespan / UNITS_PER_MS:.4f} ms (hint "
                     f"{hint_ms / UNITS_PER_MS:.4f}), bound {result.bound / UNITS_PER_MS:.4f}, gap "
                     f"{result.gap:.2%} ({result.status}); replay {solved.predicted['makespan_ms']:.4f} ms")
    else:
        notes.append("stage 2 found no schedule in its limit")
    say(notes[-1])
    entries.append((inc.judge_ms, 1, "partition-sweep incumbent", inc.plan))
    for k, (name, plan) in enumerate(sorted(baselines(problem, chunk).items())):
        entries.append((plan.predicted["makespan_ms"], 2 + k, f"{name} baseline", plan))
    ms, _, source, plan = min(entries, key=lambda e: (round(e[0], 9), e[1]))
    wall = time.perf_counter() - began
    notes.append(f"plan: {source}, {ms:.4f} ms (replay); search wall time {wall:.2f} s")
    say(notes[-1])
    # (wall time goes to the notes, not the plan: the same inputs and seed give a byte-identical plan)
    info = {"name": backend.name, "status": result.status if result else "no solution",
            "gap": round(result.gap, 6) if result else None, "seed": int(seed), "threads": int(threads),
            "time_limit_s": float(time_limit_s), "note": settings, "source": source, "choice": why}
    if result is not None:
        info.update({"model_makespan_ms": round(result.makespan / UNITS_PER_MS, 6),
                     "bound_ms": round(result.bound / UNITS_PER_MS, 6),
                     "gap_scope": "stage-2 model of the chosen structure (pessimistic co-run durations, "
                                  "SM options near the incumbent's)"})
    if source.endswith("baseline"):
        info["status"] = "fallback"
    info.update({"structure": inc.frame.structure.describe(), "memory_sms": inc.memory_sms})
    schedule = Schedule(plan.model, plan.workload, plan.gpu, plan.profile, plan.num_layers, plan.nano_ops,
                        plan.predicted, info)
    verify(schedule)
    return schedule, notes


def stage2_from(problem: Problem, cand: "Candidate", durs: "Durations") -> Stage2Data:
    """The stage-2 model of a candidate's structure: per group the full GPU and the SM counts within
    OPTION_RADIUS of the candidate's (groups that never overlap keep the full GPU only); the hint is the
    candidate's issue order timed at the model durations (feasible in the model)."""
    nano, full = cand.frame.nano, problem.gpu.num_sms
    order = topo_order(nano)
    index = {n: i for i, n in enumerate(order)}
    tasks = []
    for n in order:
        g = group_of(n)
        around = cand.sms[g] if cand.sms[g] < full else None
        tasks.append(Task(id=n.id, group=g, stream=problem.cost.op_class(n.op),
                          choices=durs.choices(n.op, n.num_tokens, around)))
    edges = tuple(sorted((index[u], index[v]) for u, v in nano.edges))
    issue = [index[n] for n in _nodes_in_issue_order(cand.plan, nano)]
    sms = [cand.sms[t.group] for t in tasks]
    dur = [dict(t.choices)[sms[i]] for i, t in enumerate(tasks)]
    starts = model_timing(len(tasks), edges, [t.stream for t in tasks], issue, sms, dur, full)
    hint = {i: (starts[i], sms[i]) for i in range(len(tasks))}
    return Stage2Data(tuple(tasks), edges, full, UNITS_PER_MS, hint)


def _nodes_in_issue_order(plan: Schedule, nano: nx.DiGraph) -> list[NanoOp]:
    by_id = {n.id: n for n in nano.nodes}
    return [by_id[o.id] for o in sorted(plan.nano_ops, key=lambda o: o.order)]


def model_timing(n: int, edges, streams, issue, sms, dur, num_sms: int) -> list[int]:
    """Integer start times as the executor would run `issue` at fixed durations: each stream issues
    its ops in order; an op starts once its stream is free, its inputs are done and its SMs are free."""
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
        for i in heads:
            if all(p in end and end[p] <= now for p in preds[i]) and used + sms[i] <= num_sms:
                starts[i] = now
                running[streams[i]] = (i, now + dur[i])
                used += sms[i]
                pos[streams[i]] += 1
        if not running:
            raise NfsearchError("model timing deadlocked (an issue order that breaks a dependency)")
        now = min(e for _, e in running.values())
        for s, (i, e) in list(running.items()):
            if e == now:
                del running[s]
                end[i] = e
                used -= sms[i]
                left -= 1
    return starts


def plan_from_result(problem: Problem, frame: "Frame", data: Stage2Data, result: Stage2Result,
                     durs: "Durations") -> Schedule:
    """The solver's SM counts and order (by start), timed by simulate.replay like every other plan."""
    order = topo_order(frame.nano)
    by_idx = dict(enumerate(order))
    issue = sorted(range(len(data.tasks)), key=lambda i: (result.starts[i], i))
    placement = {by_idx[i]: (data.tasks[i].stream, result.sm_counts[i]) for i in range(len(data.tasks))}
    return timed(problem, frame.nano, placement, [by_idx[i] for i in issue], {"name": "stage 2"},
                 durs.plan_profile)


# ---------------------------------------------------------------- stage 1

def stage1(problem: Problem, chunk: int = 128, keep: int = 1) -> list[Structure]:
    """The `keep` best distinct structures found by the refinement, best first."""
    ev = _Stage1(problem, chunk)
    ends = [ev.climb(seed_sizes) for seed_sizes in ev.seeds()]
    out = ev.best(keep)
    for splits in [*ends, *ev.seeds()]:          # each climb's end and each seed stay in the running
        s = Structure(tuple((n, ev.sizes(splits)[n]) for n in ev.names), ev.score(splits))
        if s.stage1_ms < math.inf and all(s.sizes != o.sizes for o in out):
            out.append(s)
    return out


class _Stage1:
    def __init__(self, problem: Problem, chunk: int):
        self.p, self.chunk = problem, chunk
        self.names = list(nx.topological_sort(problem.layer))
        self.ranges = {n: problem.layer.nodes[n]["token_range"] for n in self.names}
        self.seen: dict[tuple, float] = {}
        self.evals = 0

    # a structure is a dict op -> tuple of split points (offsets from the domain start)
    def key(self, splits: dict) -> tuple:
        return tuple((n, tuple(splits.get(n, ()))) for n in self.names)

    def sizes(self, splits: dict) -> Sizes:
        out = {}
        for n in self.names:
            total = self.ranges[n][1] - self.ranges[n][0]
            bounds = [0, *splits.get(n, ()), total]
            out[n] = tuple(b - a for a, b in zip(bounds, bounds[1:]))
        return out

    def seeds(self) -> list[dict]:
        w, c = self.p.workload, self.chunk
        halves, at_boundary = {}, {}
        for n in self.names:
            s, e = self.ranges[n]
            mid = _round_chunk((e - s) // 2, c, e - s)
            halves[n] = (mid,) if mid else ()
            cut = w.num_decode - s
            at_boundary[n] = (cut,) if 0 < cut < e - s and cut % c == 0 else halves[n]
        return [halves, at_boundary, {}]

    def score(self, splits: dict) -> float:
        k = self.key(splits)
        if k not in self.seen:
            self.evals += 1
            try:
                self.seen[k] = relaxed_makespan(self.p, self.sizes(splits))[0]
            except ProfileMiss:
                self.seen[k] = math.inf
        return self.seen[k]

    def rank(self, splits: dict) -> tuple:
        return (round(self.score(splits), 9), sum(len(v) for v in splits.values()))

    def climb(self, splits: dict) -> dict:
        current = {n: tuple(v) for n, v in splits.items() if v}
        while self.evals < MAX_STAGE1_EVALS:
            best_move, best_rank = None, self.rank(current)
            for move in self.moves(current):
                r = self.rank(move)
                if r < best_rank:
                    best_move, best_rank = move, r
            if best_move is None:
                return current
            current = best_move
        return current

    def moves(self, splits: dict):
        c = self.chunk
        by_domain: dict[tuple, list[str]] = {}
        for n in self.names:
            by_domain.setdefault(self.ranges[n], []).append(n)
        bubble_ops = self.bubble_neighbours(splits)
        for n in self.names:
            total = self.ranges[n][1] - self.ranges[n][0]
            cur = list(splits.get(n, ()))
            for i, b in enumerate(cur):
                lo = cur[i - 1] if i else 0
                hi = cur[i + 1] if i + 1 < len(cur) else total
                for step in (-c, c):
                    if lo < b + step < hi:
                        yield {**splits, n: tuple(cur[:i] + [b + step] + cur[i + 1:])}
                yield {**splits, n: tuple(cur[:i] + cur[i + 1:])}
            # align with the other ops on the same token domain
            for other in by_domain[self.ranges[n]]:
                if other != n and tuple(splits.get(other, ())) != tuple(cur):
                    yield {**splits, n: tuple(splits.get(other, ()))}
            # split further next to a compute bubble
            if n in bubble_ops and len(cur) + 1 < MAX_PIECES:
                bounds = [0, *cur, total]
                decode_cut = self.p.workload.num_decode - self.ranges[n][0]
                for a, b in zip(bounds, bounds[1:]):
                    for cut in {_round_chunk(a + (b - a) // 2, c, total), decode_cut}:
                        if a < cut < b and cut % c == 0:
                            yield {**splits, n: tuple(sorted(cur + [cut]))}
        # move a split point shared by a whole domain at once
        for members in by_domain.values():
            shared = set.intersection(*(set(splits.get(n, ())) for n in members))
            for b in sorted(shared):
                for step in (-c, c):
                    moved = {}
                    for n in members:
                        pts = sorted(x + step if x == b else x for x in splits.get(n, ()))
                        total = self.ranges[n][1] - self.ranges[n][0]
                        if len(set(pts)) != len(pts) or not all(0 < x < total for x in pts):
                            break
                        moved[n] = tuple(pts)
                    else:
                        yield {**splits, **moved}

    def bubble_neighbours(self, splits: dict) -> set[str]:
        """Ops next to idle gaps of the compute stream in the relaxed schedule."""
        try:
            _, times, nano = relaxed_makespan(self.p, self.sizes(splits))
        except ProfileMiss:
            return set()
        cost = self.p.cost
        compute = sorted((times[n], n) for n in nano.nodes if cost.op_class(n.op) == "compute")
        near = set()
        for (ta, a), (tb, b) in zip(compute, compute[1:]):
            if tb[0] > ta[1] + 1e-6:
                near |= {a.op, b.op} | {p.op for p in nano.predecessors(b)}
        if compute and compute[0][0][0] > 1e-6:
            first = compute[0][1]
            near |= {first.op} | {p.op for p in nano.predecessors(first)}
        return near

    def best(self, keep: int) -> list[Structure]:
        ranked = sorted((v, sum(len(s) for _, s in k), k) for k, v in self.seen.items() if v < math.inf)
        out = []
        for v, _, k in ranked[:keep]:
            out.append(Structure(tuple((n, self.sizes(dict(k))[n]) for n in self.names), v))
        return out


def _round_chunk(x: int, chunk: int, total: int) -> int:
    r = int(round(x / chunk)) * chunk
    return r if 0 < r < total else 0


def relaxed_makespan(problem: Problem, sizes: Sizes) -> tuple[float, dict, nx.DiGraph]:
    """Stage-1 score: list schedule with full-GPU solo times, one stream per class, free overlap."""
    nano = split_layers(problem.layer, sizes, problem.num_layers, problem.workload)
    cost, sms = problem.cost, problem.gpu.num_sms
    dur = {n: cost.solo_ms(n.op, n.num_tokens, sms) for n in nano.nodes}
    times = list_schedule(nano, dur, lambda n: cost.op_class(n.op))
    return max(e for _, e in times.values()), times, nano


# ---------------------------------------------------------------- stage 2

def sm_subset(num_sms: int, grid: list[int]) -> list[int]:
    """A useful subset of the SM grid for speed: fixed fractions of the GPU snapped to the grid."""
    picks = {min(grid, key=lambda g: (abs(g - f * num_sms), g)) for f in SM_FRACTIONS}
    return sorted(picks | {num_sms})


def sm_choices(problem: Problem, op: str, num_tokens: int, co_classes: frozenset[str],
               grid: list[int] | None = None) -> tuple[tuple[int, int], ...]:
    """Useful (SM count, duration units) pairs: pessimistic co-run times, Pareto-filtered."""
    cost, full = problem.cost, problem.gpu.num_sms
    points = []
    for sms in grid or problem.gpu.sm_grid():
        if sms == full:
            ms = cost.solo_ms(op, num_tokens, sms)       # a full-GPU op runs alone
        else:
            ms = cost.stretched_ms(op, num_tokens, sms, co_classes)
        points.append((sms, max(1, math.ceil(ms * UNITS_PER_MS - 1e-6))))
    kept, best = [], math.inf
    for sms, d in sorted(points):
        if d < best:
            kept.append((sms, d))
            best = d
    return tuple(kept)


def stage2_data(problem: Problem, sizes: Sizes, grid: list[int] | None = None) -> Stage2Data:
    nano = split_layers(problem.layer, sizes, problem.num_layers, problem.workload)
    order = topo_order(nano)
    index = {n: i for i, n in enumerate(order)}
    classes = frozenset(problem.cost.op_class(n) for n in problem.layer.nodes)
    tasks = tuple(Task(id=n.id, group=f"{n.op}#{n.index}", stream=problem.cost.op_class(n.op),
                       choices=sm_choices(problem, n.op, n.num_tokens, classes, grid)) for n in order)
    edges = tuple(sorted((index[u], index[v]) for u, v in nano.edges))
    hint, clock = {}, 0
    for i, t in enumerate(tasks):                      # everything one after another at the most SMs
        sms, d = t.choices[-1]
        hint[i] = (clock, sms)
        clock += d
    return Stage2Data(tasks, edges, problem.gpu.num_sms, UNITS_PER_MS, hint)


# ---------------------------------------------------------------- baselines

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


# ---------------------------------------------------------------- the partition sweep (stage 1 + incumbent)

OVERLAPPERS = frozenset({"memory", "network"})    # classes that take the small side of a partition
OPTION_RADIUS = 8                                 # stage-2 SM options: 132 and the incumbent's share +- this


@dataclass
class Frame:
    """One structure's unrolled nano-op DAG and what the sweep needs from it, computed once."""
    structure: Structure
    nano: nx.DiGraph
    group_overlaps: dict[str, bool]     # group -> some member may run beside an op of the other side


@dataclass
class Candidate:
    judge_ms: float                     # simulate.replay makespan of the plan
    frame: Frame
    memory_sms: int                     # the partition: overlappers get this, their overlap partners the rest
    sms: dict[str, int]                 # group -> SM count
    plan: Schedule                      # replay-timed plan


def group_of(n: NanoOp) -> str:
    return f"{n.op}#{n.index}"


def make_frame(problem: Problem, structure: Structure) -> Frame:
    nano = split_layers(problem.layer, structure.as_dict(), problem.num_layers, problem.workload)
    order = topo_order(nano)
    idx = {n: i for i, n in enumerate(order)}
    anc = [0] * len(order)                # bitsets of ancestors
    for n in order:
        bits = 0
        for p in nano.predecessors(n):
            bits |= anc[idx[p]] | (1 << idx[p])
        anc[idx[n]] = bits
    desc = [0] * len(order)
    for n in reversed(order):
        bits = 0
        for s in nano.successors(n):
            bits |= desc[idx[s]] | (1 << idx[s])
        desc[idx[n]] = bits
    small = 0
    for n in order:
        if problem.cost.op_class(n.op) in OVERLAPPERS:
            small |= 1 << idx[n]
    everything = (1 << len(order)) - 1
    overlaps: dict[str, bool] = {}
    for n in order:
        i = idx[n]
        other_side = small if problem.cost.op_class(n.op) not in OVERLAPPERS else everything & ~small
        free = other_side & ~(anc[i] | desc[i] | (1 << i))
        g = group_of(n)
        overlaps[g] = overlaps.get(g, False) or bool(free)
    return Frame(structure, nano, overlaps)


class Durations:
    """Stage-2 model durations in units: solo at the full GPU (nothing fits beside it), else the
    co-run time against the worst other class of the plan (pessimistic). Cached."""

    def __init__(self, problem: Problem):
        self.p = problem
        self.classes = frozenset(problem.cost.op_class(n) for n in problem.layer.nodes)
        grid = problem.gpu.sm_grid()          # granularity multiples, their complements (a split's back side)
        self.grid = sorted(set(grid) | {problem.gpu.num_sms - g for g in grid
                                         if grid[0] <= problem.gpu.num_sms - g < problem.gpu.num_sms})
        self.cache: dict[tuple, int] = {}
        self.plan_profile = problem.plan_profile()       # (hashes the table: once per search)

    def units(self, op: str, tokens: int, sms: int) -> int:
        key = (op, tokens, sms)
        if key not in self.cache:
            cost = self.p.cost
            ms = (cost.solo_ms(op, tokens, sms) if sms == self.p.gpu.num_sms
                  else cost.stretched_ms(op, tokens, sms, self.classes))
            self.cache[key] = max(1, math.ceil(ms * UNITS_PER_MS - 1e-6))
        return self.cache[key]

    def undominated(self, op: str, tokens: int, sms: int) -> int:
        """The fewest SMs (on the grid, at most `sms`) that run the op no slower than `sms` does."""
        d = self.units(op, tokens, sms)
        return next(g for g in self.grid if g <= sms and self.units_or_inf(op, tokens, g) <= d)

    def units_or_inf(self, op: str, tokens: int, sms: int) -> float:
        try:
            return self.units(op, tokens, sms)
        except ProfileMiss:
            return math.inf

    def choices(self, op: str, tokens: int, around: int | None) -> tuple[tuple[int, int], ...]:
        """Pareto-filtered (SM count, units): the full GPU and the grid within OPTION_RADIUS of `around`."""
        full = self.p.gpu.num_sms
        pool = [g for g in self.grid if g == full or (around is not None and abs(g - around) <= OPTION_RADIUS)]
        kept, best = [], math.inf
        for g in sorted(pool):
            d = self.units_or_inf(op, tokens, g)
            if d < best:
                kept.append((g, d))
                best = d
        return tuple(kept)


def partition_candidate(problem: Problem, frame: Frame, memory_sms: int, durs: Durations) -> Candidate:
    """Overlappers on `memory_sms`, ops that may run beside them on the rest, the others on the full
    GPU; issue order from a list schedule at the model durations; timed by simulate.replay."""
    full, cost = problem.gpu.num_sms, problem.cost
    sms: dict[str, int] = {}
    for n in frame.nano.nodes:
        g = group_of(n)
        if g in sms:
            continue
        want = full
        if frame.group_overlaps[g]:
            want = memory_sms if cost.op_class(n.op) in OVERLAPPERS else full - memory_sms
        sms[g] = durs.undominated(n.op, n.num_tokens, want)
    dur = {n: durs.units(n.op, n.num_tokens, sms[group_of(n)]) for n in frame.nano.nodes}
    order = list_order(frame.nano, dur, lambda n: cost.op_class(n.op))
    placement = {n: (cost.op_class(n.op), sms[group_of(n)]) for n in frame.nano.nodes}
    plan = timed(problem, frame.nano, placement, order, {"name": "partition-sweep"}, durs.plan_profile)
    return Candidate(plan.predicted["makespan_ms"], frame, memory_sms, sms, plan)


def structure_family(problem: Problem, chunk: int) -> list[Structure]:
    """Candidate structures: unsplit, k equal pieces (k = 2..4), cuts at the decode/prefill boundary
    alone or with the decode and/or prefill part halved. Every op is cut at the same token offsets
    (those inside its range); cuts are multiples of `chunk` from the op's range start."""
    total = max(problem.layer.nodes[n]["token_range"][1] for n in problem.layer.nodes)
    dec = problem.workload.num_decode
    snap = lambda x: int(round(x / chunk)) * chunk
    cut_sets = [(), *[tuple(snap(total * i / k) for i in range(1, k)) for k in (2, 3, 4)]]
    if 0 < dec < total:
        cut_sets += [(dec,), (dec, snap(dec + (total - dec) / 2)), (snap(dec / 2), dec),
                     (snap(dec / 2), dec, snap(dec + (total - dec) / 2))]
    out, seen = [], set()
    for cuts in cut_sets:
        sizes = _sizes_from_cuts(problem, cuts, chunk)
        key = tuple(sorted(sizes.items()))
        if key not in seen:
            seen.add(key)
            out.append(Structure(tuple((n, sizes[n]) for n in nx.topological_sort(problem.layer)), math.nan))
    return out


def _sizes_from_cuts(problem: Problem, cuts, chunk: int) -> Sizes:
    sizes = {}
    for n in problem.layer.nodes:
        s, e = problem.layer.nodes[n]["token_range"]
        inner = sorted({c - s for c in cuts if s < c < e and (c - s) % chunk == 0})
        bounds = [0, *inner, e - s]
        sizes[n] = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    return sizes


def sweep(problem: Problem, chunk: int) -> list[Candidate]:
    """Every structure of the family at every partition; each structure's best, best first."""
    durs = Durations(problem)
    full = problem.gpu.num_sms
    shares = [g for g in problem.gpu.sm_grid() if g < full]
    best: list[Candidate] = []
    for structure in structure_family(problem, chunk):
        frame, cands = make_frame(problem, structure), []
        for m in shares:
            try:
                cands.append(partition_candidate(problem, frame, m, durs))
            except ProfileMiss:
                continue
        if not cands:
            continue
        top = min(cands, key=lambda c: (round(c.judge_ms, 9), c.memory_sms))
        best.append(top)
    return sorted(best, key=lambda c: (round(c.judge_ms, 9), len(c.plan.nano_ops)))
