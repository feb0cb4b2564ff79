"""Run the W1-W3 plans on one GPU in one process: correctness, measured layer time, % of the
measured roofline bound, speedup over seq-torch and seq-same, prediction error.

    PYTHONPATH=. python benchmarks/run_workloads.py [--plans benchmarks/plans] [--out $OUT]
        [--only W1,W2] [--extra W2-split] [--iters 30]

Each plan benchmarks/plans/<W>.json runs in grid mode (plain streams, SM-bounded grids; with the
seq-torch and seq-same baselines) and then in green mode (an SM partition per launch; its eager
per-op timeline is measured too). Both are checked against the sequential reference. The table
shows grid mode; the green-mode line follows. Ceilings are measured once per process. Writes <out>/run_<gpu>.json (with the measured
eager per-op timelines embedded) and prints a short table last.
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--extra", default="", help="more plan stems to run, comma separated")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-green", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from nfsearch import plan
    from nfsearch.timeline import timeline_to_dict
    from nfsearch.runtime import bench, executor

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0)
    t0 = time.time()
    ceilings = bench.ceilings()
    print(f"{gpu}: GEMM {ceilings['gemm_tflops']:.0f} TFLOP/s, copy {ceilings['copy_tbps']:.2f} TB/s "
          f"({time.time() - t0:.1f} s)", flush=True)
    record = {"gpu": gpu, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(["python"] + sys.argv), "ceilings": ceilings, "runs": []}
    stems = [s for s in args.only.split(",") if s] + [s for s in args.extra.split(",") if s]
    reports = []
    for stem in stems:
        path = Path(args.plans) / f"{stem}.json"
        t = time.time()
        try:
            schedule = plan.read(path)
            say = (lambda m, stem=stem: print(f"  [{stem}] {m}", flush=True))
            # grid mode first (plain streams: capture is safe), with the baselines; then green mode
            report, _ = executor.execute(schedule, mode="grid", iters=args.iters, ceilings=ceilings,
                                         with_ceilings=False, progress=say)
            partial = any(o.sm_count < schedule.gpu.num_sms for o in schedule.nano_ops)
            if not args.no_green and partial:
                try:
                    green, tl = executor.execute(schedule, mode="green", iters=args.iters, timeline=True,
                                                 with_baselines=False, with_ceilings=False, ceilings=ceilings,
                                                 progress=say)
                    report["green_mode"] = {k: green.get(k) for k in (
                        "measured_layer_ms", "plan_run", "pct_of_bound", "prediction_error", "correctness",
                        "notes", "mode", "timeline_layer_ms_eager")}
                    report["timeline"] = timeline_to_dict(tl) if tl is not None else None
                except Exception as exc:  # noqa: BLE001 - keep the grid-mode numbers
                    report["green_mode"] = {"error": f"{type(exc).__name__}: {exc}",
                                            "traceback": traceback.format_exc()[-2000:]}
                    print(report["green_mode"]["traceback"], flush=True)
            report["best_mode"] = _best_mode(report)
        except Exception as exc:  # noqa: BLE001 - record and go on with the next workload
            report = {"workload": stem, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-3000:]}
            print(report["traceback"], flush=True)
        report["plan_path"] = str(path)
        report["stem"] = stem
        report["wall_s"] = round(time.time() - t, 1)
        reports.append(report)
        record["runs"].append(report)
        torch.cuda.empty_cache()
        (out / f"run_{_slug(gpu)}.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
        print(f"  [{stem}] done in {report['wall_s']} s", flush=True)

    print()
    print(executor.format_table(reports))
    for r in reports:
        g = r.get("green_mode") or {}
        if g.get("measured_layer_ms"):
            base = r["baselines"]
            print(f"{r['stem']}: green mode {g['measured_layer_ms']:.3f} ms/layer ({g['plan_run']['how']}, "
                  f"x{base['seq_torch']['layer_ms'] / g['measured_layer_ms']:.2f} seq-torch, "
                  f"x{base['seq_same']['layer_ms'] / g['measured_layer_ms']:.2f} seq-same) vs grid "
                  f"{r['measured_layer_ms']:.3f} ({r['plan_run']['how']}); best: {r['best_mode']}")
        if r.get("notes") or g.get("notes"):
            print(f"  notes: {'; '.join((r.get('notes') or []) + (g.get('notes') or []))[:300]}")
    return 0


def _best_mode(report: dict) -> str:
    green = (report.get("green_mode") or {}).get("measured_layer_ms")
    return "green" if green and green < report["measured_layer_ms"] else "grid"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


if __name__ == "__main__":
    sys.exit(main())
