"""Offline probe of a plan-dependent power bound (benchmarks/results/energy_2026-11-27/ANALYSIS.md).

The model puts the whole layer at one steady SM clock f, the fixed point of the power cap:
- T(f): the plan's replay (bundled H100 profile), with compute-class nano-ops scaled by F_PROF / f and
  the others kept, re-sequenced in stream order and dependencies.
- E(f): each nano-op's dynamic energy (cost.nano_dynamic_j) x (f / f_op)^alpha, where f_op is the SM
  clock of the op's nearest energy point.
- f: the largest f <= 1980 MHz with E(f) / T(f) <= limit - static. The predicted layer time is T(f).

It prints the model against the times measured on one H100 (energy_2026-11-27/tune_W*) for W2's and W3's
solved, sequential and equal-split plans. It runs on a CPU and measures nothing; it is not used by nfsearch.

    python benchmarks/cap_model_probe.py [ALPHA] [F_PROF_MHZ]      (defaults 1.0, 1980)
"""

import sys

from nfsearch import plan as plan_mod
from nfsearch.cost import default_profile, make_problem
from nfsearch.search.baselines import baselines
from nfsearch.simulate import replay
from nfsearch.specs import load_model, load_workload

F_MAX_MHZ = 1980.0
# measured on one H100 80GB HBM3, 2026-11-27 (benchmarks/results/energy_2026-11-27/tune_W*/best.tune.json)
MEASURED_MS = {"W2": {"solved": 1.967, "sequential": 2.064, "equal-split-2 memory@36": 2.266},
               "W3": {"solved": 3.457, "sequential": 3.474, "equal-split-2 memory@24": 3.688}}


def layer_ms_at(schedule, spans, f_mhz: float, f_prof_mhz: float) -> float:
    """T(f): the replayed durations, compute-class ones scaled to clock f, in stream order and deps."""
    end, free = {}, {}
    for o in sorted(schedule.nano_ops, key=lambda o: o.order):
        span = spans[o.id]
        duration = (span.end_ms - span.start_ms) * (f_prof_mhz / f_mhz if o.op_class == "compute" else 1.0)
        start = max([free.get(o.stream, 0.0)] + [end[d] for d in o.deps if d in end])
        end[o.id] = free[o.stream] = start + duration
    return max(end.values()) / schedule.num_layers


def dynamic_j_at(schedule, cost, clocks: dict, f_mhz: float, alpha: float) -> float:
    """E(f): each nano-op's dynamic energy at clock f from its energy point's clock."""
    total = 0.0
    for o in schedule.nano_ops:
        points = sorted(clocks.get(o.op, [(1, F_MAX_MHZ)]), key=lambda p: abs(p[0] - o.num_tokens))
        total += cost.nano_dynamic_j(o.op, o.num_tokens) * (f_mhz / points[0][1]) ** alpha
    return total / schedule.num_layers


def capped_clock(schedule, cost, spans, clocks, headroom_w: float, alpha: float, f_prof: float) -> float:
    power_w = lambda f: dynamic_j_at(schedule, cost, clocks, f, alpha) / (layer_ms_at(schedule, spans, f, f_prof) / 1e3)
    if power_w(F_MAX_MHZ) <= headroom_w:
        return F_MAX_MHZ
    lo, hi = 300.0, F_MAX_MHZ
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if power_w(mid) > headroom_w else (mid, hi)
    return lo


def main() -> None:
    alpha = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    f_prof = float(sys.argv[2]) if len(sys.argv) > 2 else F_MAX_MHZ
    model = load_model("llama-3-8b")
    print(f"alpha {alpha}, profile kernels timed at {f_prof:.0f} MHz")
    print(f"{'':<4}{'plan':<26}{'replay':>8}{'model':>8}{'MHz':>6}{'dyn J':>7}{'measured':>9}{'model/solved':>13}{'meas/solved':>12}")
    for name in ("W2", "W3"):
        workload = load_workload(name)
        problem = make_problem(model, workload, default_profile(model, workload), 2, False)
        cost = problem.cost
        energy = cost.energy.energy
        clocks = {}
        for p in energy.points:
            clocks.setdefault(p.op, []).append((p.num_tokens, p.sm_clock_mhz or F_MAX_MHZ))
        headroom_w = energy.power_limit_w - energy.static_power_w
        plans = {"solved": plan_mod.read(f"benchmarks/plans/{name}.json"), **baselines(problem)}
        rows = {}
        for label, schedule in plans.items():
            result = replay(schedule, cost)
            spans = {s.id: s for s in result.timeline.spans}
            f = capped_clock(schedule, cost, spans, clocks, headroom_w, alpha, f_prof)
            rows[label] = (result.replayed_layer_ms, layer_ms_at(schedule, spans, f, f_prof), f,
                           dynamic_j_at(schedule, cost, clocks, f, alpha))
        measured = MEASURED_MS[name]
        for label, (replayed, modelled, f, dyn) in rows.items():
            m = measured.get(label)
            print(f"{name:<4}{label:<26}{replayed:>8.3f}{modelled:>8.3f}{f:>6.0f}{dyn:>7.3f}"
                  f"{m if m else float('nan'):>9.3f}{modelled / rows['solved'][1]:>13.3f}"
                  f"{(m / measured['solved']) if m else float('nan'):>12.3f}")


if __name__ == "__main__":
    main()
