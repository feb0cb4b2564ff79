"""Benchmark the search on W1-W4 (bundled H100 profile): wall time, stage-2 gap, makespans.

    python benchmarks/solve.py [--workloads W1 W2 W3 W4] [--time-limit 8] [--threads 2] [--seed 0] [--solver cpsat]
        [--out DIR]

Targets: wall <= 10 s on 2 cores, gap <= 1%, makespan no worse than sequential and the best
equal-split 2-nano-batch plan. Writes DIR/solve_<solver>_<date>.json (default DIR: out/) and prints
one JSON line per workload.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nfsearch.cost import default_profile, make_problem  # noqa: E402
from nfsearch.search.baselines import baselines
from nfsearch.search import solve  # noqa: E402
from nfsearch.simulate import replay, verify  # noqa: E402
from nfsearch.specs import load_model, load_workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", nargs="+", default=["W1", "W2", "W3", "W4"])
    ap.add_argument("--time-limit", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--solver", default="cpsat")
    ap.add_argument("--out", default="out", help="folder for the JSON (created)")
    args = ap.parse_args()
    runs = [run_one(name, args) for name in args.workloads]
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "time_limit_s": args.time_limit, "threads": args.threads, "seed": args.seed, "solver": args.solver,
        "runs": runs,
    }
    out = Path(args.out) / f"solve_{args.solver}_{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        print(json.dumps({k: r[k] for k in ("workload", "wall_s", "gap", "makespan_ms", "sequential_ms",
                                             "best_equal_split_2_ms", "source", "targets")}))
    print(f"wrote {out}")


def run_one(name: str, args) -> dict:
    workload = load_workload(name)
    model = load_model(workload.model)
    problem = make_problem(model, workload, default_profile(model, workload))
    began = time.perf_counter()
    schedule, notes = solve(problem, solver=args.solver, time_limit_s=args.time_limit, threads=args.threads,
                            seed=args.seed)
    wall = time.perf_counter() - began
    verify(schedule)
    base = {k: v.predicted.makespan_ms for k, v in baselines(problem).items()}
    equal = min(v for k, v in base.items() if k.startswith("equal-split"))
    ours = schedule.predicted.makespan_ms
    gap = schedule.solver.gap
    return {
        "workload": workload.name, "model": model.name, "profile": problem.profile.label,
        "num_layers": problem.num_layers, "wall_s": round(wall, 3), "solver": schedule.solver.to_dict(),
        "source": schedule.solver.source, "gap": gap,
        "makespan_ms": round(ours, 6),
        "replay_makespan_ms": round(replay(schedule, problem.cost).makespan_ms, 6),
        "sequential_ms": round(base["sequential"], 6),
        "best_equal_split_2_ms": round(equal, 6),
        "vs_sequential": round(ours / base["sequential"], 4),
        "vs_equal_split": round(ours / equal, 4),
        "notes": notes,
        "targets": {"wall_le_10s": wall <= 10.0, "gap_le_1pct": gap is not None and gap <= 0.01,
                    "no_worse_than_sequential": ours <= base["sequential"] + 1e-9,
                    "no_worse_than_equal_split": ours <= equal + 1e-9},
    }


if __name__ == "__main__":
    main()
