"""Judge the cost model on models it was never calibrated on: for each HF config, on the GPU,
profile (CLI, pairs included), solve W2 (CLI, CP-SAT), then run the plan beside seq-same and
seq-torch (executor API: median of >= 3 interleaved repeats with the min-max spread, and the
per-op timeline from a kernel trace of CUDA-graph replays), all in one process tree.

    PYTHONPATH=. python benchmarks/run_unseen.py [--models A/config.json,B/config.json] [--out $OUT]
        [--grid auto|full|quick] [--budget-s 420] [--repeats 3] [--iters 20]

The calibration fitted on llama-3-8b W1-W3 (the bundled profile's, `--calibration-from`) is carried
to each model's fresh profile (`nfsearch calibrate --from`) before the solve: the models are never
calibrated on, the GPU and its kernels are (`--calibration-from ''` solves uncalibrated).

Defaults: a Qwen2-7B config (qkv bias; benchmarks/models/Qwen2-7B/config.json) and Mistral-7B-v0.1
(tests/fixtures/hf; sliding window 4096, longer than W2's context of 1024, so it changes nothing).
Writes <out>/unseen_<gpu>_<date>.json (GPU name, date, command, per model: profile and solve
commands and wall times, the run report, prediction errors) after every model, each model's
profile, plan and measured.json under <out>/unseen/, and prints a short table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = (str(ROOT / "benchmarks/models/Qwen2-7B/config.json"),
                  str(ROOT / "tests/fixtures/hf/Mistral-7B-v0.1/config.json"))
WORKLOAD = "W2"
FULL_MODEL_S = 210          # profile (full grid, pairs) + solve + run of one 7B model on an H100, with margin
QUICK_MODEL_S = 110


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated HF config.json paths")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for the JSON and artifacts")
    ap.add_argument("--grid", choices=("auto", "full", "quick"), default="auto",
                    help="profile grid; auto: the full grid (~110 s a model on an H100) while the budget leaves "
                         f"{FULL_MODEL_S} s for this model and {QUICK_MODEL_S} s for each one after it, else --quick")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help=f"wall seconds; a model is not started with less than {QUICK_MODEL_S} s left")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--calibration-from", default=str(ROOT / "profiles/h100-sxm/llama-3-8b.parquet"),
                    help="calibrated profile whose calibration each model's profile gets ('' for none)")
    ap.add_argument("--run-plan", nargs=4, metavar=("PLAN", "PROFILE", "CEILINGS", "REPORT"),
                    help="(internal) run one plan in this process and write its RunReport JSON")
    args = ap.parse_args(argv)
    if args.run_plan:
        return _run_plan(*args.run_plan, iters=args.iters, repeats=args.repeats)
    if args.repeats < 3:
        ap.error("--repeats must be >= 3 (median and spread of at least three)")

    import torch

    from nfsearch import plan
    from nfsearch.compare import compare
    from nfsearch.runreport import Ceilings, RunReport
    from nfsearch.runtime import bench
    from nfsearch.simulate import stated_timeline
    from nfsearch.timeline import timeline_to_dict

    t_start = time.time()
    out = Path(args.out)
    art = out / "unseen"
    art.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0)
    date = datetime.datetime.now(datetime.timezone.utc)
    got = bench.ceilings()
    ceilings = got if isinstance(got, Ceilings) else Ceilings.from_dict(got)
    torch.cuda.empty_cache()            # the children need the memory, not this process
    print(f"{gpu}: GEMM {ceilings.gemm_tflops:.0f} TFLOP/s, copy {ceilings.copy_tbps:.2f} TB/s", flush=True)
    record = {"gpu": gpu, "date": date.isoformat(timespec="seconds"), "command": " ".join(["python"] + sys.argv),
              "workload": WORKLOAD, "grid_choice": args.grid,
              "calibrated_on_these_models": False, "calibration_from": args.calibration_from or None,
              "ceilings": ceilings.to_dict(),
              "versions": {"torch": torch.__version__}, "iters": args.iters, "repeats": args.repeats, "models": []}
    path = out / f"unseen_{_slug(gpu)}_{date:%Y-%m-%d}.json"
    rows = []
    models = [m for m in args.models.split(",") if m]
    for cfg in models:
        name = Path(cfg).parent.name
        entry = {"model": name, "config": os.path.relpath(cfg, ROOT)}
        record["models"].append(entry)
        left = args.budget_s - (time.time() - t_start)
        if left < QUICK_MODEL_S:
            entry["skipped"] = f"time budget ({left:.0f} s left)"
            rows.append((name, None, entry["skipped"]))
            continue
        after = len(models) - 1 - models.index(cfg)
        grid = args.grid if args.grid != "auto" else (
            "full" if left >= FULL_MODEL_S + QUICK_MODEL_S * after else "quick")
        entry["profile_grid"] = grid
        prof_path, plan_path = art / f"{name}.parquet", art / f"{name}-W2.json"
        try:
            cmd = [sys.executable, "-m", "nfsearch", "profile", "--model", cfg, "--workload", WORKLOAD,
                   *([] if grid == "full" else ["--quick"]), "-o", str(prof_path)]
            entry["profile"] = _run(cmd, art / f"{name}.profile.log", timeout=left - 60)
            if args.calibration_from:
                measured_path, prof_path = prof_path, art / f"{name}.calibrated.parquet"
                cmd = [sys.executable, "-m", "nfsearch", "calibrate", "--profile", str(measured_path),
                       "--from", args.calibration_from, "-o", str(prof_path)]
                entry["calibrate"] = _run(cmd, art / f"{name}.calibrate.log", timeout=60)
            cmd = [sys.executable, "-m", "nfsearch", "solve", "--model", cfg, "--workload", WORKLOAD,
                   "--profile", str(prof_path), "--solver", "cpsat", "-o", str(plan_path)]
            entry["solve"] = _run(cmd, art / f"{name}.solve.log", timeout=120)
            schedule = plan.read(plan_path)
            entry["predicted_layer_ms"] = schedule.predicted.layer_time_ms
            entry["plan_interference"] = schedule.profile.interference
            # the run in a fresh process: one profiler session per process (CUPTI may record nothing
            # in a second session of the same process)
            ceil_path, report_path = art / "ceilings.json", art / f"{name}-W2.run.json"
            ceil_path.write_text(json.dumps(ceilings.to_dict()))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run-plan", str(plan_path), str(prof_path),
                   str(ceil_path), str(report_path), "--iters", str(args.iters), "--repeats", str(args.repeats)]
            entry["run"] = _run(cmd, art / f"{name}.run.log", timeout=max(args.budget_s - (time.time() - t_start), 60))
            report = RunReport.from_dict(json.loads(report_path.read_text()))
            entry["report"] = report.to_dict()
            if report.timeline is not None:
                (art / f"{name}-W2.measured.json").write_text(json.dumps(timeline_to_dict(report.timeline)) + "\n")
                cmp = compare(stated_timeline(schedule), report.timeline)
                entry["per_op"] = {"median_abs_rel_error": cmp.median_abs_rel_error,
                                   "p90_abs_rel_error": cmp.p90_abs_rel_error,
                                   "timeline_label": report.timeline.label,
                                   "traced_layer_ms": report.timeline.layer_time_ms, "by_op": cmp.by_op()}
            rows.append((name, report, ""))
        except Exception as exc:  # noqa: BLE001 - record and go on with the next model
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            entry["traceback"] = traceback.format_exc()[-3000:]
            print(entry["traceback"], flush=True)
            rows.append((name, None, entry["error"]))
        entry["elapsed_s"] = round(time.time() - t_start, 1)
        path.write_text(json.dumps(record, indent=1, default=float) + "\n")
    record["wall_s"] = round(time.time() - t_start, 1)
    path.write_text(json.dumps(record, indent=1, default=float) + "\n")
    print(f"\nwrote {path}")
    for e in record["models"]:
        for note in (e.get("report") or {}).get("notes", []):
            print(f"  note [{e['model']}]: {note[:200]}")
    print(f"\n{gpu}, {date:%Y-%m-%d %H:%M} UTC, W2; per-layer ms, "
          f"median of {args.repeats} x {args.iters} graph replays [min-max]; x = baseline / plan; "
          "err = (pred - meas) / meas")
    print(f"{'model':<16}{'grid':>6}{'plan':>22}{'pred':>8}{'err':>7}{'seq-same':>22}{'x':>6}{'seq-torch':>22}{'x':>6}"
          f"{'op med err':>11}")
    for name, r, why in rows:
        if r is None:
            print(f"{name:<16} FAILED/SKIPPED: {why[:150]}")
            continue
        e = next(e for e in record["models"] if e["model"] == name)

        def cell(t):
            return f"{t.layer_ms:.3f} [{t.min_layer_ms:.3f}-{t.max_layer_ms:.3f}]" if t is not None else "-"
        same, tor = r.baseline("seq-same"), r.baseline("seq-torch")
        med = e.get("per_op", {}).get("median_abs_rel_error")
        print(f"{name:<16}{e.get('profile_grid', '?'):>6}{cell(r.plan):>22}{r.predicted_layer_ms or float('nan'):>8.3f}"
              f"{(r.prediction_error or float('nan')) * 100:>6.1f}%{cell(same):>22}"
              f"{(r.speedup('seq-same') or float('nan')):>6.2f}{cell(tor):>22}"
              f"{(r.speedup('seq-torch') or float('nan')):>6.2f}"
              f"{(med * 100 if med is not None else float('nan')):>10.1f}%")
    return 0


def _run_plan(plan_path: str, profile_path: str, ceilings_path: str, report_path: str, iters: int,
              repeats: int) -> int:
    """Check and time one plan beside seq-same and seq-torch, with the traced timeline."""
    from nfsearch import plan, profile
    from nfsearch.runreport import Ceilings
    from nfsearch.runtime import executor

    t0 = time.time()
    report = executor.execute(plan.read(plan_path), mode="green", iters=iters, repeats=repeats, with_compiled=False,
                              profile=profile.load(profile_path), timeline=True,
                              ceilings=Ceilings.from_dict(json.loads(Path(ceilings_path).read_text())),
                              progress=lambda m: print(f"  [{time.time() - t0:5.0f}s] {m}", flush=True))
    Path(report_path).write_text(json.dumps(report.to_dict(), default=float) + "\n")
    return 0


def _run(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run one CLI step; its output goes to `log`; raises with the log's tail when it fails."""
    t = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, timeout=max(timeout, 10), cwd=ROOT)
    wall = round(time.time() - t, 1)
    tail = log.read_text()[-1500:]
    shown = " ".join(os.path.relpath(c, ROOT) if c.startswith("/") and os.path.exists(c) else c for c in cmd[1:])
    print(f"  [{wall:6.1f}s] python {shown}: rc {proc.returncode}\n    " + "\n    ".join(tail.strip().splitlines()[-4:]),
          flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:4])} failed (rc {proc.returncode}): {tail[-400:]}")
    return {"command": "python " + shown, "wall_s": wall, "output_tail": tail[-800:]}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


if __name__ == "__main__":
    sys.exit(main())
