#!/usr/bin/env bash
# One tensor-parallel machine session, end to end from the CLI, then the collective benchmark:
#   profile --tp (measured: shard rows on GPU 0, collectives and collective x GEMM pairs on every GPU),
#   analyze --pairs, solve on that profile, run the plan (one process per GPU, NCCL, TP=1 check),
#   then benchmarks/ce_allreduce.py (NCCL on SM shares vs the copy-engine all-reduce + fused norm).
#   usage: benchmarks/tp_session.sh W4|W6 OUT_DIR     (GPUs: all visible; NVLink multicast stays off)
set -u
W=$1; OUT=$2; mkdir -p "$OUT"
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
S=$OUT/steps.txt; : > "$S"; nvidia-smi -L > "$OUT/gpus.txt"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n $? $(( $(date +%s) - t ))" >> "$S"; }
P="python3 -m nfsearch"
step profile 200 $P profile --model llama-3-70b --workload "$W" --quick -o "$OUT/x.parquet" 2> "$OUT/profile.log"
step analyze 30 $P analyze --pairs "$OUT/x.parquet" --tp "$N" --json "$OUT/pairs.json" > "$OUT/pairs.txt" 2>&1
step solve 60 $P solve --model llama-3-70b --workload "$W" --profile "$OUT/x.parquet" --layers 2 --time-limit 5 \
    -o "$OUT/plan.json" 2> "$OUT/solve.log"
step run 100 $P run --schedule "$OUT/plan.json" --iters 10 --out "$OUT/run" > "$OUT/run.txt" 2> "$OUT/run.log"
step ce 150 python3 benchmarks/ce_allreduce.py --out "$OUT" > "$OUT/ce.txt" 2>&1
cat "$S"; tail -n 12 "$OUT/profile.log"; cat "$OUT/pairs.txt" | tail -n 25; tail -n 3 "$OUT/solve.log" "$OUT/run.log" "$OUT/run.txt"
tail -n 30 "$OUT/ce.txt"
python3 -m nfsearch.runtime.tp_profile report "$OUT" 2>&1 | tail -n 15
