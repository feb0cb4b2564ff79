"""The plan's own power bound (overlaps priced by measured pair energies) against the runs of
benchmarks/pair_energy_unseen.sh: per candidate plan, the interleaved median `tune` measured, the
replay, max(replay, the layer's bound) as predicted before pair energy, and max(replay, the plan's
bound) as predicted now, each with its error; seq-same and seq-torch from the first candidate's own
run. CPU only; it measures nothing.

    python benchmarks/pair_energy_eval.py [RESULTS_DIR] [--board B|C] [--json OUT]
"""

import argparse
import dataclasses
import json
from pathlib import Path

from nfsearch import plan as plan_io
from nfsearch.cost import make_problem
from nfsearch.profile import load
from nfsearch.simulate import replay

R = Path(__file__).parent / "results" / "pair_energy_2026-11-27"
BUNDLED = "profiles/h100-sxm/llama-3-8b.parquet"
PROFILES = {  # case -> the profile its plans were solved with (under R unless bundled)
    "llama-W2": BUNDLED, "llama-W3": BUNDLED,
    "Qwen2-7B": "unseen/Qwen2-7B.cal.parquet", "Mistral-7B-v0.1": "unseen/Mistral-7B-v0.1.cal.parquet"}
BOARDS = {  # board -> case -> the folder of its tune run (under R); board C re-timed board B's plans
    "B": {"llama-W2": "llama_board_b/llama-W2", "llama-W3": "llama_board_b/llama-W3",
          "Qwen2-7B": "unseen/Qwen2-7B", "Mistral-7B-v0.1": "unseen/Mistral-7B-v0.1"},
    "C": {case: f"board_c/{case}" for case in PROFILES}}


def load_profile(root: Path, case: str):
    path = PROFILES[case]
    return load(Path(__file__).parent.parent / path if path == BUNDLED else root / path)


def evaluate(root: Path, board: str) -> list[dict]:
    rows = []
    for case, folder in BOARDS[board].items():
        folder = root / folder
        tuned = json.loads((folder / "best.tune.json").read_text())
        first = tuned["candidates"][0]
        timings = first["interleaved"]["timings"]
        base = {k: first["baselines"][k]["layer_ms"] for k in ("seq-same", "seq-torch") if k in first["baselines"]}
        table = load_profile(root, case)
        without = table.with_energy(dataclasses.replace(table.energy, pair_points=()))
        for name, timing in sorted(timings.items()):
            schedule = plan_io.read(folder / "plans" / f"{name}.json")
            now = replay(schedule, make_problem(schedule.model, schedule.workload, table, schedule.num_layers).cost)
            before = replay(schedule, make_problem(schedule.model, schedule.workload, without,
                                                   schedule.num_layers).cost)
            measured = timing["layer_ms"]
            rows.append({"board": board, "case": case, "plan": name, "source": schedule.solver.source,
                         "measured_ms": measured, "spread": [timing["min_layer_ms"], timing["max_layer_ms"]],
                         "replay_ms": now.replayed_layer_ms, "before_ms": before.layer_time_ms,
                         "now_ms": now.layer_time_ms, "plan_bound_ms": now.power_bound.bound_ms,
                         "layer_bound_ms": before.power_bound.bound_ms, **{f"{k}_ms": v for k, v in base.items()}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", nargs="?", default=str(R))
    ap.add_argument("--board", choices=sorted(BOARDS), action="append", help="B, C (default: both)")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = [r for board in (args.board or sorted(BOARDS)) for r in evaluate(Path(args.root), board)]
    err = lambda p, m: f"{p:.3f} ({p / m - 1:+.1%})"
    print(f"{'board':<6}{'case':<17}{'plan':<14}{'measured':>9}  {'replay':>16}  {'before (layer bound)':>20}  "
          f"{'now (plan bound)':>17}")
    for r in rows:
        print(f"{r['board']:<6}{r['case']:<17}{r['plan']:<14}{r['measured_ms']:>9.3f}  {err(r['replay_ms'], r['measured_ms']):>16}  "
              f"{err(r['before_ms'], r['measured_ms']):>20}  {err(r['now_ms'], r['measured_ms']):>17}")
    for key in ("replay_ms", "before_ms", "now_ms"):
        e = [abs(r[key] / r["measured_ms"] - 1) for r in rows]
        print(f"{key[:-3]:>7}: max |error| {max(e):.1%}, within 5%: {sum(x <= 0.05 for x in e)} of {len(e)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
