"""Replay a plan through the cost and interference model, independently of what produced it.

`verify` re-checks the plan against the model's operation graph and its own stated times: nano-ops
cover every op exactly, every data dependency is declared, dependencies finish before dependants
start, one op at a time per stream in issue order, and the SMs in use never exceed the GPU's.
`replay` then runs the plan as the executor would: each stream issues its ops in order, an op starts
once its stream is free (plus the cost model's launch gap), its dependencies and the ops it is
ordered after (plan v2's `after`: the cross-stream order the search chose) are done (plus the
cross-stream event wait for those on other streams) and its SMs are free; ops that run beside ops of
another class progress at the interference model's stretched rate; ops of one class side by side
never together go faster than the whole GPU would run them one after another (the class's ceiling).
Times that are not finite and positive are refused; every replay step retires an op, so it ends.

`judge` gives THE predicted time of a plan, which solve, simulate, check and tune all use: its
replay, and where the profile has energy the cost model's power bound of one layer (cost.py; with
pair energy points, the plan's own: its overlaps priced by the measured pairs); the predicted layer
time is max(the replayed makespan per layer, the bound). The replayed timeline itself is the
kernels' schedule and is not stretched. The search's margin against the sequential plan is the
judgement's too (Judgement.beats).
"""

import math
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import networkx as nx

from nfsearch.cost import SRC_ROWS, SRC_SAME_CLASS, CostModel, Partner, make_problem, power_bound_of
from nfsearch.energy import PowerBound
from nfsearch.errors import NfsearchError
from nfsearch.graph import build_layer, split_layers
from nfsearch.layouts import buildable_layouts, corun_components
from nfsearch.pair_model import SRC_PAIRS, SRC_PAIRS_CLAMPED
from nfsearch.plan import PlannedOp, Schedule, check_structure
from nfsearch.timeline import Span, Timeline

TOLERANCE_MS = 1e-4
MAX_GROUPS = 3          # green-context groups side by side (runtime/launch.py builds at most three)


class PlanInvalid(NfsearchError):
    """The plan breaks one of its constraints."""


@dataclass(frozen=True)
class Replay:
    timeline: Timeline
    stated: Timeline            # the plan's own predicted times
    cost: CostModel = field(repr=False, compare=False)

    @property
    def makespan_ms(self) -> float:
        """Of the whole plan (all its layers), replayed."""
        return self.timeline.makespan_ms

    @property
    def replayed_layer_ms(self) -> float:
        """Per layer: the replayed makespan / the plan's layers."""
        return self.timeline.layer_time_ms


@dataclass(frozen=True)
class Judgement:
    """A plan's predicted time: its replay and, where the profile has energy, the power bound of one
    layer (the plan's own where the profile has pair energy points: `is_own_bound`)."""
    replay: Replay
    power_bound: PowerBound | None
    is_own_bound: bool

    @property
    def replayed_layer_ms(self) -> float:
        return self.replay.replayed_layer_ms

    @property
    def layer_ms(self) -> float:
        """THE predicted time per layer: the replay's, or the power bound where that is slower."""
        bound = self.power_bound
        return self.replayed_layer_ms if bound is None else bound.layer_ms(self.replayed_layer_ms)

    @property
    def makespan_ms(self) -> float:
        """THE predicted time of the whole plan (all its layers): layer_ms x layers."""
        return self.layer_ms * self.replay.timeline.num_layers

    @property
    def is_power_bound(self) -> bool:
        return self.power_bound is not None and self.power_bound.is_binding(self.replayed_layer_ms)

    @property
    def ranked_layer_ms(self) -> float:
        """What plans are compared by (the margin, `nfsearch check`), per layer: layer_ms where each
        plan has its own bound; the replay's alone where the bound is the layer's, which every split
        shares and which so cannot tell an overlap that pays at the cap (W2 on an H100, 1.06x) from
        one that does not (W3, 0.96x)."""
        return self.layer_ms if self.is_own_bound else self.replayed_layer_ms

    @property
    def ranked_makespan_ms(self) -> float:
        """ranked_layer_ms for the whole plan (all its layers): what the search minimises."""
        return self.ranked_layer_ms * self.replay.timeline.num_layers

    def beats(self, other: "Judgement", min_gain: float) -> bool:
        """Whether this plan is predicted at least `min_gain` (a fraction) faster than `other`."""
        return self.ranked_layer_ms <= other.ranked_layer_ms * (1.0 - min_gain)


def judge(schedule: Schedule, cost: CostModel) -> Judgement:
    """`schedule` replayed through `cost`, with its power bound (the module doc)."""
    result = replay(schedule, cost)
    energy = cost.energy
    # every plan has its own bound where the profile has energy: its nano-batches' energy at their
    # own sizes (cost.split_energy_j), and its overlaps' where pair energy points price them
    is_own = energy is not None and cost.power_bound() is not None
    return Judgement(result, cost.plan_power_bound(result.timeline.spans, schedule.num_layers), is_own)


def plan_dynamic_energy_j(schedule: Schedule, cost: CostModel) -> float:
    """Dynamic energy per layer of the plan's nano-ops, each at its own token count (0 without
    energy): the power bound's dynamic energy before overlaps are priced."""
    return sum(cost.nano_dynamic_j(op.op, op.num_tokens) for op in schedule.nano_ops) / schedule.num_layers


def power_bound_for(schedule: Schedule, profile) -> tuple[PowerBound | None, str]:
    """The power bound of one layer of `schedule` by `profile`'s energy, and one line on it: the
    plan's own (cost.plan_power_bound: its nano-batches at their own sizes, its replayed overlaps
    priced by the profile's pair energy points where it has them), else, where the plan cannot be
    replayed, the layer's (cost.power_bound_of); None and why without energy."""
    bound, note = power_bound_of(profile, schedule.model, schedule.workload)
    if bound is None:
        return bound, note
    try:
        cost = make_problem(schedule.model, schedule.workload, profile, schedule.num_layers).cost
        own = judge(schedule, cost).power_bound
    except NfsearchError as exc:          # a profile that cannot replay this plan: the layer's bound
        return bound, f"{note}; the plan's nano-batches and overlaps not priced ({str(exc)[:160]})"
    return own, own.note


def power_line(result: Judgement, cost: CostModel) -> str:
    """One line: the power bound and whether it binds the replayed plan, or why there is none."""
    if result.power_bound is None:
        return cost.power_note
    # the plan's own bound says what its nano-batches and overlaps added (cost.plan_power_bound's note)
    overlaps = [part for part in result.power_bound.note.split("; ")
                if part.startswith(("nano-batches ", "overlaps "))]
    return result.power_bound.describe(result.replayed_layer_ms) + "".join(f"; {part}" for part in overlaps)


MEASURED_SOURCES = (SRC_PAIRS, SRC_PAIRS_CLAMPED, SRC_ROWS)


def corun_sources(schedule: Schedule, cost: CostModel) -> Counter:
    """Where a replay of `schedule` takes its co-run stretches from: cost.py's sources, each distinct
    lookup once (a fresh cost model of the same tables, so the search's own lookups do not count)."""
    fresh = CostModel(cost.profile, cost.layer, cost.workload, cost.interference, cost.is_extrapolating,
                      cost.pairs, cost.overheads)
    replay(schedule, fresh)
    return Counter({k: n for k, n in fresh.source_counts.items() if k != SRC_SAME_CLASS})


def sources_line(counts: Counter) -> str:
    """One line: how many of a plan's co-run estimates come from measured pairs, the others' sources,
    and, when fewer than half do, how to measure them ("" for a plan with no co-run): on 2x H100 a W4
    plan priced wholly from outside its measured pairs runs 10-14% slower than replayed."""
    total = sum(counts.values())
    if not total:
        return ""
    measured = sum(counts[s] for s in MEASURED_SOURCES)
    others = "; ".join(f"{n} {src}" for src, n in counts.most_common() if src not in MEASURED_SOURCES)
    hint = ("; fewer than half measured: `nfsearch profile` with this workload measures the pairs of its "
            "own batch" if measured * 2 < total else "")
    return f"co-run estimates: {measured} of {total} from measured pairs" + (f" ({others})" if others else "") + hint


def verify(schedule: Schedule) -> None:
    """Every constraint the executor needs; raises PlanInvalid (or NfsearchError) with one line.
    The cheap structural checks (caps, ranges, impls, positive stated times, SM grid) come first
    (plan.check_structure), before any graph is built; then the graph, the stated times, and the
    green-context layouts of ops that run side by side."""
    check_structure(schedule, "plan")
    _check_graph(schedule)
    _check_times(schedule)
    check_layouts(schedule)


def check_layouts(schedule: Schedule, max_groups: int = MAX_GROUPS) -> None:
    """Ops predicted side by side must run on ONE buildable layout (the executor, runtime/launch.py,
    gives every co-running set one build of one layout of nfsearch.layouts): for each co-running set
    (connected by stated overlap on different streams, whole-GPU ops apart) some layout of at most
    `max_groups` groups must have, for every SM count of the set, at least as many groups of that
    size as ops of that count run at once."""
    n, g = schedule.gpu.num_sms, schedule.gpu.sm_granularity
    layouts = _layout_counts(n, g, max_groups)
    for comp in _corun_sets(schedule):
        need = _peak_by_size(comp)
        if not any(all(counts.get(s, 0) >= c for s, c in need.items()) for counts in layouts):
            sizes = ", ".join(f"{c} x {s}" if c > 1 else str(s) for s, c in sorted(need.items()))
            raise PlanInvalid(f"nano-ops {comp[0].id} .. {comp[-1].id} run side by side on SM counts "
                              f"({sizes}) that no buildable green-context layout of at most {max_groups} "
                              f"groups on {n} SMs (granularity {g}) gives at once")


@lru_cache(maxsize=16)
def _layout_counts(n: int, g: int, max_groups: int) -> tuple[dict, ...]:
    return tuple(dict(Counter(layout.sizes)) for layout in buildable_layouts(n, g, max_groups))


def _corun_sets(schedule: Schedule) -> list[list[PlannedOp]]:
    """Connected components of "stated to overlap in time, on different streams" among the ops that
    take an SM share short of the whole GPU, each in issue order (lone ops left out)."""
    # (ops of no SM share, sm_count 0, run on a plain stream: in no layout)
    side = sorted((o for o in schedule.nano_ops if 0 < o.sm_count < schedule.gpu.num_sms), key=lambda o: o.start_ms)
    return [sorted(c, key=lambda o: o.order) for c in corun_components(side, TOLERANCE_MS) if len(c) > 1]


def _peak_by_size(comp: list[PlannedOp]) -> dict[int, int]:
    """Per SM count, the most ops of that count running at one instant (by stated times)."""
    peak: dict[int, int] = {}
    for s in {o.sm_count for o in comp}:
        events = sorted([(o.start_ms, 1) for o in comp if o.sm_count == s] +
                        [(o.end_ms - TOLERANCE_MS, -1) for o in comp if o.sm_count == s])
        now = best = 0
        for _, d in events:
            now += d
            best = max(best, now)
        peak[s] = best
    return peak


def check_and_judge(schedule: Schedule, cost: CostModel, is_profile_given: bool) -> Judgement:
    """verify + judge (replay, power bound) against `cost`. A profile other than the one the plan was made with (another
    fingerprint) is refused unless the user named it explicitly (`is_profile_given`)."""
    fingerprint = cost.profile.fingerprint()
    if fingerprint != schedule.profile.fingerprint and not is_profile_given:
        raise NfsearchError(f"plan was made with profile {schedule.profile.fingerprint} "
                            f"({schedule.profile.label}), not {fingerprint} ({cost.profile.label}); "
                            f"name a profile explicitly to replay it with another")
    verify(schedule)
    return judge(schedule, cost)


def replay(schedule: Schedule, cost: CostModel) -> Replay:
    ops = sorted(schedule.nano_ops, key=lambda o: o.order)
    queues = {s: [o for o in ops if o.stream == s] for s in schedule.streams}
    num_sms = schedule.gpu.num_sms
    by_id = {o.id: o for o in ops}
    wait_ms, gap_ms = cost.event_wait_ms, cost.launch_gap_ms
    done: dict[str, float] = {}
    free_at: dict[str, float] = {}            # stream -> when its last op ended
    running: dict[str, list] = {}             # id -> [op, remaining fraction, start]
    spans, now = [], 0.0
    # every step either finishes an op (the first to end is retired exactly) or reaches the moment a
    # waiting op's cross-stream event wait is over, so 2 len(ops) steps suffice; the cap guards that
    for _ in range(2 * len(ops) + 1):
        if len(done) == len(ops):
            break
        next_ready = _start_ready(queues, running, done, by_id, num_sms, now, wait_ms, gap_ms, free_at)
        if not running and next_ready is None:
            raise PlanInvalid("plan deadlocks: no nano-op can start (a dependency waits on a later op "
                              "of its own stream, or an op needs more SMs than the GPU has)")
        if not running:
            now = next_ready
            continue
        rates = _rates(running, cost)
        first = min(running, key=lambda i: (running[i][1] / rates[i], running[i][0].order))
        step = running[first][1] / rates[first]
        if next_ready is not None and next_ready - now < step:
            step, first = next_ready - now, None
        now += step
        if not math.isfinite(now):
            raise NfsearchError(f"replay time overflowed at nano-op {first} (profile times too large)")
        for i, entry in list(running.items()):
            entry[1] = 0.0 if i == first else entry[1] - step * rates[i]
            if entry[1] <= 1e-9:
                op, _, start = running.pop(i)
                done[i] = now
                free_at[op.stream] = now
                spans.append(_span(op, start, now))
    else:
        raise PlanInvalid(f"replay did not finish in {2 * len(ops) + 1} steps")
    label = f"predicted ({cost.profile.label}, {cost.describe_sources()})"
    return Replay(Timeline(label, tuple(spans), schedule.num_layers), stated_timeline(schedule), cost)


def stated_timeline(schedule: Schedule) -> Timeline:
    spans = tuple(_span(op, op.start_ms, op.end_ms) for op in schedule.nano_ops)
    return Timeline(f"stated by solver {schedule.solver.name}", spans, schedule.num_layers)


def _start_ready(queues, running, done, by_id, num_sms, now, wait_ms, gap_ms, free_at) -> float | None:
    """Start every stream head whose inputs (and the ops it is ordered after) are ready and whose SMs
    are free; an input from another stream is ready `wait_ms` after it ends (the cross-stream event wait), and a head starts
    `gap_ms` after its stream's previous op ends (the launch gap). Returns the earliest later
    moment a head becomes ready (None if none waits on a wait or a gap)."""
    used = sum(entry[0].sm_count for entry in running.values())
    heads = sorted((q[0] for q in queues.values() if q and q[0].id not in running and not
                    any(r[0].stream == q[0].stream for r in running.values())), key=lambda o: o.order)
    later = None
    for op in heads:
        needs = op.deps + op.after
        if not all(d in done for d in needs):
            continue
        ready = max((done[d] + (wait_ms if by_id[d].stream != op.stream else 0.0) for d in needs), default=0.0)
        if op.stream in free_at:
            ready = max(ready, free_at[op.stream] + gap_ms)
        if ready > now + 1e-12:
            later = ready if later is None else min(later, ready)
            continue
        if used + op.sm_count <= num_sms:
            running[op.id] = [op, 1.0, now]
            used += op.sm_count
            queues[op.stream].pop(0)
    return later


def _rates(running, cost: CostModel) -> dict[str, float]:
    """Each running op's progress per ms: 1 / its time beside the other ops running (the cost model's
    pair stretches), and ops of one class together never faster than the whole GPU running them
    back to back (the class's ceiling: two bandwidth-bound ops on 64 SMs each do not get twice the
    memory bandwidth)."""
    rates = {}
    for i, (op, _, _) in running.items():
        partners = tuple(sorted(Partner(o.op, o.num_tokens, o.sm_count)
                                for j, (o, _, _) in running.items() if j != i))
        time_ms = cost.beside_ms(op.op, op.num_tokens, op.sm_count, partners)
        # an infinite or NaN time would never finish (replay once looped forever on one)
        if not (isinstance(time_ms, (int, float)) and math.isfinite(time_ms) and time_ms > 0):
            raise NfsearchError(f"profile gives nano-op {i} ({op.op}, {op.num_tokens} tokens, {op.sm_count} SMs) "
                                f"a time of {time_ms!r} ms; times must be finite and positive")
        rates[i] = 1.0 / time_ms
    by_class: dict[str, list[str]] = {}
    for i, (op, _, _) in running.items():
        by_class.setdefault(op.op_class, []).append(i)
    for same in by_class.values():
        if len(same) < 2:
            continue
        # the share of the whole GPU's speed on this op that each op's rate amounts to
        used = sum(rates[i] * cost.solo_ms(running[i][0].op, running[i][0].num_tokens, cost.num_sms) for i in same)
        if used > 1.0:
            for i in same:
                rates[i] /= used
    return rates


def _span(op: PlannedOp, start: float, end: float) -> Span:
    return Span(op.id, op.op, op.layer, op.op_class, op.stream, op.sm_count, op.num_tokens, start, end)


def _check_graph(schedule: Schedule) -> None:
    """Nano-ops must be exactly the model graph's ops split as the plan says, with all data deps."""
    layer = build_layer(schedule.model, schedule.workload)
    batches = schedule.nano_batches()
    missing = sorted(set(layer.nodes) - set(batches))
    extra = sorted(set(batches) - set(layer.nodes))
    if missing or extra:
        raise PlanInvalid(f"plan ops do not match the model's graph (missing: {missing or '-'}, "
                          f"unknown: {extra or '-'})")
    sizes = {op: tuple(e - s for s, e in ranges) for op, ranges in batches.items()}
    for op, ranges in batches.items():
        if ranges[0][0] != layer.nodes[op]["token_range"][0] or any(
                a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
            raise PlanInvalid(f"nano-batches of op {op} do not tile its token range")
    expected = split_layers(layer, sizes, schedule.num_layers, schedule.workload)
    by_id = schedule.by_id()
    if {n.id for n in expected.nodes} != set(by_id):
        raise PlanInvalid("plan nano-ops differ from its nano-batches in some layer")
    for n in expected.nodes:
        if by_id[n.id].tokens != (n.start, n.end):
            raise PlanInvalid(f"nano-batches of op {n.op} do not tile its token range: {n.id} covers "
                              f"{list(by_id[n.id].tokens)}, layer 0 says [{n.start}, {n.end}]")
    for u, v in expected.edges:
        if u.id not in by_id[v.id].deps and not nx.has_path(_dep_graph(schedule), u.id, v.id):
            raise PlanInvalid(f"plan violates its dependencies: {v.id} needs {u.id}")
    for op in schedule.nano_ops:
        if layer.nodes[op.op]["op"].op_class != op.op_class:
            raise PlanInvalid(f"nano-op {op.id} has class {op.op_class}, the graph says "
                              f"{layer.nodes[op.op]['op'].op_class}")


def _dep_graph(schedule: Schedule) -> nx.DiGraph:
    cached = getattr(schedule, "_dep_graph_cache", None)
    if cached is None:
        cached = nx.DiGraph()
        cached.add_nodes_from(op.id for op in schedule.nano_ops)
        cached.add_edges_from((d, op.id) for op in schedule.nano_ops for d in op.deps + op.after)
        ordered = sorted(schedule.nano_ops, key=lambda o: o.order)
        for stream in schedule.streams:
            same = [o.id for o in ordered if o.stream == stream]
            cached.add_edges_from(zip(same, same[1:]))
        object.__setattr__(schedule, "_dep_graph_cache", cached)
    return cached


def _check_times(schedule: Schedule) -> None:
    by_id = schedule.by_id()
    for op in schedule.nano_ops:
        for dep in op.deps + op.after:
            if by_id[dep].end_ms > op.start_ms + TOLERANCE_MS:
                what = "dependencies" if dep in op.deps else "order"
                raise PlanInvalid(f"plan violates its {what}: {op.id} starts at {op.start_ms:.4f} ms "
                                  f"before {dep} ends at {by_id[dep].end_ms:.4f} ms")
    ordered = sorted(schedule.nano_ops, key=lambda o: o.order)
    for stream in schedule.streams:
        same = [o for o in ordered if o.stream == stream]
        for a, b in zip(same, same[1:]):
            if b.start_ms + TOLERANCE_MS < a.end_ms:
                raise PlanInvalid(f"stream {stream} runs {b.id} before {a.id} ends")
    events = sorted([(o.start_ms, 1, o) for o in schedule.nano_ops] +
                    [(o.end_ms - TOLERANCE_MS, 0, o) for o in schedule.nano_ops], key=lambda e: (e[0], e[1]))
    used, num_sms = 0, schedule.gpu.num_sms
    for _, is_start, op in events:
        used += op.sm_count if is_start else -op.sm_count
        if used > num_sms:
            raise PlanInvalid(f"plan uses more than the GPU's {num_sms} SMs when {op.id} starts")
