"""Score `nfsearch tune` outputs: how close each candidate's prediction came to its measured time.

    python benchmarks/score_tune.py OUT/best.tune.json [MORE.tune.json ...] [--within 0.05] [--json OUT]

For every candidate of every <stem>.tune.json (what `nfsearch tune -o <stem>.json` writes beside its
best plan) it prints: the interleaved median `tune` chose by (the candidates timed against each other
in one process, [min-max] of the rounds), the candidate's prediction from its own report (max(replay,
the plan's power bound) where the profile had energy, else the replay) with its error, the replay
alone, the energy per layer of its sustained loop, and, for the candidate the baselines were timed
beside, seq-same and seq-torch as baseline / plan. Last, per file and over all files, how many
predictions came within --within (default 5%) and the largest error. Works for one GPU and for TP
reports alike. CPU only: it reads JSON and measures nothing.

Error is (predicted - measured) / measured; "measured" is the interleaved median where the file has
one, else the candidate's own run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _interleaved(candidates: list[dict]) -> dict:
    for c in candidates:
        timings = (c.get("interleaved") or {}).get("timings")
        if timings:
            return timings
    return {}


def _own_ms(c: dict) -> float | None:
    """The candidate's own run: TP reports carry measured_layer_ms, single-GPU ones derived/plan."""
    if c.get("measured_layer_ms") is not None:
        return c["measured_layer_ms"]
    derived = c.get("derived") or {}
    if derived.get("measured_layer_ms") is not None:
        return derived["measured_layer_ms"]
    return (c.get("plan") or {}).get("layer_ms")


def _baseline_ms(c: dict, name: str) -> float | None:
    base = c.get("baselines") or {}
    b = base.get(name) or base.get(name.replace("-", "_"))
    if isinstance(b, dict):
        return b.get("layer_ms")
    return b if isinstance(b, (int, float)) else None


def _energy_j(c: dict) -> float | None:
    power = c.get("power") or {}
    if power.get("energy_per_layer_j") is not None:
        return power["energy_per_layer_j"]
    ranks = power.get("ranks") or []
    values = [(r.get("plan") or {}).get("energy_per_layer_j") for r in ranks]     # TP: the dearest rank
    values = [v for v in values if v is not None]
    return max(values) if values else None


def score(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    candidates = data.get("candidates") or []
    timings = _interleaved(candidates)
    rows = []
    for c in candidates:
        name = c.get("candidate", "?")
        t = timings.get(name) or {}
        measured = t.get("layer_ms") or _own_ms(c)
        predicted = c.get("predicted_layer_ms")
        own = _own_ms(c)
        row = {"file": str(path), "candidate": name, "kept": name == data.get("best"),
               "gpu": c.get("gpu"), "tp_degree": c.get("tp_degree") or 1, "model": c.get("model"),
               "workload": c.get("workload"), "measured_ms": measured,
               "measured_min_ms": t.get("min_layer_ms"), "measured_max_ms": t.get("max_layer_ms"),
               "predicted_ms": predicted, "replay_ms": c.get("replay_layer_ms"),
               "error": (predicted - measured) / measured if predicted and measured else None,
               "energy_per_layer_j": _energy_j(c)}
        for label in ("seq-same", "seq-torch"):
            b = _baseline_ms(c, label)
            row[label] = b
            row[f"{label} x"] = b / own if b and own else None
        rows.append(row)
    return rows


def _f(v, fmt="{:.3f}", none="-"):
    return none if v is None else fmt.format(v)


def summary(rows: list[dict], within: float) -> str:
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    if not errors:
        return "no candidate has both a prediction and a measured time"
    hits = sum(e <= within for e in errors)
    return f"within {within:.0%}: {hits} of {len(errors)}; max |error| {max(errors):.1%}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="<stem>.tune.json files written by nfsearch tune")
    ap.add_argument("--within", type=float, default=0.05, help="error counted as a hit (default 0.05)")
    ap.add_argument("--json", type=Path, help="write every row as JSON")
    args = ap.parse_args()
    all_rows = []
    for path in args.files:
        try:
            rows = score(path)
        except (OSError, ValueError) as exc:
            print(f"score_tune: error: {path}: {exc}", file=sys.stderr)
            return 2
        first = rows[0] if rows else {}
        print(f"== {path}: {first.get('model')} {first.get('workload')} on {first.get('gpu')}"
              f"{' x' + str(first.get('tp_degree')) if (first.get('tp_degree') or 1) > 1 else ''}")
        print(f"{'candidate':<26} {'measured [min-max]':<24} {'predicted (error)':<19} {'replay':>7} "
              f"{'J/layer':>8} {'seq-same (x)':>14} {'seq-torch (x)':>14}")
        for r in rows:
            spread = (f" [{r['measured_min_ms']:.3f}-{r['measured_max_ms']:.3f}]"
                      if r["measured_min_ms"] is not None else "")
            pred = f"{_f(r['predicted_ms'])} ({_f(r['error'], '{:+.1%}')})"
            same = f"{_f(r['seq-same'])} ({_f(r['seq-same x'], '{:.2f}')})" if r["seq-same"] else "-"
            torch_ = f"{_f(r['seq-torch'])} ({_f(r['seq-torch x'], '{:.2f}')})" if r["seq-torch"] else "-"
            name = r["candidate"] + (" *" if r["kept"] else "")
            print(f"{name[:26]:<26} {_f(r['measured_ms']) + spread:<24} {pred:<19} {_f(r['replay_ms']):>7} "
                  f"{_f(r['energy_per_layer_j']):>8} {same:>14} {torch_:>14}")
        print(f"  {summary(rows, args.within)}   (* = kept by tune)")
        all_rows += rows
    if len(args.files) > 1:
        print(f"all files: {summary(all_rows, args.within)}")
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
