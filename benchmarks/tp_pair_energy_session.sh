#!/usr/bin/env bash
# The energy of overlap with the collectives (W4: llama-3-70b, TP=2) on one host of 2 GPUs:
#   1. the GPU test of a tiny TP profile (its shard and collective pair energy points)
#   2. profile --tp 2 --quick with energy: the shard's kernels, pairs and energy on GPU 0, the all-reduces,
#      their pairs and energy, and each collective pair family's energy at its best split (both GPUs at once)
#   3. three plans solved on it (the default solve, the overlapped plan --min-gain 0, the sequential plan
#      --min-gain 0.99), timed against each other by `tune --plans` (each report predicted with the profile)
#   benchmarks/tp_pair_energy_eval.py then scores them with and without the collective pair points.
#   usage: bash benchmarks/tp_pair_energy_session.sh OUT_DIR [tests|profile|tune ...]   (2 GPUs of one host)
#   On 2x H100 `profile tune` took 300 s (profile 214 s); the tiny TP test did not finish in 240 s: give
#   `tests` a call of its own.
set -u
OUT=${1:?usage: bash benchmarks/tp_pair_energy_session.sh OUT_DIR [tests|profile|tune ...]}; shift
PARTS=${*:-tests profile tune}
mkdir -p "$OUT/plans"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
N="python3 -m nfsearch"
X=$OUT/x.parquet
S=$OUT/steps.txt; touch "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n rc=$? $(( $(date +%s) - t ))s" >> "$S"; }
nvidia-smi --query-gpu=index,name,power.limit,clocks.max.sm,driver_version,serial,temperature.gpu --format=csv > "$OUT/gpus.txt" 2>&1
for part in $PARTS; do
  case $part in
    tests)
      step gpu_tests 200 python3 -m pytest -q -m gpu -p no:cacheprovider \
          "tests/test_tp_profile.py::test_tiny_quick_tp_profile_on_two_gpus" > "$OUT/gpu_tests.txt" 2>&1 ;;
    profile)
      step profile 330 $N profile --model llama-3-70b --workload W4 --quick -o "$X" > "$OUT/profile.txt" 2> "$OUT/profile.log" ;;
    tune)
      step solve 40 $N solve --model llama-3-70b --workload W4 --profile "$X" --time-limit 5 \
          -o "$OUT/plans/a_solved.json" > "$OUT/solve.txt" 2>&1
      step overlapped 40 $N solve --model llama-3-70b --workload W4 --profile "$X" --time-limit 5 --min-gain 0 \
          -o "$OUT/plans/b_overlapped.json" > "$OUT/overlapped.txt" 2>&1
      step sequential 30 $N solve --model llama-3-70b --workload W4 --profile "$X" --min-gain 0.99 \
          -o "$OUT/plans/c_sequential.json" > "$OUT/sequential.txt" 2>&1
      step tune 150 $N tune --model llama-3-70b --workload W4 --plans "$OUT/plans" --profile "$X" -k 3 --iters 20 \
          -o "$OUT/best.json" > "$OUT/tune.txt" 2>&1 ;;
  esac
done
cat "$S"; cat "$OUT/gpus.txt"
[ -f "$OUT/gpu_tests.txt" ] && tail -n 2 "$OUT/gpu_tests.txt"
[ -f "$OUT/profile.log" ] && { grep -c "pair energy" "$OUT/profile.log"; grep -E "pair energy (kqv|o|ug|d|decode_attn) .*allreduce|FAILED|static power" "$OUT/profile.log" | head -n 14; }
grep -hE "^wrote|margin" "$OUT"/solve.txt "$OUT"/overlapped.txt 2> /dev/null | tail -n 4
[ -f "$OUT/tune.txt" ] && grep -E "^W4|power:|chosen by" "$OUT/tune.txt"
