"""Run the W1-W3 plans on one GPU in one process: correctness, the plan's measured layer time beside
seq-torch, seq-same and seq-compiled (each the median of >= 3 interleaved repeats, with the min-max
spread), the roofline bound from ceilings measured in this run, and the prediction error.

    PYTHONPATH=. python benchmarks/run_workloads.py [--plans benchmarks/plans] [--out $OUT]
        [--only W1,W2,W3] [--iters 20] [--repeats 3] [--budget-s 300] [--no-grid] [--no-compiled]

Each plan benchmarks/plans/<W>.json runs in green mode (one green-context build per co-running
layout) with the three baselines, then in grid mode (plain streams, SM-bounded grids) where the
time budget allows (it reuses the green run's baselines, timed in the same process). seq-compiled
(torch.compile of seq-torch) is skipped past 55% of the time budget. `--cpu` walks the same path on
the CPU (host-clock timing, no ceilings measured: a dry run of the script, e.g. on tiny plans). Writes
<out>/run_<gpu>_<date>.json (GPU name, date, command, ceilings, every RunReport) after every
workload, and prints a short table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", default=str(Path(__file__).parent / "plans"))
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--only", default="W1,W2,W3")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="wall seconds: seq-compiled is skipped past 55%% of it, grid mode past 80%%, a workload "
                         "not started by then is skipped")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--no-compiled", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU (host clock; ceilings not measured)")
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error("--repeats must be >= 3 (median and spread of at least three)")

    import torch

    from nfsearch import plan
    from nfsearch.runreport import Ceilings, format_table
    from nfsearch.runtime import bench, executor

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    date = datetime.datetime.now(datetime.timezone.utc)
    ceilings = (Ceilings(1.0, 0.1, "not measured: --cpu dry run") if args.cpu
                else bench.ceilings())
    device = dict(device="cpu", time_on_cpu=True) if args.cpu else {}
    print(f"{gpu}: GEMM {ceilings.gemm_tflops:.0f} TFLOP/s, copy {ceilings.copy_tbps:.2f} TB/s "
          f"({time.time() - t_start:.1f} s)", flush=True)
    record = {"gpu": gpu, "date": date.isoformat(timespec="seconds"),
              "command": " ".join(["python"] + sys.argv), "ceilings": ceilings.to_dict(),
              "versions": {"torch": torch.__version__}, "iters": args.iters, "repeats": args.repeats, "runs": []}
    path = out / f"run_{_slug(gpu)}_{date:%Y-%m-%d}.json"
    shown = []
    for stem in [s for s in args.only.split(",") if s]:
        plan_path = Path(args.plans) / f"{stem}.json"
        entry = {"stem": stem, "plan_path": str(plan_path)}
        t = time.time()
        if t - t_start > args.budget_s:
            entry["skipped"] = "time budget"
            record["runs"].append(entry)
            shown.append({"workload": stem, "error": "skipped: time budget"})
            continue
        try:
            schedule = plan.read(plan_path)
            say = (lambda m, stem=stem: print(f"  [{stem} {time.time() - t_start:5.0f}s] {m}", flush=True))
            compiled = not args.no_compiled and time.time() - t_start < 0.55 * args.budget_s
            green = executor.execute(schedule, mode="green", iters=args.iters, repeats=args.repeats,
                                     ceilings=ceilings, with_compiled=compiled, compile_mode=args.compile_mode,
                                     progress=say, **device)
            entry["green"] = dataclasses.replace(green, plan_path=str(plan_path)).to_dict()
            shown.append(green)
            if not compiled:
                entry["seq_compiled_skipped"] = "time budget" if not args.no_compiled else "--no-compiled"
            if not args.no_grid and not args.cpu and time.time() - t_start < 0.8 * args.budget_s:
                grid = executor.execute(schedule, mode="grid", iters=args.iters, repeats=args.repeats,
                                        ceilings=ceilings, with_baselines=False, progress=say)
                grid = dataclasses.replace(grid, plan_path=str(plan_path), baselines=green.baselines,
                                           notes=grid.notes + ("baselines: the green run's (same process)",))
                entry["grid"] = grid.to_dict()
                shown.append(grid)
            else:
                entry["grid_skipped"] = "time budget" if not args.no_grid else "--no-grid"
        except Exception as exc:  # noqa: BLE001 - record and go on with the next workload
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()[-3000:]
            print(entry["traceback"], flush=True)
            shown.append({"workload": stem, "error": entry["error"]})
        entry["wall_s"] = round(time.time() - t, 1)
        record["runs"].append(entry)
        if not args.cpu:
            torch.cuda.empty_cache()
        path.write_text(json.dumps(record, indent=1, default=float) + "\n")
        print(f"  [{stem}] done in {entry['wall_s']} s", flush=True)
    record["wall_s"] = round(time.time() - t_start, 1)
    path.write_text(json.dumps(record, indent=1, default=float) + "\n")

    print(f"\nwrote {path}")
    for r in shown:
        if isinstance(r, dict):
            continue
        for note in r.notes:
            print(f"  note [{r.workload} {r.mode}]: {note[:240]}")
        for label, why in r.baseline_failures:
            print(f"  {label} [{r.workload}]: {why}")
    lines = [f"{gpu}, {date:%Y-%m-%d %H:%M} UTC; ceilings {ceilings.gemm_tflops:.0f} TFLOP/s, "
             f"{ceilings.copy_tbps:.2f} TB/s; per-layer ms, median of {args.repeats} repeats x {args.iters} graph "
             "replays (+-% = plan's min-max spread); x = baseline / plan", format_table(shown)]
    for r in shown:
        if isinstance(r, dict) or r.mode != "green":
            continue
        spans = ", ".join(f"{b.label} {b.layer_ms:.3f} [{b.min_layer_ms:.3f}-{b.max_layer_ms:.3f}]"
                          for b in r.baselines)
        lines.append(f"{r.workload}: plan {r.plan.layer_ms:.3f} [{r.plan.min_layer_ms:.3f}-"
                     f"{r.plan.max_layer_ms:.3f}]; {spans}")
    table = "\n".join(lines)
    (out / "table.txt").write_text(table + "\n")
    print("\n" + table)
    return 0


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


if __name__ == "__main__":
    sys.exit(main())
