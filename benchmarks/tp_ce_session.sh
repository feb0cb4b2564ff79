#!/usr/bin/env bash
# W4 (llama-3-70b, TP=2) with the copy-engine all-reduce as a collective impl the search may choose:
#   profile --tp 2 measuring nccl and ce collectives (alone and beside every GEMM), analyze --pairs,
#   then benchmarks/tp_calibrate.sh on that profile (solve, run the plan and the sequential plan with
#   timelines, calibrate, re-solve, run again), the plan solved with --min-gain 0 (the search's
#   best overlapped plan even where it predicts under 2% gain), run beside them, and `nfsearch tune` on
#   the measured profile (the solved plan and the hand-made baselines run, the fastest correct kept).
#   usage: benchmarks/tp_ce_session.sh OUT_DIR     (2 GPUs of one host; about 6 minutes)
set -u
OUT=${1:?usage: benchmarks/tp_ce_session.sh OUT_DIR}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
N="python3 -m nfsearch"
S=$OUT/steps.txt; : > "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n rc=$? $(( $(date +%s) - t ))s" >> "$S"; }
step profile 240 $N profile --model llama-3-70b --workload W4 --quick --net-impls nccl,ce -o "$OUT/x.parquet" \
    2> "$OUT/profile.log"
step analyze 30 $N analyze --pairs "$OUT/x.parquet" --tp 2 --json "$OUT/pairs.json" > "$OUT/pairs.txt" 2>&1
step solve-any 60 $N solve --model llama-3-70b --workload W4 --profile "$OUT/x.parquet" --layers 2 --time-limit 5 \
    --min-gain 0 -o "$OUT/plan_any.json" > "$OUT/solve_any.log" 2>&1
step run-any 100 $N run --schedule "$OUT/plan_any.json" --iters 10 --out "$OUT/any_run" > "$OUT/any_run.log" 2>&1
bash benchmarks/tp_calibrate.sh "$OUT/cal" "$OUT/x.parquet" > "$OUT/calibrate_session.txt" 2>&1
step tune 300 $N tune --model llama-3-70b --workload W4 --profile "$OUT/x.parquet" --layers 2 --time-limit 5 -k 3 \
    --iters 10 -o "$OUT/tuned.json" > "$OUT/tune.txt" 2>&1
cat "$S"; tail -n 8 "$OUT/profile.log"; tail -n 30 "$OUT/pairs.txt"; tail -n 3 "$OUT/solve_any.log" "$OUT/any_run.log"
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name, path in (("min-gain 0", out / "any_run" / "run.json"), ("solved", out / "cal" / "run" / "run.json"),
                   ("sequential", out / "cal" / "seq_run" / "run.json"), ("solved-on-cal", out / "cal" / "cal_run" / "run.json")):
    if not path.is_file():
        print(f"{name:<14} no {path}"); continue
    r = json.loads(path.read_text()); b = r.get("baselines", {})
    impls = r.get("plan_run", {}).get("impls", {})
    print(f"{name:<14} measured {r.get('measured_layer_ms')} predicted {r.get('predicted_layer_ms')} "
          f"seq-same {b.get('seq_same', {}).get('layer_ms')} seq-torch {b.get('seq_torch', {}).get('layer_ms')} "
          f"spread {r.get('plan_run', {}).get('spread_ms')} ar impls {impls.get('allreduce_o')}/{impls.get('allreduce_d')} "
          f"correct {r.get('correctness', {}).get('passed')}")
PY
tail -n 8 "$OUT/calibrate_session.txt"
echo "== tune"; tail -n 5 "$OUT/tune.txt"
