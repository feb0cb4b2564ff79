#!/usr/bin/env bash
# The plan's own power bound (overlaps priced by measured pair energies) judged where it was not fitted:
#   unseen: Qwen2-7B and Mistral-7B-v0.1 at W2 (never calibrated on): their measured H100 profiles get
#           energy and pair energy (profile --energy-only), the bundled llama-3-8b calibration and
#           energy factor carried (calibrate --from), then three plans solved on the GPU host (the
#           default solve, the overlapped plan --min-gain 0, the sequential plan --min-gain 0.99)
#           timed against each other by `tune --plans` (each one's prediction in its report)
#   llama:  W2 and W3 the same way with the bundled profile (its pair energies were measured on
#           another board: this judges the board too)
#   usage: bash benchmarks/pair_energy_unseen.sh OUT_DIR [unseen|llama|tests ...]   (one H100)
set -u
OUT=${1:?usage: bash benchmarks/pair_energy_unseen.sh OUT_DIR [unseen|llama|tests ...]}; shift
PARTS=${*:-unseen llama}
mkdir -p "$OUT"
N="python3 -m nfsearch"
S=$OUT/steps.txt; touch "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n rc=$? $(( $(date +%s) - t ))s" >> "$S"; }
config() { case "$1" in Qwen2-7B) echo benchmarks/models/Qwen2-7B/config.json ;;
                        *) echo tests/fixtures/hf/Mistral-7B-v0.1/config.json ;; esac; }
three_plans() {   # name model workload profile (plans already in OUT/name/plans: only tune)
  local d=$OUT/$1; mkdir -p "$d/plans"
  if [ -f "$d/plans/a_solved.json" ]; then
    step "tune_$1" 200 $N tune --model "$2" --workload "$3" --plans "$d/plans" --profile "$4" -k 3 --iters 20 -o "$d/best.json" > "$d/tune.txt" 2>&1
    return
  fi
  step "solve_$1" 60 $N solve --model "$2" --workload "$3" --profile "$4" --time-limit 5 -o "$d/plans/a_solved.json" > "$d/solve.txt" 2>&1
  step "overlapped_$1" 60 $N solve --model "$2" --workload "$3" --profile "$4" --time-limit 5 --min-gain 0 -o "$d/plans/b_overlapped.json" > "$d/overlapped.txt" 2>&1
  step "sequential_$1" 60 $N solve --model "$2" --workload "$3" --profile "$4" --min-gain 0.99 -o "$d/plans/c_sequential.json" > "$d/sequential.txt" 2>&1
  step "tune_$1" 200 $N tune --model "$2" --workload "$3" --plans "$d/plans" --profile "$4" -k 3 --iters 20 -o "$d/best.json" > "$d/tune.txt" 2>&1
}
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version,serial --format=csv > "$OUT/gpu.txt" 2>&1
for part in $PARTS; do
  case $part in
    tests)
      step gpu_tests 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_profiler.py > "$OUT/gpu_tests.txt" 2>&1 ;;
    unseen)
      for M in Qwen2-7B Mistral-7B-v0.1; do
        [ -f "$OUT/$M.cal.parquet" ] || step "energy_$M" 200 $N profile --model "$(config $M)" --workload W2 \
            --energy-only "benchmarks/results/unseen_profiles/$M.calibrated.parquet" -o "$OUT/$M.energy.parquet" \
            > "$OUT/energy-$M.txt" 2> "$OUT/energy-$M.log"
        [ -f "$OUT/$M.cal.parquet" ] || step "carry_$M" 30 $N calibrate --profile "$OUT/$M.energy.parquet" --from profiles/h100-sxm/llama-3-8b.parquet \
            -o "$OUT/$M.cal.parquet" > "$OUT/carry-$M.txt" 2>&1
        three_plans "$M" "$(config $M)" W2 "$OUT/$M.cal.parquet"
      done ;;
    llama)
      for W in W2 W3; do three_plans "llama-$W" llama-3-8b $W profiles/h100-sxm/llama-3-8b.parquet; done ;;
  esac
done
cat "$S"; cat "$OUT/gpu.txt"
[ -f "$OUT/gpu_tests.txt" ] && tail -n 2 "$OUT/gpu_tests.txt"
for d in "$OUT"/*/; do [ -f "$d/tune.txt" ] && { echo "== $d"; grep -E "^wrote|margin" "$d/solve.txt" | tail -2; grep -E "chosen by" "$d/tune.txt"; }; done
