"""Tensor-parallel plans on one multi-GPU host: run several plans end to end, or time the all-reduce.

    # run plans (one process per GPU each, NCCL, NCCL_NVLS_ENABLE=0), correctness vs TP=1, timings
    python benchmarks/run_tp.py run PLAN.json [PLAN.json ...] --impls plan fast torch --out DIR

    # all-reduce of [tokens, 8192] bf16 by message size and NCCL CTA limit (0 = NCCL's default)
    python benchmarks/run_tp.py net --out DIR

`run`: each plan (and each --impls choice: `plan` runs the impls the plan names, `fast` the fastest
kernels inside a share, `torch` the library ones) through nfsearch.runtime.tp.run_plan; one JSON with
the GPU names, date, command, and per run: measured layer time (median of --repeats medians of --iters
CUDA-graph replays, with the spread), predicted time, the roofline bound with its network term
(measured GEMM peak, copy bandwidth and NCCL bus bandwidth of this run), sequential TP baselines
(seq-torch and seq-same, collectives on their one stream). A run that fails is recorded with its
error; the others still run.

`net`: rank 0 writes DIR/allreduce_tp<N>_<gpu>.json (time and bus bandwidth per message size and CTA
limit) and prints one line per row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(args) -> None:
    import torch

    from nfsearch.errors import NfsearchError
    from nfsearch.runtime import tp
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    result = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "gpus": names,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "env": {k: os.environ.get(k) for k in tp.coll_mod.SAFE_ENV},
              "runs": []}
    tag = (names[0] if names else "cpu").replace(" ", "_")
    path = out_dir / f"run_tp_{tag}_{datetime.date.today().isoformat()}.json"
    for plan_path in args.plans:
        for impls in args.impls:
            t0 = time.time()
            print(f"== {plan_path} impls={impls}", flush=True)
            try:
                report = tp.run_plan(plan_path, impls=impls, iters=args.iters, repeats=args.repeats,
                                     mode=args.mode, progress=lambda m: print(m, flush=True))
                report = {"plan": str(plan_path), "impls_choice": impls, **report}
            except NfsearchError as exc:
                report = {"plan": str(plan_path), "impls_choice": impls, "error": str(exc)}
            report["wall_s"] = round(time.time() - t0, 1)
            result["runs"].append(report)
            print(tp.format_line(report), flush=True)
            path.write_text(json.dumps(result, indent=1, default=str))     # after every run: a kill keeps it
    print(f"wrote {path}")


def net(args) -> None:
    """All-reduce times by message size and NCCL CTA limit on this host's GPUs (one JSON)."""
    import torch

    from nfsearch.runtime import tp
    n = args.gpus or torch.cuda.device_count()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"allreduce_tp{n}_{torch.cuda.get_device_name(0).replace(' ', '_')}.json"
    tp.spawn_ranks(tp.net_table_worker, n, "nccl", (str(path), args.hidden, args.tokens, args.ctas))
    data = json.loads(path.read_text())
    data.update(command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    path.write_text(json.dumps(data, indent=1))
    for r in data["rows"]:
        print(f"TP={n} {r['num_tokens']:>5} tokens, CTA limit {r['cta_limit'] or 'default':>7}"
              f"{'' if r['is_limit_applied'] else ' (not applied)'}: {r['time_ms']:.4f} ms, {r['bus_gbps']:.0f} GB/s")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("plans", nargs="+")
    r.add_argument("--impls", nargs="+", default=["fast"], choices=["plan", "fast", "torch"])
    r.add_argument("--iters", type=int, default=20)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--mode", choices=["green", "grid"], default="green")
    r.add_argument("--out", default="out/run_tp")
    n = sub.add_parser("net")
    n.add_argument("--gpus", type=int, default=0, help="processes (default: every GPU)")
    n.add_argument("--hidden", type=int, default=8192)
    n.add_argument("--tokens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    n.add_argument("--ctas", type=int, nargs="+", default=[0, 8, 16, 24, 32])
    n.add_argument("--out", default="out/run_tp")
    args = ap.parse_args()
    {"run": run, "net": net}[args.cmd](args)


if __name__ == "__main__":
    main()
