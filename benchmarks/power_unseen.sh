#!/usr/bin/env bash
# The power bound judged on models it was not fitted on (issue 10): energy of Qwen2-7B's and
# Mistral-7B-v0.1's ops added to their measured H100 profiles (profile --energy-only), the llama-3-8b
# calibration carried over (calibrate --from: timeline factors and the energy factor, fitted on
# llama-3-8b W1-W3 only), then their stored W2 plans run with it. Prints a table last.
#   usage: bash benchmarks/power_unseen.sh OUT_DIR        (one H100 80GB HBM3; ~3 minutes)
set -u
OUT=$1; mkdir -p "$OUT"
P="python3 -m nfsearch"
S=$OUT/steps.txt; : > "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n $? $(( $(date +%s) - t ))" >> "$S"; }
config() { case "$1" in Qwen2-7B) echo benchmarks/models/Qwen2-7B/config.json ;;
                        *) echo tests/fixtures/hf/Mistral-7B-v0.1/config.json ;; esac; }
for M in Qwen2-7B Mistral-7B-v0.1; do
    step "energy_$M" 150 $P profile --model "$(config $M)" --workload W2 \
        --energy-only "benchmarks/results/unseen_profiles/$M.calibrated.parquet" -o "$OUT/$M.energy.parquet" \
        > "$OUT/energy-$M.txt" 2>&1
    step "carry_$M" 30 $P calibrate --profile "$OUT/$M.energy.parquet" --from profiles/h100-sxm/llama-3-8b.parquet \
        -o "$OUT/$M.cal.parquet" > "$OUT/carry-$M.txt" 2>&1
    step "run_$M" 200 $P run --schedule "benchmarks/plans/unseen/$M-W2.json" --profile "$OUT/$M.cal.parquet" \
        --out "$OUT/run-$M" > "$OUT/run-$M.txt" 2> "$OUT/run-$M.log"
done
cat "$S"
for M in Qwen2-7B Mistral-7B-v0.1; do tail -n 3 "$OUT/energy-$M.txt"; cat "$OUT/carry-$M.txt"; tail -n 4 "$OUT/run-$M.txt"; done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from nfsearch.runreport import RunReport
out, rows = Path(sys.argv[1]), {}
print(f"{'model (W2)':<18}{'measured':>9}{'replay':>8}{'err':>8}{'bound':>8}{'pred':>8}{'err':>8}{'seq-same':>9}{'x':>6}  capped")
for m in ("Qwen2-7B", "Mistral-7B-v0.1"):
    p = out / f"run-{m}" / "run.json"
    if not p.is_file():
        print(f"{m:<18} no run report")
        continue
    r = RunReport.from_dict(json.loads(p.read_text()), str(p))
    meas, pred = r.measured_layer_ms, r.predicted_layer_ms
    rep = r.replay_layer_ms or pred
    bound = None if r.power_bound is None else r.power_bound.bound_ms
    same = None if r.baseline("seq-same") is None else r.baseline("seq-same").layer_ms
    capped = None if r.power is None else r.power.is_power_capped
    rows[m] = {"measured_layer_ms": meas, "replay_layer_ms": rep, "power_bound_ms": bound, "predicted_layer_ms": pred,
               "error_replay": (rep - meas) / meas, "error_predicted": (pred - meas) / meas, "seq_same_layer_ms": same,
               "is_power_capped": capped, "power": None if r.power is None else r.power.to_dict(),
               "energy_ratio": r.energy_ratio}
    f = lambda v: "-" if v is None else f"{v:.3f}"
    print(f"{m:<18}{meas:>9.3f}{rep:>8.3f}{(rep - meas) / meas:>+8.1%}{f(bound):>8}{pred:>8.3f}{(pred - meas) / meas:>+8.1%}"
          f"{f(same):>9}{(same / meas if same else float('nan')):>6.2f}  {capped}")
(out / "summary.json").write_text(json.dumps({"gpu_name": "NVIDIA H100 80GB HBM3", "date": "2026-11-27",
                                              "command": "bash benchmarks/power_unseen.sh $OUT", "runs": rows},
                                             indent=1, default=str))
PY
