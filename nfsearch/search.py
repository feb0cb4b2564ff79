"""The two-stage search: structure (nano-batch sizes and order), then SM counts and start times.

Stage 1 (structure). Nano-batch sizes per op are multiples of `chunk` tokens (the last piece of a
domain may be a remainder). A structure is scored by a list schedule of the unrolled nano-op DAG with
interference-free full-GPU solo times, one stream per op class, ops of different streams
overlapping freely (NanoFlow's stage-1 relaxation); the list scheduler issues the ready nano-op that
can start first (ties: longest remaining path, then DAG order), so the score is an achievable
makespan of that relaxation. The search follows the paper's refinement: start from 2 nano-batches
per op (equal halves, or split at the decode/prefill boundary), move and remove split points, align
an op's splits with those of the other ops on its token domain, split ops next to compute-stream
bubbles further, and stop when no move improves. Deterministic: moves are tried in a fixed order.

Stage 2 (SM allocation) is a CP-SAT (or Gurobi) model over the best stage-1 structures: each
nano-op picks an SM count (one per nano-op for all layers), durations are co-run times against the
worst other op class in the plan (solo time at the full GPU, where nothing can run beside it), one
op at a time per stream, SMs capped at the GPU's. The structures race on a short budget, the best
one gets the rest. The plan's times are the solver's; simulate.verify checks them and
simulate.replay re-times the plan independently. The result is never worse than the sequential plan
or the best equal-split 2-nano-batch plan: if it is, that plan is returned instead (solver note says
so).
"""

import math
import time
from dataclasses import dataclass
from typing import Callable

import networkx as nx

from nfsearch.errors import NfsearchError
from nfsearch.graph import NanoOp, split_layers
from nfsearch.handmade import DEFAULT_SHARES, equal_split_plan, predicted_figures, sequential_plan, topo_order
from nfsearch.plan import PlannedOp, Schedule
from nfsearch.problem import Problem
from nfsearch.profile import ProfileMiss
from nfsearch.simulate import replay, verify
from nfsearch.solvers.base import Stage2Data, Stage2Result, Task, resolve

UNITS_PER_MS = 10_000             # stage-2 time unit: 0.1 us
MAX_PIECES = 6                    # nano-batches per op at most
MAX_STAGE1_EVALS = 1500
STAGE1_KEEP = 6                   # stage-1 structures ranked by the stage-2 warm start
RACE_CANDIDATES = 2               # of those, how many race in the stage-2 solver
RACE_SHARE = 0.2                  # share of the time limit each racer gets; the winner gets the rest
SM_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)
BASELINE_SHARES = (DEFAULT_SHARES,
                   {"compute": 104, "memory": 28, "network": 16, "other": 28},
                   {"compute": 88, "memory": 44, "network": 24, "other": 44})

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

    say("stage 1: nano-batch sizes and order")
    candidates = stage1(problem, chunk, keep=STAGE1_KEEP)
    if not candidates:
        raise NfsearchError(f"no nano-batch structure with chunk {chunk} can be timed from the profile")
    best1 = candidates[0]
    notes.append(f"stage 1: {best1.describe()} (relaxed makespan {best1.stage1_ms:.4f} ms, "
                 f"{len(candidates)} structures kept)")
    say(notes[-1])

    # stage 2: rank the structures by a solver-free warm start, race the best, refine the winner
    grid = sm_subset(problem.gpu.num_sms, problem.gpu.sm_grid())
    pool = []
    for cand in candidates:
        data = stage2_data(problem, cand.as_dict(), grid)
        pool.append((greedy_stage2(data).makespan, len(pool), cand, data))
    pool.sort(key=lambda x: (x[0], x[1]))
    # race: the stage-1 best and the best warm starts among split structures (the unsplit one is
    # what the sequential fallback already covers)
    split = [x for x in pool if len(x[3].tasks) > problem.num_layers * problem.layer.number_of_nodes()]
    first = [x for x in split if x[1] == 0]
    racers = (first + [x for x in split if x[1] != 0])[:RACE_CANDIDATES] or pool[:1]
    backend, why = resolve(solver, max((p[3] for p in racers), key=lambda d: len(d.tasks)))
    notes.append(f"stage 2 solver: {why}; SM counts {grid}")
    say(notes[-1])
    race_limit = time_limit_s * RACE_SHARE if len(racers) > 1 else 0.0
    results = []
    for warm, k, cand, data in racers:
        data = _with_hint(data, greedy_stage2(data))
        res = backend.run(data, race_limit, threads, seed) if race_limit else None
        if res is None or res.makespan > warm:
            res = None if race_limit == 0 else greedy_stage2(data)
        say(f"stage 2 race: {cand.describe()}: warm start {warm / UNITS_PER_MS:.4f} ms"
            + (f", solver {res.makespan / UNITS_PER_MS:.4f} ms" if res else ""))
        results.append((res.makespan if res else warm, k, cand, data, res))
    results.sort(key=lambda x: (x[0], x[1]))
    _, _, winner, data, raced = results[0]
    if raced is not None:
        data = _with_hint(data, raced)
    rest = max(time_limit_s - race_limit * len(racers), 0.2 * time_limit_s)
    final = backend.run(data, rest, threads, seed)
    if final is None or (raced is not None and raced.makespan < final.makespan):
        final = raced
    wall = time.perf_counter() - began
    notes.append(f"search wall time {wall:.2f} s")

    baseline, base_name = _best_baseline(problem, chunk)
    note = backend.settings(time_limit_s, threads, seed)
    # (wall time goes to the notes, not the plan: the same inputs and seed give a byte-identical plan)
    if final is None:
        notes.append(f"stage 2 found no schedule; returning the {base_name} plan")
        return _relabel(baseline, backend.name, wall, time_limit_s, threads, seed,
                        f"stage 2 found no schedule; {base_name} plan returned"), notes

    schedule = to_schedule(problem, winner, data, final, backend.name)
    verify(schedule)
    replayed = replay(schedule, problem.cost).makespan_ms
    ours = final.makespan / UNITS_PER_MS
    notes.append(f"stage 2: {winner.describe()}: makespan {ours:.4f} ms, gap {final.gap:.2%} "
                 f"({final.status}); replay {replayed:.4f} ms")
    say(notes[-1])
    solver_info = {"name": backend.name, "status": final.status,
                   "gap": round(final.gap, 6), "seed": int(seed), "threads": int(threads),
                   "time_limit_s": float(time_limit_s), "note": note,
                   "bound_ms": round(final.bound / UNITS_PER_MS, 6), "replay_makespan_ms": round(replayed, 6),
                   "stage1_makespan_ms": round(winner.stage1_ms, 6), "structure": winner.describe(),
                   "choice": why}
    if baseline.predicted["makespan_ms"] < ours - 1e-9:
        notes.append(f"the search's {ours:.4f} ms is worse than the {base_name} plan's "
                     f"{baseline.predicted['makespan_ms']:.4f} ms; returning that plan")
        return _relabel(baseline, backend.name, wall, time_limit_s, threads, seed,
                        f"search result {ours:.4f} ms worse than {base_name}; {base_name} plan returned"), notes
    schedule = Schedule(schedule.model, schedule.workload, schedule.gpu, schedule.profile, schedule.num_layers,
                        schedule.nano_ops, schedule.predicted, solver_info)
    return schedule, notes


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
    return _list_schedule(nano, dur, lambda n: cost.op_class(n.op))


def _list_schedule(nano: nx.DiGraph, dur: dict, stream_of) -> tuple[float, dict, nx.DiGraph]:
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


def _with_hint(data: Stage2Data, result: Stage2Result) -> Stage2Data:
    hint = {i: (result.starts[i], result.sm_counts[i]) for i in range(len(data.tasks))}
    return Stage2Data(data.tasks, data.edges, data.num_sms, data.units_per_ms, hint)


def to_schedule(problem: Problem, structure: Structure, data: Stage2Data, result: Stage2Result,
                solver_name: str) -> Schedule:
    nano = split_layers(problem.layer, structure.as_dict(), problem.num_layers, problem.workload)
    by_id = {n.id: n for n in nano.nodes}
    upm = data.units_per_ms
    issue = sorted(range(len(data.tasks)), key=lambda i: (result.starts[i], i))
    ops = []
    for order, i in enumerate(issue):
        t, n = data.tasks[i], by_id[data.tasks[i].id]
        sms = result.sm_counts[i]
        ops.append(PlannedOp(id=n.id, layer=n.layer, op=n.op, index=n.index, op_class=t.stream,
                             tokens=(n.start, n.end), stream=t.stream, order=order, sm_count=sms,
                             impl=problem.cost.impl(n.op, n.num_tokens, sms),
                             deps=tuple(sorted(p.id for p in nano.predecessors(n))),
                             start_ms=result.starts[i] / upm,
                             end_ms=(result.starts[i] + result.durations[i]) / upm))
    return Schedule(problem.model, problem.workload, problem.plan_gpu(), problem.plan_profile(),
                    problem.num_layers, tuple(ops), predicted_figures(problem, result.makespan / upm),
                    {"name": solver_name})


# ---------------------------------------------------------------- baselines

def baselines(problem: Problem, chunk: int = 128) -> dict[str, Schedule]:
    out = {"sequential": sequential_plan(problem)}
    for k, shares in enumerate(BASELINE_SHARES):
        try:
            out[f"equal-split-2 shares#{k}"] = equal_split_plan(problem, 2, shares, chunk)
        except ProfileMiss:
            continue
    return out


def _best_baseline(problem: Problem, chunk: int) -> tuple[Schedule, str]:
    plans = baselines(problem, chunk)
    name = min(plans, key=lambda k: (plans[k].predicted["makespan_ms"], k))
    return plans[name], name


def _relabel(plan: Schedule, solver: str, wall: float, time_limit_s: float, threads: int, seed: int,
             note: str) -> Schedule:
    info = {"name": solver, "status": "fallback", "gap": None, "seed": int(seed),
            "threads": int(threads), "time_limit_s": float(time_limit_s), "note": note}
    return Schedule(plan.model, plan.workload, plan.gpu, plan.profile, plan.num_layers, plan.nano_ops,
                    plan.predicted, info)

# ---------------------------------------------------------------- stage-2 warm start

def greedy_stage2(data: Stage2Data, max_sweeps: int = 4) -> Stage2Result:
    """A feasible stage-2 schedule without a solver: serial schedule generation (each task, in DAG
    order, at its earliest start that fits its stream and the free SMs) with one SM count per group,
    improved by changing one group's SM count at a time while the makespan drops. Deterministic."""
    began = time.perf_counter()
    groups = data.groups()
    names = sorted(groups)
    choice = {g: len(data.tasks[groups[g][0]].choices) - 1 for g in names}   # start at the most SMs
    best = _ssgs(data, choice)
    # presets: memory and network ops on m SMs, the others on what is left (then refined per group)
    for m in sorted({sms for t in data.tasks if t.stream in ("memory", "network") for sms, _ in t.choices}):
        preset = {}
        for g in names:
            t = data.tasks[groups[g][0]]
            cap = m if t.stream in ("memory", "network") else data.num_sms - m
            fits = [k for k, (sms, _) in enumerate(t.choices) if sms <= cap]
            preset[g] = fits[-1] if fits else 0
        trial = _ssgs(data, preset)
        if trial[0] < best[0]:
            best, choice = trial, preset
    for _ in range(max_sweeps):
        improved = False
        for g in names:
            for k in range(len(data.tasks[groups[g][0]].choices)):
                if k == choice[g]:
                    continue
                trial = _ssgs(data, {**choice, g: k})
                if trial[0] < best[0]:
                    best, choice, improved = trial, {**choice, g: k}, True
        if not improved:
            break
    makespan, starts = best
    sms = tuple(data.tasks[i].choices[choice[t.group]][0] for i, t in enumerate(data.tasks))
    durs = tuple(data.tasks[i].choices[choice[t.group]][1] for i, t in enumerate(data.tasks))
    return Stage2Result("heuristic", tuple(starts), sms, durs, makespan, 0.0, time.perf_counter() - began)


def _ssgs(data: Stage2Data, choice: dict) -> tuple[int, list[int]]:
    preds: list[list[int]] = [[] for _ in data.tasks]
    for i, j in data.edges:
        preds[j].append(i)
    busy: dict[str, list[tuple[int, int]]] = {}
    usage: list[tuple[int, int, int]] = []          # (start, end, sms) of placed tasks
    starts, ends = [0] * len(data.tasks), [0] * len(data.tasks)
    for i, t in enumerate(data.tasks):              # tasks are in DAG (topological) order
        sms, d = t.choices[choice[t.group]]
        lane = busy.setdefault(t.stream, [])
        at = max((ends[p] for p in preds[i]), default=0)
        candidates = sorted({at} | {e for _, e in lane if e > at} | {e for _, e, _ in usage if e > at})
        for s in candidates:
            e = s + d
            if any(a < e and s < b for a, b in lane):
                continue
            points = [s] + [a for a, _, _ in usage if s < a < e]
            if all(sum(q for a, b, q in usage if a <= x < b) + sms <= data.num_sms for x in points):
                break
        starts[i], ends[i] = s, s + d
        lane.append((s, s + d))
        usage.append((s, s + d, sms))
    return max(ends), starts
