"""How the plan's own power bound depends on the clock exponent alpha of the pair energy ratio
(profile.PairEnergyPoint.dynamic_ratio: the pair's energy taken to the back-to-back loop's clock as
(clock ratio)^alpha). For each alpha the bundled profile's energy factor is refitted on board A's
four runs (calibrate --energy, as the bundled factor was), then the layer time is predicted for
board A's runs (in sample) and for boards B and C's twelve candidates each (benchmarks/pair_energy_eval.py).
nfsearch uses alpha = 1 (profile.ENERGY_CLOCK_EXPONENT, read off earlier H100 runs before these);
this prints what another choice would have given. CPU only.

    python benchmarks/pair_energy_alpha.py
"""

import json
from pathlib import Path

from pair_energy_eval import BOARDS, R, load_profile

from nfsearch import plan as plan_io
from nfsearch import profile as profile_mod
from nfsearch.calibrate import calibrate_energy, energy_evidence
from nfsearch.cost import make_problem
from nfsearch.profile import load
from nfsearch.simulate import replay

BUNDLED = Path(__file__).parent.parent / "profiles/h100-sxm/llama-3-8b.parquet"
BOARD_A = {("W2", "solved"): 1.9541, ("W2", "seq"): 2.0752, ("W3", "solved"): 3.4266, ("W3", "seq"): 3.4991}
ALPHAS = (0.0, 0.5, 1.0, 1.5, 2.0)


def predicted(table, plan_path) -> float:
    s = plan_io.read(plan_path)
    return replay(s, make_problem(s.model, s.workload, table, s.num_layers).cost).layer_time_ms


def main() -> None:
    session = R / "session1"
    dynamic_ratio = profile_mod.PairEnergyPoint.dynamic_ratio
    for alpha in ALPHAS:
        profile_mod.PairEnergyPoint.dynamic_ratio = lambda self, static_w, a=alpha: dynamic_ratio(self, static_w, a)
        runs = [(plan_io.read(session / "plans" / f"{w}.{k}.json"), evidence, source)
                for w, k in BOARD_A
                for evidence, source in energy_evidence(json.loads((session / "runs" / f"{w}.{k}.run.json").read_text()),
                                                        f"{w}.{k}")]
        table, fit = calibrate_energy(load(BUNDLED), runs)
        board_a = [predicted(table, session / "plans" / f"{w}.{k}.json") / m - 1 for (w, k), m in BOARD_A.items()]
        text = [f"alpha {alpha:g}: factor {fit.factor:.3f}; board A (in sample) "
                + ", ".join(f"{e:+.1%}" for e in board_a)]
        for board, cases in sorted(BOARDS.items()):
            errors = []
            for case, folder in cases.items():
                own = table if case.startswith("llama") else load_profile(R, case)
                timings = json.loads((R / folder / "best.tune.json").read_text())["candidates"][0]["interleaved"]["timings"]
                errors += [predicted(own, R / folder / "plans" / f"{name}.json") / t["layer_ms"] - 1
                           for name, t in timings.items()]
            text.append(f"board {board} max |error| {max(map(abs, errors)):.1%}, mean "
                        f"{sum(map(abs, errors)) / len(errors):.2%}, within 5% {sum(abs(e) <= 0.05 for e in errors)} "
                        f"of {len(errors)}")
        print("; ".join(text))
    profile_mod.PairEnergyPoint.dynamic_ratio = dynamic_ratio


if __name__ == "__main__":
    main()
