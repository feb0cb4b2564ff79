#!/usr/bin/env bash
# The GPU paths the CPU tests cannot reach, on one GPU, after a refactor: the GPU-marked tests, a quick
# profile with its pair table (profiler._pair: pairs launched together on every split), and
# `nfsearch tune` on W2 (solve, run each candidate, keep the fastest correct).
#   usage: bash benchmarks/gpu_check.sh OUT_DIR        (one GPU; under 10 minutes)
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}; mkdir -p "$OUT"
P="python3 -m nfsearch"
S=$OUT/steps.txt; : > "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n rc=$? $(( $(date +%s) - t ))s" >> "$S"; }
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
step gpu_tests 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu tests/test_power.py \
    tests/test_tp_profile.py > "$OUT/gpu_tests.txt" 2>&1
step profile_pairs 200 $P profile --model llama-3-8b --workload W2 --quick --no-energy -o "$OUT/quick.parquet" \
    > "$OUT/profile.txt" 2> "$OUT/profile.log"
step analyze_pairs 30 $P analyze --pairs "$OUT/quick.parquet" --json "$OUT/pairs.json" > "$OUT/pairs.txt" 2>&1
mkdir -p "$OUT/tune"; step tune_W2 150 $P tune --workload W2 -k 3 --iters 10 --time-limit 5 -o "$OUT/tune/best.json" > "$OUT/tune.txt" 2>&1
cat "$S"; cat "$OUT/gpu.txt"; tail -n 3 "$OUT/gpu_tests.txt"; tail -n 4 "$OUT/profile.log"; tail -n 12 "$OUT/pairs.txt"
tail -n 8 "$OUT/tune.txt"
