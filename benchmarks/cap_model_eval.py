"""The plan-dependent power model (benchmarks/cap_model.py) against every power-capped run on record.

Each case is a plan (or a baseline rebuilt from the same problem: seq-same is the sequential plan,
whole ops on the whole GPU with the fastest impl each) replayed with the profile the run used, and the
layer time measured on the GPU. It prints, per alpha, the replay, the old prediction max(replay, bound)
and the model, each with its error, the run's measured dynamic energy over the model's where the run
recorded it, and which cases a fit may use (llama-3-8b W1-W3 on the board the
bundled profile was measured on) and which judge it. CPU only; it measures nothing.

    python benchmarks/cap_model_eval.py [ALPHA ...] [--json OUT]
"""

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from cap_model import capped_layer

from nfsearch import plan as plan_mod
from nfsearch import profile as profile_mod
from nfsearch.cost import make_problem
from nfsearch.search.baselines import baselines
from nfsearch.simulate import replay

R = Path(__file__).parent / "results"


@dataclass
class Case:
    name: str
    board: str              # which GPU(s) ran it
    plan: str               # plan path, or "sequential" / "equal-split" of `base`'s problem
    profile: str
    measured_ms: float
    is_fit: bool = False     # may a fit use it (llama-3-8b W1-W3 on the bundled profile's board)
    base: str = ""           # the plan whose problem rebuilds a baseline
    power: dict | None = None  # the run's sustained-loop reading of this plan (energy_per_layer_j, layer_ms)


def _run(path: str) -> dict:
    return json.loads((R / path).read_text())


def _seq_same(path: str) -> float:
    b = _run(path)["baselines"]
    return (b.get("seq-same") or b.get("seq_same"))["layer_ms"]


def cases() -> list[Case]:
    out = []
    pw = "power_2026-11-27"
    prof = str(R / pw / "llama-3-8b.energy.parquet")
    for w in ("W1", "W2", "W3"):
        run = _run(f"{pw}/run-{w}.json")
        plan = f"benchmarks/plans/{w}.json"
        out.append(Case(f"{w} plan", "H100 a", plan, prof, run["derived"]["measured_layer_ms"], True,
                        power=run.get("power")))
        out.append(Case(f"{w} seq-same", "H100 a", "sequential", prof, _seq_same(f"{pw}/run-{w}.json"), True, plan))
    for m in ("Qwen2-7B", "Mistral-7B-v0.1"):
        run = _run(f"{pw}/unseen/run-{m}.json")
        plan = f"benchmarks/plans/unseen/{m}-W2.json"
        cal = str(R / pw / "unseen" / f"{m}.cal.parquet")
        out.append(Case(f"{m} W2 plan", "H100 a", plan, cal, run["derived"]["measured_layer_ms"], power=run.get("power")))
        out.append(Case(f"{m} W2 seq-same", "H100 a", "sequential", cal, _seq_same(f"{pw}/unseen/run-{m}.json"),
                        base=plan))
    en = "energy_2026-11-27"
    for w in ("W2", "W3"):
        tune = _run(f"{en}/tune_{w}/best.tune.json")
        plan = str(R / en / f"tune_{w}" / "best.json")
        for c in tune["candidates"]:
            label = c["candidate"]
            which = plan if label == "solved" else "sequential" if label == "sequential" else "equal-split"
            out.append(Case(f"{w} tune {label}", "H100 b (bundled energy from a)", which, prof,
                            c["derived"]["measured_layer_ms"], base=plan, power=c.get("power")))
        out.append(Case(f"{w} tune seq-same", "H100 b (bundled energy from a)", "sequential", prof,
                        tune["candidates"][0]["baselines"]["seq-same"]["layer_ms"], base=plan))
    tp = "tp_power_2026-11-27/W4_H100x2"
    run = _run(f"{tp}/run/run.json")
    plan = str(R / tp / "plan.json")
    out.append(Case("W4 plan", "2x H100", plan, str(R / tp / "x.parquet"), run["measured_layer_ms"]))
    out.append(Case("W4 seq-same", "2x H100", "sequential", str(R / tp / "x.parquet"),
                    run["baselines"]["seq_same"]["layer_ms"], base=plan))
    tune = _run("tp_power_2026-11-27/W4_H100x2_tune/tune/best.tune.json")
    for c in tune["candidates"]:
        label = c["candidate"]
        which = plan if label == "solved" else "sequential" if label == "sequential" else "equal-split"
        out.append(Case(f"W4 tune {label}", "2x H100", which, str(R / tp / "x.parquet"), c["measured_layer_ms"],
                        base=plan))
    out.append(Case("W4 tune seq-same", "2x H100", "sequential", str(R / tp / "x.parquet"),
                    tune["candidates"][0]["baselines"]["seq_same"]["layer_ms"], base=plan))
    new = "tp_pairs_2026-11-27/W4_H200x2"
    x = str(R / new / "session" / "x.parquet")
    plan = str(R / new / "session" / "plan.json")
    run = _run(f"{new}/session/run/run.json")
    out.append(Case("W4 plan (workload pairs)", "2x H200", plan, x, run["measured_layer_ms"]))
    out.append(Case("W4 seq-same (workload pairs)", "2x H200", "sequential", x,
                    run["baselines"]["seq_same"]["layer_ms"], base=plan))
    tune = _run(f"{new}/tune_timeline/tune/best.tune.json")
    for c in tune["candidates"]:
        label = c["candidate"]
        which = plan if label == "solved" else "sequential" if label == "sequential" else "equal-split"
        out.append(Case(f"W4 tune {label} (workload pairs)", "2x H200", which, x, c["measured_layer_ms"], base=plan))
    return out


def evaluate(case: Case, alphas) -> dict:
    table = profile_mod.load(case.profile)
    ref = plan_mod.read(case.base or case.plan)
    problem = make_problem(ref.model, ref.workload, table, ref.num_layers)
    if case.plan == "sequential" or case.plan == "equal-split":
        schedule = next(s for k, s in baselines(problem).items() if k.startswith(case.plan))
    else:
        schedule = ref
    result = replay(schedule, problem.cost)
    row = {"case": case.name, "board": case.board, "is_fit": case.is_fit, "measured_ms": case.measured_ms,
           "replay_ms": result.replayed_layer_ms, "bound_ms": result.layer_time_ms, "model": {}}
    static_w = table.energy.static_power_w
    # the run's dynamic energy per layer in its sustained loop, above the profile's static power
    measured_j = (None if not case.power or not case.power.get("energy_per_layer_j") else
                  case.power["energy_per_layer_j"] - static_w * case.power["layer_ms"] / 1e3)
    row["measured_dynamic_j"] = measured_j
    for alpha in alphas:
        c = capped_layer(schedule, result.timeline, problem.cost, alpha)
        row["model"][alpha] = {"ms": c.layer_ms, "mhz": c.sm_clock_mhz, "ref_mhz": c.ref_clock_mhz,
                               "dynamic_j": c.dynamic_j,
                               "energy_ratio": None if measured_j is None else measured_j / c.dynamic_j}
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("alphas", nargs="*", type=float, default=[0.5, 1.0, 1.5, 2.0])
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = [evaluate(c, args.alphas) for c in cases()]
    err = lambda p, m: f"{(p - m) / m:+6.1%}"
    head = f"{'case':<34}{'fit':>4}{'meas':>7}{'replay':>15}{'max(r,bound)':>15}"
    print(head + "".join(f"{f'a={a:g}':>22}" for a in args.alphas) + f"{'E meas/model':>14}")
    for r in rows:
        m = r["measured_ms"]
        line = (f"{r['case']:<34}{'yes' if r['is_fit'] else '':>4}{m:>7.3f}{r['replay_ms']:>8.3f} {err(r['replay_ms'], m)}"
                f"{r['bound_ms']:>8.3f} {err(r['bound_ms'], m)}")
        for a in args.alphas:
            x = r["model"][a]
            line += f"{x['ms']:>8.3f} {err(x['ms'], m)} {x['mhz']:>5.0f}"
        ratio = r["model"][args.alphas[-1]]["energy_ratio"]
        print(line + (f"{ratio:>14.3f}" if ratio is not None else ""))
    for a in args.alphas:
        errs = [abs(r["model"][a]["ms"] - r["measured_ms"]) / r["measured_ms"] for r in rows]
        fit = [e for e, r in zip(errs, rows) if r["is_fit"]]
        print(f"alpha {a:g}: max |error| fit {max(fit):.1%}, all {max(errs):.1%}; within 5%: "
              f"{sum(e <= 0.05 for e in errs)} of {len(errs)}")
    old = [abs(r["bound_ms"] - r["measured_ms"]) / r["measured_ms"] for r in rows]
    print(f"max(replay, bound): max |error| {max(old):.1%}; within 5%: {sum(e <= 0.05 for e in old)} of {len(old)}")
    for name, rel in (("replay", lambda r: r["replay_ms"]), ("max(replay, bound)", lambda r: r["bound_ms"]),
                      *((f"cap model, alpha {a:g}", lambda r, a=a: r["model"][a]["ms"]) for a in args.alphas)):
        e = [abs(rel(r) - r["measured_ms"]) / r["measured_ms"] for r in rows]
        print(f"{name}: median |error| {statistics.median(e):.1%}, mean {statistics.mean(e):.1%}, max {max(e):.1%}")
    print(f"E meas/model: the run's sustained-loop dynamic energy per layer (above the profile's static power) "
          f"over the model's at its clock, alpha {args.alphas[-1]:g}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
