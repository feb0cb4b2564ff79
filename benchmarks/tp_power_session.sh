#!/usr/bin/env bash
# The power bound under tensor parallelism (issues 10 and 11): W4 (llama-3-70b, TP=2) end to end from the CLI.
#   1. profile --tp 2 --quick WITH energy: the shard's kernels, pairs and collectives, then each of the shard's
#      ops' energy on GPU 0 at the W1-W3 (at TP=2) and W4 token counts, the power limit and static power
#      (the collectives are not measured on one GPU: the bound counts them as no dynamic energy)
#   2. solve --layers 2 on that profile (says when the plan is power-bound), simulate it (the bound per GPU)
#   3. run the plan with --profile: every rank's NVML readings during the timing rounds (plan and baselines)
#      and a sustained lockstep loop of the plan's graph; predicted = max(replay, power bound)
#   4. the GPU tests of the lockstep loop and of a tiny TP=2 run's per-rank power (tests/test_tp_power.py)
#   5. summary.json and a table, last.
#   usage: bash benchmarks/tp_power_session.sh OUT_DIR      (2 GPUs of one host; about 3-4 minutes)
set -u
OUT=${1:?usage: bash benchmarks/tp_power_session.sh OUT_DIR}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
N="python3 -m nfsearch"
X=$OUT/x.parquet
S=$OUT/steps.txt; : > "$S"
step() { local n=$1 l=$2; shift 2; local t; t=$(date +%s); timeout -k 10 "$l" "$@"; echo "$n $? $(( $(date +%s) - t ))" >> "$S"; }
nvidia-smi --query-gpu=index,name,power.limit,power.default_limit,power.max_limit,clocks.max.sm,driver_version \
    --format=csv > "$OUT/gpus.txt" 2>&1
step profile 240 $N profile --model llama-3-70b --workload W4 --quick -o "$X" > "$OUT/profile.txt" 2> "$OUT/profile.log"
step solve 60 $N solve --model llama-3-70b --workload W4 --profile "$X" --layers 2 --time-limit 5 \
    -o "$OUT/plan.json" > "$OUT/solve.log" 2>&1
step simulate 60 $N simulate "$OUT/plan.json" --profile "$X" -o "$OUT/sim" > "$OUT/simulate.txt" 2>&1
step run 150 $N run --schedule "$OUT/plan.json" --profile "$X" --out "$OUT/run" > "$OUT/run.txt" 2> "$OUT/run.log"
if python3 -c "import pytest" 2> /dev/null; then
    step gpu_tests 120 python3 -m pytest -q -m gpu tests/test_tp_power.py > "$OUT/gpu_tests.txt" 2>&1
    tail -n 3 "$OUT/gpu_tests.txt"
fi
cat "$S"
grep -h "energy of\|static power\|FAILED\|note:" "$OUT/profile.log" | head -n 12
tail -n 2 "$OUT/profile.txt"; grep -h "power" "$OUT/solve.log" | tail -n 2; grep -h "power" "$OUT/simulate.txt"
tail -n 8 "$OUT/run.txt"; tail -n 3 "$OUT/run.log"
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from nfsearch import plan, profile
from nfsearch.cost import power_bound_of
from nfsearch.runreport import TpPower
out = Path(sys.argv[1])
table = profile.load(out / "x.parquet") if (out / "x.parquet").is_file() else None
energy = None if table is None else table.energy
schedule = plan.read(out / "plan.json") if (out / "plan.json").is_file() else None
bound = note = None
if table is not None and schedule is not None:
    bound, note = power_bound_of(table, schedule.model, schedule.workload)
run_path = out / "run" / "run.json"
run = json.loads(run_path.read_text()) if run_path.is_file() else None
summary = {"gpus": (out / "gpus.txt").read_text() if (out / "gpus.txt").is_file() else None,
           "steps": (out / "steps.txt").read_text().split("\n"),
           "energy": None if energy is None else energy.to_dict(),
           "plan_predicted": None if schedule is None or schedule.predicted is None else
           {"layer_time_ms": schedule.predicted.layer_time_ms,
            "sequential_layer_time_ms": schedule.predicted.sequential_layer_time_ms},
           "power_bound": None if bound is None else bound.to_dict(), "power_note": note,
           "run": None if run is None else {k: run.get(k) for k in (
               "gpu", "gpus", "measured_layer_ms", "replay_layer_ms", "predicted_layer_ms", "power_bound_ms",
               "is_power_bound", "prediction_error", "speedup_vs_seq_torch", "speedup_vs_seq_same", "baselines",
               "per_rank_plan_ms", "power", "notes", "correctness")}}
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
print(f"\nwrote {out / 'summary.json'}")
if energy is None:
    print("energy: none in the profile (see profile.log)")
else:
    ops = sorted({p.op for p in energy.points})
    print(f"energy: {len(energy.points)} points on GPU 0 ({', '.join(ops)}), limit {energy.power_limit_w:.0f} W, "
          f"static {energy.static_power_w:.0f} W, {len(energy.failures)} failures; capped in "
          f"{sum(p.capped_share >= 0.5 for p in energy.points)} of the points' loops")
    for p in energy.points:
        if p.op in ("kqv", "ug", "d", "o"):
            print(f"  {p.op:<4}{p.num_tokens:>6} tok {p.impl:<6}{p.time_ms:>8.4f} ms {p.energy_j * 1e3:>8.2f} mJ "
                  f"{p.power_w:>5.0f} W SM {p.sm_clock_mhz or float('nan'):>5.0f} MHz capped {p.capped_share:.0%}")
print(f"bound: {bound.describe(schedule.predicted.layer_time_ms) if bound and schedule else note}")
print(f"bound note: {note}")
if run is None:
    print(f"run: no report (see {out}/run.log)")
else:
    m, rep, pred = run.get("measured_layer_ms"), run.get("replay_layer_ms"), run.get("predicted_layer_ms")
    err = lambda x: f"{x:.3f} ({(x / m - 1) * 100:+.1f}%)" if x and m else "-"
    b = run.get("baselines", {})
    print(f"ms per layer: measured {m and round(m, 4)}; replay (old prediction) {err(rep)}; max(replay, bound) "
          f"{err(pred)}; bound {run.get('power_bound_ms') and round(run['power_bound_ms'], 4)}; seq-torch "
          f"{b.get('seq_torch', {}).get('layer_ms')}, seq-same {b.get('seq_same', {}).get('layer_ms')}")
    if run.get("power"):
        p = TpPower.from_dict(run["power"])
        print(f"{'rank':<5}{'capped':>7}{'share':>7}{'W loop':>8}{'W time':>8}{'limit':>7}{'MHz':>7}{'J/layer':>9}"
              f"{'m/p':>7}  baselines (timing rounds)")
        for r in p.ranks:
            x = r.plan
            base = "; ".join(f"{k} {v.capped_share:.0%} {v.power_w or float('nan'):.0f} W" for k, v in r.baselines)
            if x is None:
                print(f"{r.rank:<5} no reading: {r.note}  {base}")
                continue
            share = x.timing_capped_share if x.timing_num_samples else x.capped_share
            ratio = p.energy_ratio(r.rank)
            print(f"{r.rank:<5}{'yes' if x.is_power_capped else 'no':>7}{share:>7.0%}{x.power_w:>8.0f}"
                  f"{x.timing_power_w or float('nan'):>8.0f}{x.power_limit_w:>7.0f}"
                  f"{x.timing_sm_clock_mhz or x.sm_clock_mhz or float('nan'):>7.0f}{x.energy_per_layer_j:>9.3f}"
                  f"{ratio if ratio is not None else float('nan'):>7.3f}  {base}")
EOF
