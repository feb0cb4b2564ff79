"""Does a board's own energy make the power-capped prediction? The runs of
benchmarks/board_energy_session.sh (board G: board B's stored candidates timed against each other)
scored twice: with the profiles the plans were solved on, whose energy was measured on other boards
(llama-3-8b: the bundled profile, board A; Qwen2-7B and Mistral-7B: board B), and with this board's
own energy and pair energy (`profile --energy-only` on board G, the same rows and factor). CPU only;
it measures nothing.

    python benchmarks/board_energy_eval.py [--json OUT]
"""

import argparse
import json
from pathlib import Path

from nfsearch import plan as plan_io
from nfsearch.cost import make_problem
from nfsearch.profile import load
from nfsearch.simulate import replay

HERE = Path(__file__).parent
R = HERE / "results" / "board_energy_2026-11-27" / "board_g"
P = HERE / "results" / "pair_energy_2026-11-27"
CASES = {  # case -> (the folder of board B's plans under P, the profile they were solved on, board G's)
    "llama-W2": ("llama_board_b/llama-W2", HERE.parent / "profiles/h100-sxm/llama-3-8b.parquet",
                 R / "llama-3-8b.board.parquet"),
    "llama-W3": ("llama_board_b/llama-W3", HERE.parent / "profiles/h100-sxm/llama-3-8b.parquet",
                 R / "llama-3-8b.board.parquet"),
    "Qwen2-7B": ("unseen/Qwen2-7B", P / "unseen/Qwen2-7B.cal.parquet", R / "Qwen2-7B.board.parquet"),
    "Mistral-7B-v0.1": ("unseen/Mistral-7B-v0.1", P / "unseen/Mistral-7B-v0.1.cal.parquet",
                        R / "Mistral-7B-v0.1.board.parquet")}


def predict(schedule, table) -> float:
    return replay(schedule, make_problem(schedule.model, schedule.workload, table, schedule.num_layers).cost).layer_time_ms


def evaluate() -> list[dict]:
    measured = json.loads((R / "measured.json").read_text())["interleaved_ms"]
    rows = []
    for case, (folder, other_path, own_path) in CASES.items():
        other, own = load(other_path), load(own_path)
        for name, (median, low, high) in sorted(measured[case].items()):
            schedule = plan_io.read(P / folder / "plans" / f"{name}.json")
            rows.append({"case": case, "plan": name, "measured_ms": median, "spread": [low, high],
                         "other_board_ms": predict(schedule, other), "own_board_ms": predict(schedule, own),
                         "other_static_w": other.energy.static_power_w, "own_static_w": own.energy.static_power_w})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = evaluate()
    err = lambda p, m: f"{p:.3f} ({p / m - 1:+.1%})"
    print(f"{'case':<17}{'plan':<14}{'measured':>9}  {'other board':>16}  {'own board':>16}")
    for r in rows:
        print(f"{r['case']:<17}{r['plan']:<14}{r['measured_ms']:>9.3f}  {err(r['other_board_ms'], r['measured_ms']):>16}  "
              f"{err(r['own_board_ms'], r['measured_ms']):>16}")
    for key in ("other_board_ms", "own_board_ms"):
        e = [r[key] / r["measured_ms"] - 1 for r in rows]
        print(f"{key[:-3]:>11}: max |error| {max(map(abs, e)):.1%}, mean {sum(e) / len(e):+.1%}, "
              f"within 5%: {sum(abs(x) <= 0.05 for x in e)} of {len(e)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
