#!/usr/bin/env bash
# W4 (llama-3-70b, TP=2) on the TP profile measured earlier on 2x H100: `nfsearch tune` runs the solved plan
# and the hand-made baselines, one process per GPU each, and keeps the fastest measured; then PLAN (the plan
# solved on that profile) with --timeline (per-op spans of the graph replays) and `compare`, to see where its
# time goes against the replay.
#   usage: bash benchmarks/tp_tune_session.sh PROFILE PLAN OUT_DIR      (2 GPUs of one host; about 4 minutes)
set -u
X=${1:?usage: bash benchmarks/tp_tune_session.sh PROFILE PLAN OUT_DIR}; PLAN=${2:?usage: ... PROFILE PLAN OUT_DIR}
OUT=${3:?usage: ... PROFILE PLAN OUT_DIR}
mkdir -p "$OUT/tune"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
N="python3 -m nfsearch"
S=$OUT/steps.txt; : > "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n $? $(( $(date +%s) - t ))" >> "$S"; }
nvidia-smi --query-gpu=index,name,power.limit,clocks.max.sm,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
step tune 300 $N tune --workload W4 --profile "$X" -k 3 --iters 20 --time-limit 5 -o "$OUT/tune/best.json" \
    > "$OUT/tune.txt" 2>&1
step timeline 150 $N run --schedule "$PLAN" --profile "$X" --timeline --out "$OUT/timeline" \
    > "$OUT/timeline.txt" 2> "$OUT/timeline.log"
[ -f "$OUT/timeline/measured.json" ] && step compare 60 $N compare "$PLAN" "$OUT/timeline/measured.json" \
    --worst 12 -o "$OUT/compare.json" > "$OUT/compare.txt" 2>&1
cat "$S"; tail -n 14 "$OUT/tune.txt"; tail -n 6 "$OUT/timeline.txt"; tail -n 25 "$OUT/compare.txt" 2> /dev/null
