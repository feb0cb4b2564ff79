"""The energy of overlap with the collectives, judged on the run of benchmarks/tp_pair_energy_session.sh
(W4, llama-3-70b at TP=2): per candidate plan, the interleaved median `tune` measured; the replay; the
plan's power bound with the profile's pair energy as measured (the shard's pairs and the collective
ones) and without the collective pairs (overlaps with an all-reduce counted as back to back); the
same with the single-GPU H100 calibration carried (`calibrate --from` the bundled llama-3-8b profile:
its timeline factors and energy factor 1.030, fitted on one GPU and never on W4); and each rank's
measured energy per layer above static power against the predicted dynamic energy. CPU only; it
measures nothing.

    python benchmarks/tp_pair_energy_eval.py [RESULTS_DIR] [--json OUT]
"""

import argparse
import dataclasses
import json
from pathlib import Path

from nfsearch import plan as plan_io
from nfsearch.calibrate import transfer
from nfsearch.cost import make_problem
from nfsearch.profile import load
from nfsearch.simulate import replay

R = Path(__file__).parent / "results" / "tp_pair_energy_2026-11-27" / "W4_H100x2"
BUNDLED = Path(__file__).parent.parent / "profiles/h100-sxm/llama-3-8b.parquet"


def is_collective(p) -> bool:
    return p.op_a.startswith("allreduce") or p.op_b.startswith("allreduce")


def evaluate(root: Path) -> list[dict]:
    table = load(root / "x.parquet")
    shard_only = table.with_energy(dataclasses.replace(
        table.energy, pair_points=tuple(p for p in table.energy.pair_points if not is_collective(p))))
    carried = transfer(table, load(BUNDLED))[0]
    tuned = json.loads((root / "best.tune.json").read_text())
    timings = tuned["candidates"][0]["interleaved"]["timings"]
    reports = {c["candidate"]: c for c in tuned["candidates"]}
    static_w = table.energy.static_power_w
    rows = []
    for name, timing in sorted(timings.items()):
        schedule = plan_io.read(root / "plans" / f"{name}.json")
        with_net = replay(schedule, make_problem(schedule.model, schedule.workload, table, schedule.num_layers).cost)
        without = replay(schedule, make_problem(schedule.model, schedule.workload, shard_only,
                                                schedule.num_layers).cost)
        with_cal = replay(schedule, make_problem(schedule.model, schedule.workload, carried, schedule.num_layers).cost)
        ranks = (reports.get(name, {}).get("power") or {}).get("ranks", [])
        measured_dyn = [r["plan"]["energy_per_layer_j"] - static_w * r["plan"]["layer_ms"] / 1e3
                        for r in ranks if r.get("plan")]
        rows.append({"plan": name, "measured_ms": timing["layer_ms"],
                     "spread": [timing["min_layer_ms"], timing["max_layer_ms"]],
                     "replay_ms": with_net.replayed_layer_ms, "with_collective_pairs_ms": with_net.layer_time_ms,
                     "without_collective_pairs_ms": without.layer_time_ms,
                     "carried_calibration_ms": with_cal.layer_time_ms,
                     "predicted_dynamic_j": with_net.power_bound.dynamic_energy_j,
                     "predicted_dynamic_j_without": without.power_bound.dynamic_energy_j,
                     "measured_dynamic_j_per_rank": measured_dyn, "bound_note": with_net.power_bound.note})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", nargs="?", default=str(R))
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = evaluate(Path(args.root))
    err = lambda p, m: f"{p:.3f} ({p / m - 1:+.1%})"
    print(f"{'plan':<14}{'measured':>9}  {'replay':>16}  {'no collective pairs':>20}  {'with them':>16}  "
          f"{'H100 factor carried':>19}  {'dynamic J: predicted (without) / measured per rank'}")
    for r in rows:
        measured = ", ".join(f"{x:.3f}" for x in r["measured_dynamic_j_per_rank"])
        print(f"{r['plan']:<14}{r['measured_ms']:>9.3f}  {err(r['replay_ms'], r['measured_ms']):>16}  "
              f"{err(r['without_collective_pairs_ms'], r['measured_ms']):>20}  "
              f"{err(r['with_collective_pairs_ms'], r['measured_ms']):>16}  "
              f"{err(r['carried_calibration_ms'], r['measured_ms']):>19}  {r['predicted_dynamic_j']:.3f} ({r['predicted_dynamic_j_without']:.3f}) / {measured}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
