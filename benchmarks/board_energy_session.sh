#!/usr/bin/env bash
# Is the power-capped prediction a board's own? On one H100, measure this board's energy and pair
# energy (`profile --energy-only`) for llama-3-8b (the bundled profile's rows, W2 and W3 pair families),
# Qwen2-7B and Mistral-7B-v0.1 (W2; their measured profiles, llama-3-8b's calibration and energy
# factor carried), then time board B's stored candidates (pair_energy_2026-11-27: solved, overlapped,
# sequential for each case) against each other with `tune --plans`, each report predicted with this
# board's profile. benchmarks/board_energy_eval.py then scores the same runs with the profiles of
# other boards (bundled: board A; unseen: board B).
#   usage: bash benchmarks/board_energy_session.sh OUT_DIR [energy|tune ...]   (one H100)
set -u
OUT=${1:?usage: bash benchmarks/board_energy_session.sh OUT_DIR [energy|tune ...]}; shift
PARTS=${*:-energy tune}
mkdir -p "$OUT"
N="python3 -m nfsearch"
R=benchmarks/results/pair_energy_2026-11-27
S=$OUT/steps.txt; touch "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n rc=$? $(( $(date +%s) - t ))s" >> "$S"; }
config() { case "$1" in Qwen2-7B) echo benchmarks/models/Qwen2-7B/config.json ;;
                        *) echo tests/fixtures/hf/Mistral-7B-v0.1/config.json ;; esac; }
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version,serial,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
for part in $PARTS; do
  case $part in
    energy)
      step energy_llama 200 $N profile --energy-only profiles/h100-sxm/llama-3-8b.parquet --model llama-3-8b \
          --workload W2 -o "$OUT/llama-3-8b.board.parquet" > "$OUT/energy-llama.txt" 2> "$OUT/energy-llama.log"
      for M in Qwen2-7B Mistral-7B-v0.1; do
        step "energy_$M" 200 $N profile --model "$(config $M)" --workload W2 \
            --energy-only "benchmarks/results/unseen_profiles/$M.calibrated.parquet" -o "$OUT/$M.energy.parquet" \
            > "$OUT/energy-$M.txt" 2> "$OUT/energy-$M.log"
        step "carry_$M" 30 $N calibrate --profile "$OUT/$M.energy.parquet" --from profiles/h100-sxm/llama-3-8b.parquet \
            -o "$OUT/$M.board.parquet" > "$OUT/carry-$M.txt" 2>&1
      done ;;
    tune)
      for c in llama-W2 llama-W3 Qwen2-7B Mistral-7B-v0.1; do
        case $c in
          llama-W*) model=llama-3-8b; w=${c#llama-}; prof=$OUT/llama-3-8b.board.parquet; plans=$R/llama_board_b/$c/plans ;;
          *) model=$(config $c); w=W2; prof=$OUT/$c.board.parquet; plans=$R/unseen/$c/plans ;;
        esac
        mkdir -p "$OUT/$c"
        step "tune_$c" 200 $N tune --model "$model" --workload $w --plans "$plans" --profile "$prof" -k 3 \
            --iters 20 -o "$OUT/$c/best.json" > "$OUT/$c/tune.txt" 2>&1
      done ;;
  esac
done
cat "$S"; cat "$OUT/gpu.txt"
for f in "$OUT"/energy-*.log; do [ -f "$f" ] && grep -E "static power" "$f"; done
for c in "$OUT"/*/; do [ -f "$c/tune.txt" ] && { echo "== $c"; grep -E "chosen by|power:" "$c/tune.txt"; }; done
