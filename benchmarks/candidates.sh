#!/usr/bin/env bash
# Is the prediction right on this GPU, and does overlap pay here? Three candidate plans of one model and
# workload, timed against each other, each scored against its prediction:
#   1. the profile: PROFILE if given; else the bundled table for llama-3-8b at W1-W3; else a quick profile
#      of MODEL at WORKLOAD measured here (`nfsearch profile --quick`, pairs and energy included; under TP
#      on every visible GPU), with the bundled H100 calibration carried where it is the same GPU
#      (`nfsearch calibrate --from`; refused on another GPU, and the profile is then used uncalibrated)
#   2. three plans solved on it: a_solved (the default solve), b_overlapped (--min-gain 0: the best
#      overlapped plan even where it gains under 2%), c_sequential (--min-gain 0.99)
#   3. `nfsearch tune --plans` with the profile: each plan run and checked once (seq-torch, seq-same and
#      seq-compiled timed beside the first), then all three timed against each other in 5 interleaved
#      rounds; every report carries its prediction (max(replay, the plan's power bound))
#   4. benchmarks/score_tune.py on the result: measured against predicted, within 5% or not
#   usage: bash benchmarks/candidates.sh OUT_DIR MODEL WORKLOAD [PROFILE]
#          e.g. bash benchmarks/candidates.sh out/w2 llama-3-8b W2
#               bash benchmarks/candidates.sh out/qwen benchmarks/models/Qwen2-7B/config.json W2
#               bash benchmarks/candidates.sh out/w4 llama-3-70b W4          (2 GPUs of one host)
#   About 3 minutes with a given profile, 5-8 more when it profiles (one H100; W4 on 2x H100: 5 minutes).
#   Writes OUT_DIR/gpus.txt, steps.txt (each step's exit code and seconds), plans/, best.json,
#   best.tune.json (every candidate's report), tune.txt and score.txt.
set -u
OUT=${1:?usage: bash benchmarks/candidates.sh OUT_DIR MODEL WORKLOAD [PROFILE]}
M=${2:?usage: bash benchmarks/candidates.sh OUT_DIR MODEL WORKLOAD [PROFILE]}
W=${3:?usage: bash benchmarks/candidates.sh OUT_DIR MODEL WORKLOAD [PROFILE]}
P=${4:-}
mkdir -p "$OUT/plans"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1     # NVLink multicast off (TP)
N="python3 -m nfsearch"
BUNDLED=profiles/h100-sxm/llama-3-8b.parquet
S=$OUT/steps.txt; : > "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n rc=$? $(( $(date +%s) - t ))s" >> "$S"; }
nvidia-smi --query-gpu=index,name,power.limit,clocks.max.sm,driver_version,serial --format=csv > "$OUT/gpus.txt" 2>&1
if [ -z "$P" ]; then
  case "$M:$W" in
    llama-3-8b:W1|llama-3-8b:W2|llama-3-8b:W3) P=$BUNDLED ;;
    *)
      step profile 600 $N profile --model "$M" --workload "$W" --quick -o "$OUT/x.parquet" \
          > "$OUT/profile.txt" 2> "$OUT/profile.log"
      P=$OUT/x.parquet
      step carry 60 $N calibrate --profile "$P" --from "$BUNDLED" -o "$OUT/x.cal.parquet" > "$OUT/carry.txt" 2>&1 \
          && [ -f "$OUT/x.cal.parquet" ] && P=$OUT/x.cal.parquet ;;
  esac
fi
echo "profile: $P" >> "$OUT/gpus.txt"
step solve 120 $N solve --model "$M" --workload "$W" --profile "$P" --time-limit 5 \
    -o "$OUT/plans/a_solved.json" > "$OUT/solve.txt" 2>&1
step overlapped 120 $N solve --model "$M" --workload "$W" --profile "$P" --time-limit 5 --min-gain 0 \
    -o "$OUT/plans/b_overlapped.json" > "$OUT/overlapped.txt" 2>&1
step sequential 60 $N solve --model "$M" --workload "$W" --profile "$P" --min-gain 0.99 \
    -o "$OUT/plans/c_sequential.json" > "$OUT/sequential.txt" 2>&1
step tune 400 $N tune --model "$M" --workload "$W" --plans "$OUT/plans" --profile "$P" -k 3 --iters 20 \
    -o "$OUT/best.json" > "$OUT/tune.txt" 2>&1
[ -f "$OUT/best.tune.json" ] && python3 benchmarks/score_tune.py "$OUT/best.tune.json" --json "$OUT/score.json" \
    > "$OUT/score.txt" 2>&1
cat "$S" "$OUT/gpus.txt"
grep -hE "margin|power:|co-run estimates" "$OUT/solve.txt" 2> /dev/null | tail -n 3
grep -E "chosen by" "$OUT/tune.txt" 2> /dev/null
cat "$OUT/score.txt" 2> /dev/null
