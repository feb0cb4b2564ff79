#!/usr/bin/env bash
# The energy of overlap on one GPU: the GPU tests of the profiler and executor, then each pair family's
# energy at its best split against back to back (profile --energy-only, which re-measures the ops'
# energy too) for the bundled profile (W2's pair sizes) and W3's quick profile (its own sizes), then
# `tune` on W2 and W3 (solved, sequential and equal-split plans, each one's energy per layer in its run)
# so the plan energies and the pair energies come from one board.
#   usage: bash benchmarks/pair_energy_session.sh OUT_DIR [tests|energy|tune ...]   (one GPU)
set -u
OUT=${1:?usage: bash benchmarks/pair_energy_session.sh OUT_DIR [tests|energy|tune ...]}; shift
PARTS=${*:-tests energy tune}
mkdir -p "$OUT"
N="python3 -m nfsearch"
S=$OUT/steps.txt; touch "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n rc=$? $(( $(date +%s) - t ))s" >> "$S"; }
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version,serial --format=csv > "$OUT/gpu.txt" 2>&1
for part in $PARTS; do
  case $part in
    tests)
      step gpu_tests 280 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_profiler.py \
          tests/gpu/test_executor.py > "$OUT/gpu_tests.txt" 2>&1 ;;
    energy)
      step energy_W2 240 $N profile --energy-only profiles/h100-sxm/llama-3-8b.parquet --model llama-3-8b \
          --workload W2 -o "$OUT/bundled.parquet" > "$OUT/energy_W2.txt" 2> "$OUT/energy_W2.log"
      step energy_W3 240 $N profile --energy-only benchmarks/results/w3_pairs_2026-11-27/q.cal.parquet \
          --model llama-3-8b --workload W3 -o "$OUT/w3.parquet" > "$OUT/energy_W3.txt" 2> "$OUT/energy_W3.log" ;;
    tune)
      for w in W2 W3; do
        mkdir -p "$OUT/tune_$w"
        step "tune_$w" 280 $N tune --workload $w -k 3 --iters 20 --time-limit 5 -o "$OUT/tune_$w/best.json" \
            > "$OUT/tune_$w/tune.txt" 2>&1
      done ;;
  esac
done
cat "$S"; cat "$OUT/gpu.txt"
[ -f "$OUT/gpu_tests.txt" ] && tail -n 3 "$OUT/gpu_tests.txt"
for f in "$OUT"/energy_W*.log; do [ -f "$f" ] && grep -c "pair energy" "$f" && tail -n 2 "$f"; done
for w in W2 W3; do [ -f "$OUT/tune_$w/tune.txt" ] && tail -n 6 "$OUT/tune_$w/tune.txt"; done
