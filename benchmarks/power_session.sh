#!/usr/bin/env bash
# The power bound on one GPU (issue 10, "W3 and the power cap"), end to end from the CLI:
#   1. energy of llama-3-8b's ops at the W1-W3 token counts, the power limit and the static power, added to
#      a copy of the bundled calibrated profile (its timing rows kept: same fingerprint, so the bundled
#      plans run with it): nfsearch profile --energy-only
#   2. the plans benchmarks/plans/W{1,2,3}.json run with that profile: each report carries the measured
#      energy per layer, power, SM clock and clock-event reasons, and the prediction max(replay, power bound)
#   3. simulate each plan with it (CPU), and fit the energy factor on the three runs (calibrate --energy;
#      the calibrated prediction below is in-sample: fitted on these same runs)
#   4. summary.json and a table, last.
#   usage: bash benchmarks/power_session.sh OUT_DIR        (one GPU; ~3-4 minutes)
set -u
OUT=$1; mkdir -p "$OUT"
P="python3 -m nfsearch"
BASE=profiles/h100-sxm/llama-3-8b.parquet
E=$OUT/llama-3-8b.energy.parquet
S=$OUT/steps.txt; : > "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n $? $(( $(date +%s) - t ))" >> "$S"; }
nvidia-smi --query-gpu=name,power.limit,power.default_limit,power.max_limit,clocks.max.sm,driver_version \
    --format=csv > "$OUT/gpu.txt" 2>&1
step profile 240 $P profile --model llama-3-8b --workload W2 --energy-only "$BASE" -o "$E" \
    > "$OUT/profile.txt" 2> "$OUT/profile.log"
for W in W1 W2 W3; do
    step "run_$W" 200 $P run --schedule "benchmarks/plans/$W.json" --profile "$E" --out "$OUT/run-$W" \
        > "$OUT/run-$W.txt" 2> "$OUT/run-$W.log"
    step "simulate_$W" 60 $P simulate "benchmarks/plans/$W.json" --profile "$E" -o "$OUT/sim-$W" \
        > "$OUT/sim-$W.txt" 2>&1
done
step calibrate 60 $P calibrate --profile "$E" -o "$OUT/llama-3-8b.energy.cal.parquet" \
    --energy benchmarks/plans/W1.json "$OUT/run-W1/run.json" --energy benchmarks/plans/W2.json "$OUT/run-W2/run.json" \
    --energy benchmarks/plans/W3.json "$OUT/run-W3/run.json" > "$OUT/calibrate.txt" 2>&1
if python3 -c "import pytest" 2> /dev/null; then          # the GPU test of measure_energy (a matmul loop)
    step gpu_test 120 python3 -m pytest -q -m gpu tests/test_power.py > "$OUT/gpu_test.txt" 2>&1
    tail -n 3 "$OUT/gpu_test.txt"
fi
cat "$S"; tail -n 35 "$OUT/profile.log"; cat "$OUT/calibrate.txt"
for W in W1 W2 W3; do tail -n 4 "$OUT/run-$W.txt"; grep -h "^note: power" "$OUT/run-$W.txt" "$OUT/run-$W.log"; done
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from nfsearch import plan, profile
from nfsearch.cost import power_bound_of
from nfsearch.runreport import RunReport
out = Path(sys.argv[1])
energy = profile.load(out / "llama-3-8b.energy.parquet") if (out / "llama-3-8b.energy.parquet").is_file() else None
cal_path = out / "llama-3-8b.energy.cal.parquet"
cal = profile.load(cal_path) if cal_path.is_file() else None
summary = {"gpu": (out / "gpu.txt").read_text(), "steps": (out / "steps.txt").read_text().split("\n"),
           "energy": None if energy is None or energy.energy is None else energy.energy.to_dict(),
           "energy_calibration": None if cal is None else cal.meta.get("energy_calibration"), "runs": {}}
rows = []
for w in ("W1", "W2", "W3"):
    path = out / f"run-{w}" / "run.json"
    if not path.is_file():
        rows.append(f"{w:<4} no run report (see {out}/run-{w}.log)")
        continue
    r = RunReport.from_dict(json.loads(path.read_text()), str(path))
    s = plan.read(f"benchmarks/plans/{w}.json")
    old = r.replay_layer_ms or s.predicted.layer_time_ms
    calibrated = None
    if cal is not None:
        bound, _ = power_bound_of(cal, s.model, s.workload)
        calibrated = None if bound is None else bound.layer_ms(old)
    p, b = r.power, r.power_bound
    entry = {"measured_layer_ms": r.measured_layer_ms, "old_predicted_ms": old, "new_predicted_ms": r.predicted_layer_ms,
             "power_bound_ms": None if b is None else b.bound_ms, "calibrated_predicted_ms_in_sample": calibrated,
             "is_power_bound": r.is_power_bound, "power": None if p is None else p.to_dict(),
             "energy_ratio": r.energy_ratio, "seq_same_ms": None if r.baseline("seq-same") is None
             else r.baseline("seq-same").layer_ms, "notes": list(r.notes)}
    summary["runs"][w] = entry
    err = lambda x: f"{x:>7.3f}{(x / r.measured_layer_ms - 1) * 100:>+6.1f}%" if x else f"{'-':>7}{'':>7}"
    rows.append(f"{w:<4}{r.measured_layer_ms:>9.3f}{err(old)}{err(r.predicted_layer_ms)}"
                f"{(b.bound_ms if b else float('nan')):>8.3f}{err(calibrated)}"
                + (f"{p.power_w:>7.0f}{p.timing_power_w or float('nan'):>7.0f}"
                   f"{p.timing_sm_clock_mhz or p.sm_clock_mhz or float('nan'):>7.0f}"
                   f"{'yes' if p.is_power_capped else 'no':>5}{(p.timing_capped_share if p.timing_num_samples else p.capped_share):>6.0%}"
                   f"{r.energy_ratio or float('nan'):>7.3f}" if p else "   no power reading"))
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
print(f"\nwrote {out / 'summary.json'}")
print("ms per layer: measured (timing rounds), old = predicted before (the plan's replay), new = max(replay, power bound),")
print("err = vs measured; cal = with the energy factor fitted on these three runs (in-sample);")
print("W = mean board power (sustained loop / timing rounds); MHz = median SM clock in the timing rounds;")
print("capped = SW power cap in >= 50% of the timing rounds' NVML samples; m/p = measured / predicted dynamic energy")
print(f"{'W':<4}{'measured':>9}{'old':>7}{'err':>7}{'new':>7}{'err':>7}{'bound':>8}{'cal':>7}{'err':>7}"
      f"{'W loop':>7}{'W time':>7}{'MHz':>7}{'cap':>5}{'share':>6}{'m/p':>7}")
print("\n".join(rows))
EOF
