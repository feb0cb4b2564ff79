"""`nfsearch tune --family FAMILY.json --model M --trace T`: measure each bucket's plan against the same
plan op by op on one live engine (`bench --plans F --compare`), then keep the faster per bucket
(nfsearch.family.tune decides and writes, torch-free).
"""

from __future__ import annotations

from nfsearch.family import artifact
from nfsearch.family import tune as family_tune
from nfsearch.family.artifact import Family
from nfsearch.runtime.bench_engine import COMPARE_EVERY, BenchOptions, run_bench
from nfsearch.serving.model_config import load_model_config


def tune_family(family_path: str, model: str, trace: str, num_requests: int | None, *, device: str = "cuda",
                seed: int = 0, profile_path: str | None = None, compare_every: int | None = None,
                min_iterations: int = family_tune.MIN_ITERATIONS, echo=print,
                progress: bool = True) -> tuple[Family, dict, list[str]]:
    """(the tuned family, the bench report of the measuring run, the per-bucket lines to print)."""
    family = artifact.read(family_path)
    opts = BenchOptions(model, trace, num_requests, device=device, is_compare=True, seed=seed,
                        with_op_trace=False, plans=family_path, compare_every=compare_every)
    report = run_bench(opts, echo=echo, progress=progress)
    compares = [family_tune.BucketCompare.from_dict(r["compare"]) for r in report["family"]["buckets"]]
    every = compare_every or COMPARE_EVERY
    run = {"trace": report["trace"]["name"], "num_requests": report["trace"]["num_requests"],
           "device": report["gpu"], "every_iterations": every}
    make = family_tune.sequential_maker(family, load_model_config(model).spec, profile_path)
    tuned = family_tune.tuned_family(family, compares, make, run, min_iterations)
    kept = {b.bucket: family_tune.Choice(b.tune["kept"], b.tune["reason"]) for b in tuned.buckets}
    lines = family_tune.format_compare(compares, [kept[c.bucket] for c in compares])
    return tuned, report, lines
