"""Fuzz the nfsearch command line with >= 1,000 seeded cases and print the counts.

    python benchmarks/fuzz.py [--seed 0] [--random 1200] [--jobs N] [--out results.json]

The cases and the outcome categories are in tests/fuzzcases.py (shared with the CI test
tests/test_fuzz.py). Prints a table of counts per category and case family, then every failing
case (command + first stderr line). Exits 1 if any case failed.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fuzzcases  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random", type=int, default=1200, help="random cases on top of the fixed ones")
    parser.add_argument("--jobs", type=int, default=None, help="cases at a time (default: CPU count, >= 2)")
    parser.add_argument("--family", action="append", help="only these families (repeatable)")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every case's timeout")
    parser.add_argument("--out", type=Path, help="write every case's result as JSON")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temp folder)")
    parser.add_argument("--limit", type=int, default=None, help="list at most this many failing cases")
    args = parser.parse_args()

    cases = fuzzcases.generate(args.seed, args.random, args.family)
    fuzzcases.preload()
    work = args.keep or Path(tempfile.mkdtemp(prefix="nfsearch-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    base, notes = fuzzcases.prepare_base(work / "base")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if done % 50 == 0 or done == total:
            print(f"  {done}/{total} cases, {time.monotonic() - started:.0f} s", file=sys.stderr)

    results = fuzzcases.run_cases(cases, work / "cases", jobs=args.jobs, base=base, progress=progress,
                                  timeout_scale=args.timeout_scale)
    wall_s = time.monotonic() - started
    summary = fuzzcases.summarize(results)
    print(f"nfsearch fuzz: seed {args.seed}, {len(cases)} cases, {wall_s:.0f} s")
    print(fuzzcases.format_table(summary))
    failing = [r for r in results if r.failures]
    if failing:
        print(f"\nfailing cases ({len(failing)}):")
        print(fuzzcases.format_failures(results, args.limit))
    if args.out:
        args.out.write_text(json.dumps({"seed": args.seed, "num_cases": len(cases), "wall_s": round(wall_s, 1),
                                        "summary": summary, "notes": notes,
                                        "results": [r.to_dict() for r in results]}, indent=1) + "\n")
        print(f"wrote {args.out}")
    if not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
