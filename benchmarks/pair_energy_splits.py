"""Does a pair's energy ratio depend on its split? The profile measures each pair family's energy at its
best split only (profiler._pair_energy_points), and the plan's power bound applies that ratio at
whatever split a plan runs the pair on. This probe measures a few families of the bundled H100
profile's pair table at every split the table has for them, the same way (profiler._pair_energy_point:
the two launched together in a sustained loop against back to back on the whole GPU), and prints the
dynamic energy ratio at one clock and the sustained time ratio per split.

    PYTHONPATH=. python benchmarks/pair_energy_splits.py --out DIR        (one H100, about a minute)
"""

import argparse
import datetime
import json
import os
import sys
from dataclasses import replace

import torch

from nfsearch import pairs as pair_table
from nfsearch.profile import load
from nfsearch.runtime import measurements as profiling
from nfsearch.runtime import power
from nfsearch.runtime.kernels import IMPLS
from nfsearch.runtime.partitions import SmPartitions
from nfsearch.runtime.profiler import _Measurer, _pair_energy_point
from nfsearch.specs import load_model, load_workload

BUNDLED = "profiles/h100-sxm/llama-3-8b.parquet"
FAMILIES = ("ug 2048 tok x decode_attn 512 req ctx 1024", "kqv 2048 tok x decode_attn 256 req ctx 1024",
            "d 2048 tok x decode_attn 256 req ctx 1024")
MINORITY_SMS = (16, 24, 32, 48, 64)     # the decode side's SMs measured (where the table has the split)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    table = load(BUNDLED)
    model, workload = load_model("llama-3-8b"), load_workload("W2")
    report = pair_table.make_report(pair_table.points_from_meta(table.meta))
    points = pair_table.points_from_meta(table.meta)
    chosen = []
    for f in report.families:
        if f.name not in FAMILIES:
            continue
        for p in points:
            if p.family == (f.a, f.b) and p.sms_b in MINORITY_SMS:
                chosen.append(replace(f, best=p))
    device, how = power.open_device(0)
    if device is None:
        sys.exit(f"pair_energy_splits: {how}")
    parts = SmPartitions(0, mode="green")
    rows = []
    try:
        plan = profiling.pair_energy_plan(model, workload, chosen, parts.num_sms, parts.granularity,
                                          {op: tuple(IMPLS[op]) for op in IMPLS})
        measurer = _Measurer(torch, parts, plan, IMPLS, lambda m: print(m, file=sys.stderr))
        for f in chosen:
            p = _pair_energy_point(torch, measurer, table, f, device, power.WINDOW_S)
            rows.append({"family": f.name, "split": f"{p.sms_a}+{p.sms_b}", "is_best": f.best == next(
                g.best for g in report.families if g.name == f.name), "burst_ratio": f.best.makespan_ms / f.back_to_back_ms,
                "time_ratio": p.time_ms / p.b2b_time_ms, "energy_ratio_raw": p.dynamic_ratio(table.energy.static_power_w, 0.0),
                "energy_ratio": p.dynamic_ratio(table.energy.static_power_w), "point": p.to_dict()})
            print(f"  {f.name} at {p.sms_a}+{p.sms_b}: time {rows[-1]['time_ratio']:.3f}, energy {rows[-1]['energy_ratio']:.3f}",
                  file=sys.stderr, flush=True)
    finally:
        parts.close()
        device.close()
    gpu = torch.cuda.get_device_name(0)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"pair_energy_splits_{datetime.date.today().isoformat()}.json")
    with open(path, "w") as fh:
        json.dump({"gpu_name": gpu, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "command": "python benchmarks/pair_energy_splits.py " + " ".join(sys.argv[1:]),
                   "static_power_w": table.energy.static_power_w, "rows": rows}, fh, indent=1)
    print(f"wrote {path}")
    print(f"{'family':<46}{'split':>8}{'best':>5}{'burst':>7}{'time':>7}{'energy':>8}{'raw':>7}")
    for r in rows:
        print(f"{r['family']:<46}{r['split']:>8}{'*' if r['is_best'] else '':>5}{r['burst_ratio']:>7.3f}"
              f"{r['time_ratio']:>7.3f}{r['energy_ratio']:>8.3f}{r['energy_ratio_raw']:>7.3f}")


if __name__ == "__main__":
    main()
