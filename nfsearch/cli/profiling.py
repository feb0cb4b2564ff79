"""The profile tables the cost model prices with: profile (measure the kernels on the GPU, or the roofline's
--analytic table) and calibrate (fold measured plan runs into a profile)."""

import click
from click.core import ParameterSource

from nfsearch.cli.common import (
    BATCH_FLAGS,
    GPU_HELP,
    check_outputs,
    echo,
    resolve_specs,
    workload_options,
)
from nfsearch.errors import NfsearchError
from nfsearch.files import read_json
from nfsearch.specs import load_gpu, load_model
from nfsearch.timeline import timeline_from_dict


@click.command()
@workload_options
@click.option("--analytic", "is_analytic", is_flag=True,
              help="Write the roofline table of --gpu instead of measuring (no GPU needed).")
@click.option("--gpu", "gpu_key", default="h100-sxm", show_default=True, help=GPU_HELP + " Used with --analytic.")
@click.option("--gpu-id", type=click.IntRange(0, 63), default=0, show_default=True,
              help="CUDA device to measure on.")
@click.option("--quick", "is_quick", is_flag=True, help="Coarse grid (fewer SM counts and sizes).")
@click.option("--pairs/--no-pairs", "with_pairs", default=True, show_default=True,
              help="Also measure the pair table (ops launched together on every split; see analyze --pairs). With "
                   "--family: the paged attention's pairs with the GEMMs (and decode with prefill) at the buckets' "
                   "shapes on four splits, within --pair-budget.")
@click.option("--net-impls", default="nccl,ce", show_default=True,
              help="Collective impls to measure under TP (comma list): nccl (NCCL on an SM share), ce (copy "
                   "engines: no SM share, its sum a small kernel on the whole GPU; measured where every GPU "
                   "can set it up).")
@click.option("--energy/--no-energy", "with_energy", default=True, show_default=True,
              help="Also measure each op's energy per call (NVML) at the token counts of W1-W3 and the workload, "
                   "the power limit and the static power: the power bound (a few seconds; none without NVML); "
                   "with the pair table, each pair family's energy at its best split against back to back "
                   "(about 1.5 s a family; --no-pairs skips it).")
@click.option("--opt-in-impls", "opt_in_text", default="", metavar="IMPLS",
              help="Also measure these impls, which profile leaves out by default (comma list; cublaslt: cuBLASLt "
                   "told its partition's SM count, faster alone on partitions but more energy per layer in a plan "
                   "under the power cap on an H100; fp8: W8A8 e4m3 GEMMs, which change numerics; paged, paged_fp8kv: "
                   "the engine's paged attention (bf16, fp8 KV cache) over the default grid, which only plan "
                   "families price).")
@click.option("--energy-only", "into_path", type=click.Path(dir_okay=False), metavar="PROFILE",
              help="Measure only the energy, into a copy of this measured profile of the same GPU (its rows kept).")
@click.option("--family", "family_path", type=click.Path(dir_okay=False), metavar="FAMILY.json",
              help="Measure only the engine's paged attention (impl paged, or paged_fp8kv for a family with an fp8 "
                   "KV cache) at this plan family's bucket shapes, on every SM count (--quick: three), its pairs "
                   "with the GEMMs (--no-pairs: none) and, with --energy, each bucket's energy, into a copy of "
                   "--base: the profile `solve --family --profile` prices the engine's attention with.")
@click.option("--base", "base_path", type=click.Path(dir_okay=False), metavar="PROFILE",
              help="With --family: the measured profile of this GPU the rows go into (default: the bundled one "
                   "of the family's model for this GPU).")
@click.option("--pair-budget", "pair_budget_s", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="With --family: estimated GPU seconds for the pair points (default 45); the buckets with the "
                   "fewest iterations lose their pairs first.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Profile table to write: .parquet or .csv.")
def profile(is_analytic, gpu_key, gpu_id, is_quick, with_pairs, net_impls, with_energy, opt_in_text, into_path,
            family_path, base_path, pair_budget_s, output, **spec):
    """Write a profile table: measured on the GPU, or --analytic from a roofline model."""
    if family_path is not None or base_path is not None or pair_budget_s is not None:
        return _profile_family(family_path, base_path, gpu_id, is_quick, with_energy, with_pairs, pair_budget_s,
                               output, spec, is_analytic or into_path is not None or bool(opt_in_text))
    model, workload = resolve_specs(**spec)
    opt_in_impls = _opt_in_impls(opt_in_text)
    if opt_in_impls and (is_analytic or into_path is not None):
        raise NfsearchError("--opt-in-impls adds impls to a measured profile's kernels: not with --analytic or "
                            "--energy-only")
    check_outputs([output], (".parquet", ".csv"))
    net_impls = _net_impls(net_impls)
    if into_path is not None:            # energy only, added to a measured profile (runtime/profiler.add_energy)
        return _profile_energy_only(model, workload, into_path, gpu_id, is_analytic, with_energy, with_pairs, output)
    if is_analytic:
        from nfsearch.roofline import analytic_profile
        table = analytic_profile(model, workload, load_gpu(gpu_key))
    elif workload.tp_degree > 1:             # the shard on GPU 0, the collectives on GPUs 0..N-1
        from nfsearch.runtime.tp_profile import check_gpus, count_gpus, measure_tp_profile
        n = workload.tp_degree
        check_gpus(n, count_gpus())
        if gpu_id != 0:
            raise NfsearchError(f"--tp {n} measures on GPUs 0..{n - 1}; --gpu-id does not apply")
        table = measure_tp_profile(model, workload, n, is_quick=is_quick, output=output,
                                   progress=_progress_bar, with_pairs=with_pairs,
                                   net_impls=net_impls, with_energy=with_energy, opt_in_impls=opt_in_impls)
    else:
        from nfsearch.runtime.device import fp8_support, require_cuda
        require_cuda("nfsearch profile", hint="use --analytic for a roofline table")
        if "fp8" in opt_in_impls and (why := fp8_support(f"cuda:{gpu_id}")):
            raise NfsearchError(f"--opt-in-impls fp8: {why}")
        from nfsearch.runtime.profiler import measure_profile
        table = measure_profile(model, workload, gpu_id=gpu_id, is_quick=is_quick, output=output,
                                progress=_progress_bar, with_pairs=with_pairs, with_energy=with_energy,
                                opt_in_impls=opt_in_impls)
    table.write(output)
    energy = "" if table.energy is None else f", {len(table.energy.points)} energy points"
    echo(f"wrote {output}: {len(table.rows)} rows{energy}, {table.label}, fingerprint {table.fingerprint()}")


def _profile_energy_only(model, workload, into_path, gpu_id, is_analytic, with_energy, with_pairs, output) -> None:
    """`nfsearch profile --energy-only PROFILE -o OUT`: the energy measured into a copy of PROFILE."""
    if is_analytic or not with_energy:
        raise NfsearchError("--energy-only measures energy on the GPU: not with --analytic or --no-energy")
    from nfsearch.profile import load
    base = load(into_path)
    from nfsearch.runtime.device import require_cuda
    require_cuda("nfsearch profile --energy-only")
    from nfsearch.runtime.profiler import add_energy
    table = add_energy(model, workload, base, gpu_id=gpu_id, with_pairs=with_pairs)
    table.write(output)
    points = len(table.energy.points) if table.energy is not None else 0
    pair_points = len(table.energy.pair_points) if table.energy is not None else 0
    echo(f"wrote {output}: the {len(table.rows)} rows of {into_path}, {points} energy points and "
          f"{pair_points} pair energy points, {table.label}, fingerprint {table.fingerprint()}")


def _profile_family(family_path, base_path, gpu_id, is_quick, with_energy, with_pairs, pair_budget_s, output, spec,
                    is_other_mode) -> None:
    """`nfsearch profile --family FAMILY.json [--base PROFILE] [--no-pairs | --pair-budget S] -o OUT`:
    runtime/paged_profile.py."""
    ctx = click.get_current_context()
    given = [flag for name, flag in {**BATCH_FLAGS, "workload_ref": "--workload"}.items()
             if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)]
    if family_path is None:
        raise NfsearchError(f"{'--base' if base_path is not None else '--pair-budget'} goes with --family")
    if given or is_other_mode:
        raise NfsearchError("--family takes its shapes from the family: drop "
                            + (", ".join(given) or "--analytic, --energy-only and --opt-in-impls"))
    from nfsearch.family import artifact
    family = artifact.read(family_path)
    if spec.get("model_ref") and load_model(spec["model_ref"]).name != family.model:
        raise NfsearchError(f"{family_path} is a family of {family.model}, not {spec['model_ref']}")
    check_outputs([output], (".parquet", ".csv"))
    from nfsearch.runtime.device import fp8_support, require_cuda
    require_cuda("nfsearch profile --family")
    if family.memory.get("kv_cache_dtype") == "fp8" and (why := fp8_support(f"cuda:{gpu_id}")):
        raise NfsearchError(f"{family_path} has an fp8 KV cache: {why}")
    from nfsearch.family.attention_plan import PAIR_BUDGET_S
    from nfsearch.plan import ENGINE_IMPLS
    from nfsearch.runtime.paged_profile import measure_family_attention
    table = measure_family_attention(family, base_path, gpu_id=gpu_id, is_quick=is_quick, with_energy=with_energy,
                                     output=output, progress=_progress_bar, family_path=family_path,
                                     with_pairs=with_pairs, pair_budget_s=PAIR_BUDGET_S if pair_budget_s is None
                                     else pair_budget_s)
    table.write(output)
    entry = table.meta["paged_attention"]
    runs, pairs = entry["runs"], (entry.get("pairs") or {}).get("rows", [])
    echo(f"wrote {output}: {len(table.rows)} rows ({int(table.rows['impl'].isin(ENGINE_IMPLS).sum())} paged "
          f"attention, {runs[-1]['impl']} this run), {len(pairs)} paged pair points, {len(entry['energy_points'])} "
          f"paged energy points, {table.label}, fingerprint {table.fingerprint()}; base {runs[-1]['base']}")


def _impl_names(text: str) -> tuple[str, ...]:
    """The names of a comma list, in order, each once."""
    return tuple(dict.fromkeys(i.strip() for i in text.split(",") if i.strip()))


def _opt_in_impls(text: str) -> tuple[str, ...]:
    from nfsearch.plan import OPT_IN_IMPLS
    impls = _impl_names(text)
    if set(impls) - OPT_IN_IMPLS:
        raise NfsearchError(f"--opt-in-impls takes {', '.join(sorted(OPT_IN_IMPLS))}, not {text!r}")
    return impls


def _net_impls(text: str) -> tuple[str, ...]:
    from nfsearch.plan import NETWORK_IMPLS
    impls = _impl_names(text)
    if NETWORK_IMPLS[0] not in impls or set(impls) - set(NETWORK_IMPLS):
        raise NfsearchError(f"--net-impls must list nccl and may add ce, not {text!r}")
    return impls


def _progress_bar(done: int, total: int, eta_s: float, what: str) -> None:
    echo(f"\r  [{done}/{total}] {done / max(total, 1):4.0%} eta {eta_s:5.0f} s  {what[:50]:<50}",
               err=True, nl=done >= total)


@click.command("calibrate")
@click.option("--profile", "profile_path", required=True, type=click.Path(dir_okay=False),
              help="Measured profile the plans were made with (.parquet or .csv); any calibration in it is replaced.")
@click.option("--run", "runs", multiple=True, nargs=2, type=click.Path(dir_okay=False),
              metavar="PLAN MEASURED",
              help="A plan JSON and the measured.json that `nfsearch run --timeline` wrote for it; repeat for more runs.")
@click.option("--from", "from_path", type=click.Path(dir_okay=False),
              help="Instead of --run: carry the calibration of this calibrated profile (another model, same GPU).")
@click.option("--energy", "energy_runs", multiple=True, nargs=2, type=click.Path(dir_okay=False),
              metavar="PLAN RUN_JSON",
              help="A plan JSON and the run.json `nfsearch run` wrote for it (with its power reading): fits the "
                   "energy factor of the power bound; repeat for more runs; with or without --run.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Calibrated profile to write (.parquet or .csv): the same rows, the calibration in its metadata.")
def calibrate_cmd(profile_path, runs, from_path, energy_runs, output):
    """Fold measured plan timelines into a profile: per-op solo and co-run factors, wait and launch gap."""
    from nfsearch import calibrate, plan
    from nfsearch.profile import load
    if (bool(runs) or bool(energy_runs)) == bool(from_path):
        raise NfsearchError("give either --run PLAN MEASURED and/or --energy PLAN RUN_JSON (one or more), or "
                            "--from CALIBRATED_PROFILE")
    check_outputs([output], (".parquet", ".csv"))
    profile = load(profile_path)
    if from_path:
        table, cal = calibrate.transfer(profile, load(from_path))
        table.write(output)
        echo(f"wrote {output}: {cal.label}, carried from {from_path}")
        return
    table, labels = profile, []
    if runs:
        triples = [(plan.read(p), timeline_from_dict(read_json(m), m), f"{p} + {m}") for p, m in runs]
        table, cal, ratios = calibrate.calibrate(table, triples)
        echo(calibrate.format_report(cal, ratios))
        labels.append(cal.label)
    if energy_runs:
        triples = [(plan.read(p), evidence, f"{p} + {source}") for p, r in energy_runs
                   for evidence, source in calibrate.energy_evidence(read_json(r), r)]
        table, ecal = calibrate.calibrate_energy(table, triples)
        echo(calibrate.format_energy_report(ecal))
        labels.append(ecal.label)
    table.write(output)
    echo(f"wrote {output}: {'; '.join(labels)}")
