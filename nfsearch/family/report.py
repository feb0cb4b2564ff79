"""What `nfsearch solve --family` and `nfsearch simulate FAMILY.json` print: the per-bucket table and
the family's whole-trace prediction; `simulate` re-checks every plan (verify) and re-judges it."""

from __future__ import annotations

from dataclasses import replace

from nfsearch.cost import make_problem
from nfsearch.errors import NfsearchError
from nfsearch.family.artifact import Family
from nfsearch.family.attention import engine_view, family_kv_dtype, pricing
from nfsearch.family.predict import predict_bucket, predict_trace
from nfsearch.profile import ProfileTable
from nfsearch.simulate import check_and_judge


def table(family: Family) -> list[str]:
    """One line per bucket, then the trace's prediction."""
    total = max(1, family.num_iterations)
    header = (f"{'bucket T/B/S/ctx':>20} {'hits':>6} {'composition (the bucket mean)':<54} {'ms/iter':>8} "
              f"{'seq':>8} {'x':>5} {'J':>6} {'floor':>7} {'attn/L':>7}")
    lines = [header]
    for b in family.buckets:
        p, k = b.prediction, b.bucket
        name = f"{k.max_tokens}/{k.max_decode}/{k.max_segments}/{k.max_context}"
        hits = f"{100 * b.num_iterations / total:.1f}%" if b.num_iterations else "-"
        what = b.composition.describe() + (" (nominal)" if b.is_nominal else "")
        energy = f"{p.energy_j:.2f}" if p.energy_j is not None else "-"
        floor = f"{p.floor_ms:.2f}" if p.floor_ms is not None else "-"
        attn = f"{sum(a['ms'] for a in p.attention_ms.values()):.3f}" if p.attention_ms else "-"
        lines.append(f"{name:>20} {hits:>6} {what[:54]:<54} {p.iteration_ms:>8.2f} {p.sequential_iteration_ms:>8.2f} "
                     f"{p.sequential_iteration_ms / p.iteration_ms:>5.2f} {energy:>6} {floor:>7} {attn:>7}")
    run, pred = family.scheduler_run, family.prediction
    limit = next((b.prediction.power_limit_w for b in family.buckets if b.prediction.power_limit_w), None)
    lines.append(f"ms/iter: {family.model} layers (judged per-layer time x {family.buckets[0].prediction.num_layers}) + "
                 f"LM head roofline; J: the layers' energy per iteration; floor: that energy at the "
                 f"{f'{limit:.0f} W ' if limit else ''}power limit + LM head; attn/L: attention ms per layer, "
                 f"whole ops on the whole GPU")
    lines.append(family.profile.get("attention", {"note": CONTIGUOUS_NOTE})["note"])
    lines.append(f"trace {family.trace['name']} ({run['num_finished']} requests, {run['num_iterations']} iterations, "
                 f"{run['num_real_tokens']:,} tokens): predicted {pred.tokens_per_s:,.0f} tokens/s with the family, "
                 f"{pred.sequential_tokens_per_s:,.0f} with sequential plans ({pred.gpu_s:.1f} s vs "
                 f"{pred.sequential_gpu_s:.1f} s of GPU time)")
    return lines


CONTIGUOUS_NOTE = "attention priced with the contiguous kernels (a family written before paged pricing)"


def rejudged(family: Family, profile: ProfileTable, is_profile_given: bool) -> Family:
    """The family with every bucket's plan verified and its prediction worked out again with `profile`
    (its engine view for the family's KV cache: the paged attention rows where it has them)."""
    profile = engine_view(profile, family_kv_dtype(family))
    buckets = []
    for b in family.buckets:
        plan = b.plan
        try:
            problem = make_problem(plan.model, plan.workload, profile, plan.num_layers)
            check_and_judge(plan, problem.cost, is_profile_given)
        except NfsearchError as exc:
            k = b.bucket
            raise NfsearchError(f"bucket {k.max_tokens}/{k.max_decode}/{k.max_segments}/{k.max_context}: {exc}") from None
        buckets.append(replace(b, prediction=predict_bucket(problem, plan, b.bucket)))
    prediction = predict_trace([(b.num_iterations, b.prediction) for b in buckets],
                               family.scheduler_run["num_real_tokens"])
    return replace(family, buckets=tuple(buckets), prediction=prediction,
                   profile={**family.profile, "attention": pricing(profile, family_kv_dtype(family))})


def solve_family_cmd(is_family, trace_spec, dense_batch, num_requests, profile_path, time_limit_s, threads, seed,
                     chunk, min_gain, output, spec: dict, check_outputs, all_or_none, echo,
                     kv_cache_dtype: str | None = None) -> None:
    """`nfsearch solve --family --trace T --model M [...]`: solve, write, print the table and the solve time."""
    from pathlib import Path

    from nfsearch.family import artifact
    from nfsearch.family.build import DEFAULT_NUM_REQUESTS, solve_family
    if not is_family or not trace_spec:
        raise NfsearchError("--trace, --dense-batch, --num-requests and --kv-cache-dtype go with --family, which "
                            "needs --trace")
    batch_flags = [k for k, v in spec.items() if k not in ("model_ref", "decode_context", "tp_degree", "dtype") and v]
    if batch_flags or spec.get("tp_degree", 1) != 1 or spec.get("dtype", "bf16") != "bf16":
        raise NfsearchError("--family takes its batches from --trace: drop --workload and the batch flags "
                            "(one GPU, bf16)")
    if not spec.get("model_ref"):
        raise NfsearchError("no model: give --model")
    model = spec["model_ref"]
    if output is None:
        output = str(Path("out") / f"{_slug(Path(model).stem if model.endswith('.json') else model)}-"
                                   f"{_slug(trace_spec)}.family.json")
    check_outputs([output], (".json",), may_create_out=True)
    family = solve_family(trace_spec, model, dense_batch=dense_batch,
                          num_requests=num_requests or DEFAULT_NUM_REQUESTS, seed=seed, profile_path=profile_path,
                          time_limit_s=time_limit_s, num_workers=threads, chunk=chunk, min_gain=min_gain,
                          kv_cache_dtype=kv_cache_dtype or "auto", progress=lambda line: echo(f"  {line}", err=True))
    with all_or_none([output]):
        artifact.write(family, output)
    for line in table(family):
        echo(line)
    echo(f"wrote {output}: {len(family.buckets)} bucket plans for dense batch {family.engine.dense_batch}, "
         f"solved in {family.solve['wall_s']:.1f} s on {family.solve['num_workers']} worker(s); "
         f"{family.profile['label']}")


def simulate_family_cmd(family: Family, profile_path, echo) -> None:
    """`nfsearch simulate FAMILY.json`: every plan verified and re-judged, then the table."""
    from nfsearch.cost import default_profile
    from nfsearch.profile import load
    first = family.buckets[0].plan
    profile = load(profile_path) if profile_path else default_profile(first.model, first.workload)
    again = rejudged(family, profile, is_profile_given=profile_path is not None)
    echo(f"plan family for {family.model}, trace {family.trace['name']}: {len(family.buckets)} bucket plans, "
         f"each valid")
    for line in table(again):
        echo(line)


def _slug(name: str) -> str:
    import re
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "family"
