#!/usr/bin/env bash
# W3 (llama-3-8b prefill4096) with its own batch in the pair table (measurements.pair_sizes: 256 decode
# requests at context 2048, 15 prompts of 256, GEMMs from 256 tokens), on one GPU:
#   1. profile --quick --workload W3 (energy included): the pairs the bundled table lacks for W3
#   2. calibrate --from the bundled calibrated profile (kernel and wait factors of this GPU kind)
#   3. solve W3 on it; the sequential plan on it (--min-gain 0.99 keeps sequential)
#   4. tune --plans: that plan, the bundled W3 plan and the sequential plan, timed in one process each
#      with seq-torch / seq-same beside the first (the bundled plan's profile is another: --force)
#   usage: bash benchmarks/w3_pairs_session.sh OUT_DIR        (one GPU; about 5 minutes)
set -u
OUT=${1:?usage: bash benchmarks/w3_pairs_session.sh OUT_DIR}; mkdir -p "$OUT/plans" "$OUT/tune"
N="python3 -m nfsearch"
S=$OUT/steps.txt; : > "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n $? $(( $(date +%s) - t ))" >> "$S"; }
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
step profile 240 $N profile --model llama-3-8b --workload W3 --quick -o "$OUT/q.parquet" > "$OUT/profile.txt" 2> "$OUT/profile.log"
step pairs 30 $N analyze --pairs "$OUT/q.parquet" --json "$OUT/pairs.json" > "$OUT/pairs.txt" 2>&1
step carry 30 $N calibrate --profile "$OUT/q.parquet" --from profiles/h100-sxm/llama-3-8b.parquet \
    -o "$OUT/q.cal.parquet" > "$OUT/carry.txt" 2>&1
step solve 60 $N solve --workload W3 --profile "$OUT/q.cal.parquet" --time-limit 8 -o "$OUT/plans/a_w3pairs.json" \
    > "$OUT/solve.txt" 2>&1
step sequential 60 $N solve --workload W3 --profile "$OUT/q.cal.parquet" --min-gain 0.99 \
    -o "$OUT/plans/c_sequential.json" > "$OUT/solve_seq.txt" 2>&1
cp benchmarks/plans/W3.json "$OUT/plans/b_bundled.json"
step tune 300 $N tune --workload W3 --plans "$OUT/plans" -k 3 --iters 20 --force -o "$OUT/tune/best.json" \
    > "$OUT/tune.txt" 2>&1
cat "$S"; tail -n 3 "$OUT/profile.log"; tail -n 6 "$OUT/pairs.txt"; tail -n 2 "$OUT/solve.txt"; tail -n 1 "$OUT/solve_seq.txt"
tail -n 12 "$OUT/tune.txt"
