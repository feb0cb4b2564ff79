"""How the plan's own power bound depends on the clock exponent alpha of the pair energy ratio
(profile.PairEnergyPoint.dynamic_ratio: the pair's energy taken to the back-to-back loop's clock as
(clock ratio)^alpha). For each alpha the bundled profile's energy factor is refitted on board A's
four runs (calibrate --energy, as the bundled factor was), then the layer time is predicted for
board A's runs (in sample) and for board B's twelve candidates (benchmarks/pair_energy_eval.py).
nfsearch uses alpha = 1 (profile.ENERGY_CLOCK_EXPONENT, read off earlier H100 runs before these);
this prints what another choice would have given. CPU only.

    python benchmarks/pair_energy_alpha.py
"""

import json
from pathlib import Path

from pair_energy_eval import CASES, R

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
        board_b = []
        for case, profile_path in CASES.items():
            own = table if profile_path.startswith("profiles/") else load(R / profile_path)
            timings = json.loads((R / case / "best.tune.json").read_text())["candidates"][0]["interleaved"]["timings"]
            board_b += [predicted(own, R / case / "plans" / f"{name}.json") / t["layer_ms"] - 1
                        for name, t in timings.items()]
        print(f"alpha {alpha:g}: factor {fit.factor:.3f}; board A (in sample) "
              + ", ".join(f"{e:+.1%}" for e in board_a)
              + f"; board B max |error| {max(map(abs, board_b)):.1%}, mean {sum(map(abs, board_b)) / len(board_b):.2%}, "
                f"within 5% {sum(abs(e) <= 0.05 for e in board_b)} of {len(board_b)}")
    profile_mod.PairEnergyPoint.dynamic_ratio = dynamic_ratio


if __name__ == "__main__":
    main()
