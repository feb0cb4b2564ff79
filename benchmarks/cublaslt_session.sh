#!/usr/bin/env bash
# cuBLASLt told its partition's SM count (the "cublaslt" GEMM impl) on one GPU, end to end:
#   1. the GPU kernel tests of the GEMMs (every impl, on partitions, inside a CUDA graph)
#   2. kernel_bench --only gemm: cuBLAS, cuBLASLt with the SM target and the TMA kernel at 64-124 SMs
#   3. a full llama-3-8b profile (every impl at every SM count, the pair table) with the bundled
#      calibration carried (calibrate --from), W2 solved on it and run beside its baselines
#   usage: bash benchmarks/cublaslt_session.sh OUT_DIR       (one GPU; about 8 minutes)
set -u
OUT=${1:?usage: bash benchmarks/cublaslt_session.sh OUT_DIR}; mkdir -p "$OUT"
N="python3 -m nfsearch"
S=$OUT/steps.txt; : > "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n $? $(( $(date +%s) - t ))" >> "$S"; }
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
step gpu_tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_kernels.py -k "gemm or partitions or cublaslt" \
    > "$OUT/gpu_tests.txt" 2>&1
step kernel_bench 150 python3 benchmarks/kernel_bench.py --only gemm --out "$OUT" > "$OUT/kernel_bench.txt" 2>&1
step profile 200 $N profile --model llama-3-8b --workload W2 --no-energy -o "$OUT/p.parquet" > "$OUT/profile.txt" 2> "$OUT/profile.log"
step carry 30 $N calibrate --profile "$OUT/p.parquet" --from profiles/h100-sxm/llama-3-8b.parquet -o "$OUT/p.cal.parquet" \
    > "$OUT/carry.txt" 2>&1
step solve 60 $N solve --workload W2 --profile "$OUT/p.cal.parquet" -o "$OUT/W2.json" > "$OUT/solve.log" 2>&1
step run 120 $N run --schedule "$OUT/W2.json" --profile "$OUT/p.cal.parquet" --out "$OUT/run" > "$OUT/run.txt" 2> "$OUT/run.log"
cat "$S"; tail -n 2 "$OUT/gpu_tests.txt"; grep -A14 "^== " "$OUT/kernel_bench.txt" | grep -v "^decode\|^prefill" | head -16
grep -h "triton/cuBLAS\|overlap pays" "$OUT/profile.log" | head -6; tail -n 1 "$OUT/solve.log"
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from nfsearch import plan
out = Path(sys.argv[1])
if (out / "W2.json").is_file():
    s = plan.read(out / "W2.json")
    used = {}
    for o in s.nano_ops:
        used.setdefault(o.op, set()).add(f"{o.impl}@{o.sm_count}")
    print("impls in the W2 plan:", {k: sorted(v) for k, v in used.items() if k in ("kqv", "o", "ug", "d")})
PY
tail -n 4 "$OUT/run.txt"
