#!/usr/bin/env bash
# After benchmarks/tp_power_session.sh: the W4 energy factor fitted on its run (calibrate --energy, every rank
# one measurement), `nfsearch tune` of W4 on that calibrated profile (the solved plan and the hand-made
# baselines run as `nfsearch run` runs them, the fastest correct kept), and an unseen model on the same
# machine: Qwen2-72B (qkv bias) at W4's batch, TP=2, profiled with energy, given llama-3-70b's energy factor
# (calibrate --from; never fitted on), solved and run.
#   usage: bash benchmarks/tp_power_unseen.sh SESSION_DIR OUT_DIR   (SESSION_DIR: tp_power_session.sh's output;
#          2 GPUs of the same kind; about 6 minutes)
set -u
IN=${1:?usage: tp_power_unseen.sh SESSION_DIR OUT_DIR}; OUT=${2:?usage: tp_power_unseen.sh SESSION_DIR OUT_DIR}
mkdir -p "$OUT/tune"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
N="python3 -m nfsearch"
S=$OUT/steps.txt; : > "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n $? $(( $(date +%s) - t ))" >> "$S"; }
nvidia-smi --query-gpu=index,name,power.limit --format=csv > "$OUT/gpus.txt" 2>&1
CAL=$OUT/x.ecal.parquet
step calibrate 60 $N calibrate --profile "$IN/x.parquet" --energy "$IN/plan.json" "$IN/run/run.json" -o "$CAL" \
    > "$OUT/calibrate.txt" 2>&1
step tune 240 $N tune --model llama-3-70b --workload W4 --profile "$CAL" --layers 2 --time-limit 5 -k 3 --iters 20 \
    -o "$OUT/tune/best.json" > "$OUT/tune.txt" 2>&1
Q=$OUT/qwen2-72b
mkdir -p "$Q"
step q_profile 200 $N profile --model qwen2-72b --workload W4 --quick -o "$Q/x.parquet" > "$Q/profile.txt" 2> "$Q/profile.log"
step q_carry 30 $N calibrate --profile "$Q/x.parquet" --from "$CAL" -o "$Q/x.cal.parquet" > "$Q/carry.txt" 2>&1
step q_solve 60 $N solve --model qwen2-72b --workload W4 --profile "$Q/x.cal.parquet" --layers 2 --time-limit 5 \
    -o "$Q/plan.json" > "$Q/solve.log" 2>&1
step q_run 150 $N run --schedule "$Q/plan.json" --profile "$Q/x.cal.parquet" --out "$Q/run" > "$Q/run.txt" 2> "$Q/run.log"
cat "$S"; tail -n 4 "$OUT/calibrate.txt"; tail -n 12 "$OUT/tune.txt"
tail -n 1 "$Q/carry.txt"; tail -n 2 "$Q/solve.log"; tail -n 7 "$Q/run.txt"
