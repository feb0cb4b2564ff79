#!/usr/bin/env bash
# Calibrate the TP=2 cost model from measured timelines of TP plans (issues 10 + 11), from the CLI:
#   solve W4 on the measured TP=2 profile of this GPU kind, run it with --timeline (every rank traces
#   its CUDA-graph replays; rank 0's timeline is measured.json), run the sequential TP plan the same
#   way, `nfsearch calibrate` on both, re-solve W4 on the calibrated profile and run that plan too.
#   usage: benchmarks/tp_calibrate.sh OUT_DIR [PROFILE]   (2 GPUs of one host, H100 or H200; about 3 minutes)
#   PROFILE: a measured TP=2 profile of this GPU kind (default: the stored one of 2026-11-27 for it)
#   writes OUT_DIR/summary.json (every run's numbers) and prints a table last.
set -u
OUT=${1:?usage: benchmarks/tp_calibrate.sh OUT_DIR}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
R=benchmarks/results/tp_2026-11-27
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name(0))")
case "$GPU" in
  *H200*) P=$R/llama-3-70b-W4-tp2-H200.parquet ;;
  *) P=$R/llama-3-70b-W4-tp2.parquet ;;
esac
P=${2:-$P}
echo "GPU: $GPU; profile: $P" | tee "$OUT/gpu.txt"; nvidia-smi -L >> "$OUT/gpu.txt" 2>&1
S=$OUT/steps.txt; : > "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n rc=$? $(( $(date +%s) - t ))s" >> "$S"; }
N="python3 -m nfsearch"
step solve 60 $N solve --model llama-3-70b --workload W4 --profile "$P" --layers 2 --time-limit 5 \
    -o "$OUT/plan.json" > "$OUT/solve.log" 2>&1
step seq-plan 30 python3 - "$P" "$OUT/seq.json" > "$OUT/seq-plan.log" 2>&1 <<'EOF'
import sys
from nfsearch import plan
from nfsearch.cost import make_problem
from nfsearch.profile import load
from nfsearch.search.baselines import sequential_plan
from nfsearch.specs import load_model, load_workload
problem = make_problem(load_model("llama-3-70b"), load_workload("W4"), load(sys.argv[1]), 2)
plan.write(sequential_plan(problem), sys.argv[2])
EOF
step run-plan 100 $N run --schedule "$OUT/plan.json" --timeline --iters 10 --out "$OUT/run" > "$OUT/run.log" 2>&1
step run-seq 100 $N run --schedule "$OUT/seq.json" --timeline --iters 10 --out "$OUT/seq_run" > "$OUT/seq_run.log" 2>&1
step calibrate 60 $N calibrate --profile "$P" --run "$OUT/plan.json" "$OUT/run/measured.json" \
    --run "$OUT/seq.json" "$OUT/seq_run/measured.json" -o "$OUT/cal.parquet" > "$OUT/calibrate.log" 2>&1
step solve-cal 60 $N solve --model llama-3-70b --workload W4 --profile "$OUT/cal.parquet" --layers 2 --time-limit 5 \
    -o "$OUT/plan_cal.json" > "$OUT/solve_cal.log" 2>&1
step run-cal 100 $N run --schedule "$OUT/plan_cal.json" --timeline --iters 10 --out "$OUT/cal_run" > "$OUT/cal_run.log" 2>&1
for f in solve.log run.log seq_run.log cal_run.log solve_cal.log; do echo "== $f"; tail -n 4 "$OUT/$f"; done
echo "== calibrate.log"; cat "$OUT/calibrate.log"
python3 - "$OUT" "$GPU" "$P" <<'EOF'
import json, sys
from pathlib import Path
out, gpu, profile = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rows, summary = [], {"gpu": gpu, "profile": profile,
                     "steps": (out / "steps.txt").read_text().split("\n")[:-1], "runs": {}}
for name, run in (("solved", "run"), ("sequential", "seq_run"), ("solved-on-cal", "cal_run")):
    path = out / run / "run.json"
    if not path.is_file():
        summary["runs"][name] = {"error": f"no {path}"}
        rows.append(f"{name:<14} no run.json (see {run}.log)")
        continue
    r = json.loads(path.read_text())
    b = r.get("baselines", {})
    get = lambda k: b.get(k, {}).get("layer_ms")
    t = r.get("trace", {})
    summary["runs"][name] = {
        "measured_layer_ms": r.get("measured_layer_ms"), "predicted_layer_ms": r.get("predicted_layer_ms"),
        "prediction_error": r.get("prediction_error"), "seq_same_layer_ms": get("seq_same"),
        "seq_torch_layer_ms": get("seq_torch"), "spread_ms": r.get("plan_run", {}).get("spread_ms"),
        "correct": r.get("correctness", {}).get("passed"), "has_timeline": (out / run / "measured.json").is_file(),
        "trace": t, "gpus": r.get("gpus"), "plan_profile": r.get("plan_profile"),
        "notes": [n for n in r.get("notes", []) if n.startswith("timeline")]}
    s = summary["runs"][name]
    f = lambda v: "-" if v is None else f"{v:.3f}"
    rows.append(f"{name:<14}{f(s['measured_layer_ms']):>10}{f(s['predicted_layer_ms']):>11}"
                f"{f(s['seq_same_layer_ms']):>10}{f(s['seq_torch_layer_ms']):>11}"
                f"{'yes' if s['has_timeline'] else 'NO':>10}{f(t.get('rank_skew_ms')):>10}")
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
print("\n".join(summary["steps"]))
print(f"W4 TP=2 on {gpu} (ms/layer; profile {Path(profile).name})")
print(f"{'plan':<14}{'measured':>10}{'predicted':>11}{'seq-same':>10}{'seq-torch':>11}{'timeline':>10}{'skew':>10}")
print("\n".join(rows))
EOF
