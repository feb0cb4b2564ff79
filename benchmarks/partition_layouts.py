"""Which green-context layouts really build on this GPU (needs CUDA, cuda.bindings and triton).

For every layout of nfsearch.layouts.buildable_layouts (plus a few four-group nested ones): build it
(nfsearch.runtime.partitions.SmPartitions.build), read each green context's SM count back from the
driver, run a %smid kernel on each group's stream and record the SM ids it ran on. Reports which
layouts build, whether their groups are disjoint and of the asked size, whether one interval of the
SM line gets the same SMs whichever layout built it (what the launch list's interval model assumes),
the build time, and what the split flags do. Writes a table to stdout and JSON to $OUT (default
out/).

    python benchmarks/partition_layouts.py
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nfsearch.layouts import Layout, buildable_layouts  # noqa: E402
from nfsearch.runtime.partitions import PartitionError, SmPartitions, check_driver, observed_sm_ids  # noqa: E402


def probe_layout(lay: Layout) -> dict:
    row = {"sizes": list(lay.sizes), "build": lay.build}
    t0 = time.perf_counter()
    try:
        with SmPartitions(mode="green", max_groups=max(3, lay.num_groups)) as parts:
            groups = parts.build(lay)
            row["build_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
            row["driver_sms"] = [parts.sm_count(st) for _, st in groups]
            seen = [observed_sm_ids(st, num_blocks=4096) for _, st in groups]
    except PartitionError as exc:
        row.update(ok=False, error=str(exc))
        return row
    row["seen_sms"] = [len(s) for s in seen]
    row["disjoint"] = all(not (seen[i] & seen[j]) for i in range(len(seen)) for j in range(i + 1, len(seen)))
    row["ok"] = row["disjoint"] and row["seen_sms"] == list(lay.sizes) == row["driver_sms"]
    row["sm_ids"] = {f"{lo}-{hi}": sorted(s) for (lo, hi), s in zip(lay.bounds, seen)}
    return row


def probe_flags(parts: SmPartitions) -> list[dict]:
    cu = parts._cu
    out = []
    for flags in (0, 1, 2):
        for count in (1, 4, 12):
            try:
                groups, nb, rem = check_driver(cu.cuDevSmResourceSplitByCount(1, parts._sm_res, flags, count))
                out.append({"flags": flags, "min_count": count, "group": int(groups[0].sm.smCount),
                            "remainder": int(rem.sm.smCount)})
            except Exception as exc:  # noqa: BLE001 - recorded, not fatal
                out.append({"flags": flags, "min_count": count, "error": str(exc)[:160]})
    return out


def main():
    out_dir = Path(os.environ.get("OUT") or "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    with SmPartitions(mode="green") as parts:
        n, g = parts.num_sms, parts.granularity
        cu = parts._cu
        driver = int(check_driver(cu.cuDriverGetVersion()))
        res = parts._sm_res.sm
        res_fields = {k: int(getattr(res, k)) for k in ("smCount", "minSmPartitionSize", "smCoscheduledAlignment")
                      if hasattr(res, k)}
        flags = probe_flags(parts)
        has_split = hasattr(cu, "cuDevSmResourceSplit")
    lays = buildable_layouts(n, g, 3) + [Layout((8, 8, 8, n - 24), "equal-groups"),
                                         Layout((64, 16, 8, n - 88), "nested")]
    rows = []
    t0 = time.perf_counter()
    for lay in lays:
        rows.append(probe_layout(lay))
    wall = time.perf_counter() - t0
    # one interval, one SM set? (the launch list builds each interval from its own layout)
    by_interval: dict[str, set] = {}
    for r in rows:
        for key, ids in r.get("sm_ids", {}).items():
            by_interval.setdefault(key, set()).add(tuple(ids))
    inconsistent = sorted(k for k, v in by_interval.items() if len(v) > 1)
    # the launch list's model: intervals disjoint on the SM line have disjoint SMs, whichever layouts
    # built them. Count the pairs where that fails.
    flat = [(tuple(int(x) for x in k.split("-")), frozenset(ids)) for k, v in by_interval.items() for ids in v]
    clashes = [(a, b) for i, (a, sa) in enumerate(flat) for (b, sb) in flat[i + 1:]
               if (a[1] <= b[0] or b[1] <= a[0]) and sa & sb]

    print(f"{props.name}: {n} SMs, granularity {g}, driver {driver}, SM resource {res_fields}, "
          f"cuDevSmResourceSplit in bindings: {has_split}")
    print(f"{'layout':<16} {'build':<13} {'ok':<5} {'driver':<16} {'seen':<16} {'ms':>7}  error")
    for r in rows:
        print(f"{str(tuple(r['sizes'])):<16} {r['build']:<13} {str(r['ok']):<5} {str(r.get('driver_sms', '')):<16} "
              f"{str(r.get('seen_sms', '')):<16} {r.get('build_ms', float('nan')):>7}  {r.get('error', '')}")
    built = [r for r in rows if r["ok"]]
    print(f"{len(built)}/{len(rows)} layouts build with disjoint groups of the asked size ({wall:.1f} s)")
    print(f"intervals seen from several layouts: {len(by_interval)}; with differing SM sets: {len(inconsistent)} "
          f"{inconsistent[:12]}")
    print(f"pairs of line-disjoint intervals (any layouts) sharing SMs: {len(clashes)} of "
          f"{len(flat) * (len(flat) - 1) // 2} {clashes[:8]}")
    print("split flags:", flags)
    result = {"gpu": props.name, "num_sms": n, "granularity": g, "driver_version": driver,
              "sm_resource": res_fields, "has_cuDevSmResourceSplit": has_split,
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "num_layouts": len(rows), "num_ok": len(built), "wall_s": round(wall, 2),
              "intervals": len(by_interval), "inconsistent_intervals": inconsistent,
              "line_disjoint_pairs_sharing_sms": len(clashes), "clash_examples": [list(c) for c in clashes[:20]],
              "split_flags": flags,
              "layouts": [{k: v for k, v in r.items() if k != "sm_ids"} for r in rows],
              "sm_ids_front64": {tuple(r["sizes"]).__repr__(): r["sm_ids"].get("0-64")
                                 for r in rows if "sm_ids" in r and "0-64" in r["sm_ids"]}}
    (out_dir / "partition_layouts.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
