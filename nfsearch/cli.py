"""The command line: one thin command per verb (parse and check flags, call the library, print).

Where outputs go, one rule for every verb: a file named with -o/--out goes exactly there (its folder
must exist); without it, outputs go into ./out/ (created on demand, ignored by git), named after the
command's input.
"""

import dataclasses
import json
import math
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from click.core import ParameterSource

# Light modules only up here: the pipeline stages (pandas, OR-Tools, jsonschema, torch behind them)
# are imported by the commands that use them, so `nfsearch --help` and a bad flag answer at once.
from nfsearch import report as report_mod
from nfsearch.compare import compare, format_table
from nfsearch.errors import NfsearchError
from nfsearch.files import read_json, write_text_atomic
from nfsearch.specs import (
    DTYPE_BYTES,
    load_gpu,
    load_model,
    load_workload,
    parse_lengths,
    workload_from_flags,
)
from nfsearch.timeline import timeline_from_dict, timeline_to_dict

OUT_DIR = Path("out")
MAX_SEED = 2**31 - 1
MAX_TIME_LIMIT_S = 3600.0


class _Interrupted(Exception):
    """Ctrl-C inside a command; carried past click (which would print its own lines) to main."""


class _Group(click.Group):
    """Every failure a user can cause is one line `nfsearch: error: ...` on stderr: click's usage errors
    and NfsearchError exit 2, an interrupt exits 130; never a traceback or click's multi-line usage."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted() from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:                 # a caller that handles click's exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name or "nfsearch", complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as exc:         # a bare `nfsearch`: show the help, it is not a mistake
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _fail(exc.format_message() + where, 2)
        except click.ClickException as exc:
            _fail(exc.format_message(), 2)
        except NfsearchError as exc:
            _fail(str(exc), 2)
        except (_Interrupted, KeyboardInterrupt, click.exceptions.Abort):
            _fail("interrupted (outputs are written whole or not at all)", 130)
        sys.exit(code if isinstance(code, int) else 0)


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _fail(message: str, code: int):
    _echo("nfsearch: error: " + " ".join(str(message).split()), err=True)
    sys.exit(code)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange lets nan through (every comparison with nan is false); this refuses it."""

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


@click.group(name="nfsearch", cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                                            "max_content_width": 100})
@click.version_option(package_name="nfsearch", help="Print the version and exit.")
def main():
    """Find and run NanoFlow-style intra-GPU overlap schedules for LLM serving.

    \b
    analyze -> profile -> solve -> simulate   (no GPU needed with a bundled or --analytic profile)
    run, tune, compare                        (on a CUDA GPU)
    check [--update]                          (re-solve the golden cases against re-scored goldens)

    Without -o, outputs go into ./out/, named after their input.
    """


# ---- model + workload flags -----------------------------------------------------------------------

# the flags that describe a batch; a named --workload already fixes all of them
_BATCH_FLAGS = {"num_decode": "--decode", "decode_context": "--context", "prefill": "--prefill",
                "tp_degree": "--tp", "dtype": "--dtype", "decode_contexts": "--decode-contexts",
                "prefill_prefix": "--prefill-prefix"}


def workload_options(f):
    """--model, and --workload (W1-W7 or a YAML file) or the flags that describe a dense batch."""
    options = [
        click.option("--model", "model_ref",
                     help="Bundled name (e.g. llama-3-8b), model YAML, or HuggingFace config.json "
                          "(default: the workload's model)."),
        click.option("--workload", "workload_ref",
                     help="W1-W7 or a workload YAML file; or describe the batch with --decode/--prefill instead."),
        click.option("--decode", "num_decode", type=click.IntRange(0, 2**20),
                     help="Decode requests in the batch (instead of --workload)."),
        click.option("--context", "decode_context", type=click.IntRange(1, 2**22), default=1024, show_default=True,
                     help="Average context of a decode request, in tokens."),
        click.option("--decode-contexts", "decode_contexts", default="",
                     help="Each decode request's context, comma separated (e.g. 1000,1200,96): the batch an "
                          "engine forms; --decode may be left out and --context is their mean."),
        click.option("--prefill", "prefill", default="",
                     help="Prompt (or prefill chunk) lengths in tokens, comma separated (e.g. 512,512)."),
        click.option("--prefill-prefix", "prefill_prefix", default="",
                     help="Per --prefill chunk, the tokens of its request already cached before it (chunked "
                          "prefill), comma separated (e.g. 0,1024; default none)."),
        click.option("--tp", "tp_degree", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="Tensor-parallel degree."),
        click.option("--dtype", type=click.Choice(sorted(DTYPE_BYTES)), default="bf16", show_default=True,
                     help="Weight and activation type."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def resolve_specs(model_ref, workload_ref, num_decode, decode_context, prefill, tp_degree, dtype,
                  decode_contexts="", prefill_prefix=""):
    """The model and workload the flags name; refuses batch flags a named workload would ignore."""
    ctx = click.get_current_context()
    is_given = lambda name: ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)
    if workload_ref:
        given = [flag for name, flag in _BATCH_FLAGS.items() if is_given(name)]
        if given:
            raise NfsearchError(f"--workload {workload_ref} fixes the batch, so {', '.join(given)} would be ignored: "
                                f"drop {'it' if len(given) == 1 else 'them'}, or describe the whole batch with "
                                f"--decode/--context/--prefill/--tp/--dtype instead of --workload")
        workload = load_workload(workload_ref)
    elif num_decode is not None or prefill or decode_contexts:
        contexts = parse_lengths(decode_contexts, "--decode-contexts")
        prefixes = parse_lengths(prefill_prefix, "--prefill-prefix", may_be_zero=True)
        context = None if contexts and not is_given("decode_context") else decode_context
        workload = workload_from_flags(num_decode or 0, context, parse_lengths(prefill, "--prefill"), tp_degree,
                                       dtype, contexts, prefixes)
    else:
        raise NfsearchError("no workload: give --workload W1..W7|FILE or --decode/--prefill flags")
    model_ref = model_ref or workload.model
    if not model_ref:
        raise NfsearchError("no model: give --model")
    return load_model(model_ref), workload


# ---- analyze / profile / solve / simulate / check -------------------------------------------------

_GPU_HELP = "Bundled GPU: h100-sxm, h200 or a100-sxm."


@main.command()
@workload_options
@click.option("--gpu", "gpu_key", default="h100-sxm", show_default=True, help=_GPU_HELP)
@click.option("--pairs", "pairs_path", type=click.Path(dir_okay=False),
              help="Instead: the pair table of this measured profile (per pair of ops, the best SM split "
                   "vs the two back to back on the whole GPU); with --tp N > 1, collectives x GEMMs and decode attention.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="With --pairs: also write the report as JSON.")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False),
              help="The roofline on this profile's GPU rates (default: the bundled table's of the model on "
                   "--gpu, as solve uses; else --gpu's figures): the bound solve and simulate state.")
def analyze(gpu_key, pairs_path, json_path, profile_path, **spec):
    """FLOPs, bytes, T_compute, T_mem, T_net, TR, the roofline bound and optimal tokens/s of one layer."""
    if pairs_path or json_path:
        from nfsearch.pairs import analyze_pairs
        ctx = click.get_current_context()
        given = tuple(p.opts[0] for p in ctx.command.params if p.name not in ("pairs_path", "json_path", "tp_degree")
                      and ctx.get_parameter_source(p.name) not in (None, ParameterSource.DEFAULT))
        _echo(analyze_pairs(pairs_path, json_path, spec["tp_degree"], given))
        return
    from nfsearch.cost import default_gpu
    from nfsearch.graph import memory_need
    from nfsearch.profile import gpu_from_profile, load
    from nfsearch.roofline import roofline
    model, workload = resolve_specs(**spec)
    gpu = gpu_from_profile(load(profile_path)) if profile_path else default_gpu(model, workload, gpu_key)
    r = roofline(model, workload, gpu)
    batch = (f"{workload.name} ({workload.num_tokens} tokens, {workload.num_decode} decode, "
             f"TP={workload.tp_degree}, {workload.dtype})")
    figures = (f"{gpu.name}: {gpu.peak_tflops:g} TFLOP/s, {gpu.mem_bandwidth_tbps:g} TB/s, "
               f"{gpu.net_bandwidth_gbps:g} GB/s net ({gpu.figures_source})")
    rows = [("model", model.name), ("workload", batch), ("gpu", figures),
            ("FLOPs per layer", f"{r.flops / 1e9:.1f} GFLOP"),
            ("bytes per layer", f"{r.num_bytes / 1e9:.3f} GB"),
            ("network bytes per layer", f"{r.net_bytes / 1e6:.1f} MB"),
            ("T_compute", f"{r.compute_ms:.3f} ms"), ("T_mem", f"{r.mem_ms:.3f} ms"),
            ("T_net", f"{r.net_ms:.3f} ms"), ("TR = T_mem / T_compute", f"{r.ratio:.2f}"),
            ("roofline bound per layer", f"{r.bound_ms:.3f} ms"),
            ("memory", memory_need(model, workload).describe(gpu.memory_bytes)),
            ("optimal throughput", f"{r.tokens_per_s:,.0f} tokens/s ({model.num_layers} layers)")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        _echo(f"{key:<{width}}  {value}")


@main.command()
@workload_options
@click.option("--analytic", "is_analytic", is_flag=True,
              help="Write the roofline table of --gpu instead of measuring (no GPU needed).")
@click.option("--gpu", "gpu_key", default="h100-sxm", show_default=True, help=_GPU_HELP + " Used with --analytic.")
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
    _check_outputs([output], (".parquet", ".csv"))
    net_impls = _net_impls(net_impls)
    if into_path is not None:            # energy only, added to a measured profile (runtime/profiler.add_energy)
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
        _echo(f"wrote {output}: the {len(table.rows)} rows of {into_path}, {points} energy points and "
              f"{pair_points} pair energy points, {table.label}, fingerprint {table.fingerprint()}")
        return
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
        from nfsearch.runtime.device import require_cuda
        require_cuda("nfsearch profile")
        from nfsearch.runtime.profiler import measure_profile
        table = measure_profile(model, workload, gpu_id=gpu_id, is_quick=is_quick, output=output,
                                progress=_progress_bar, with_pairs=with_pairs, with_energy=with_energy,
                                opt_in_impls=opt_in_impls)
    table.write(output)
    energy = "" if table.energy is None else f", {len(table.energy.points)} energy points"
    _echo(f"wrote {output}: {len(table.rows)} rows{energy}, {table.label}, fingerprint {table.fingerprint()}")


def _profile_family(family_path, base_path, gpu_id, is_quick, with_energy, with_pairs, pair_budget_s, output, spec,
                    is_other_mode) -> None:
    """`nfsearch profile --family FAMILY.json [--base PROFILE] [--no-pairs | --pair-budget S] -o OUT`:
    runtime/paged_profile.py."""
    ctx = click.get_current_context()
    given = [flag for name, flag in {**_BATCH_FLAGS, "workload_ref": "--workload"}.items()
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
    _check_outputs([output], (".parquet", ".csv"))
    from nfsearch.runtime.device import require_cuda
    require_cuda("nfsearch profile --family")
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
    _echo(f"wrote {output}: {len(table.rows)} rows ({int(table.rows['impl'].isin(ENGINE_IMPLS).sum())} paged "
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


_TIME_LIMIT = FiniteFloatRange(0.0, MAX_TIME_LIMIT_S, min_open=True)


@main.command()
@workload_options
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False),
              help="Profile table (default: the bundled H100 table of the model, else an analytic one).")
@click.option("--solver", type=click.Choice(["auto", "cpsat", "gurobi"]), default="auto", show_default=True,
              help="Stage-2 backend; auto takes Gurobi when licensed, else CP-SAT.")
@click.option("--time-limit", "time_limit_s", type=_TIME_LIMIT, default=8.0, show_default=True,
              help="Stage-2 time limit in seconds (CP-SAT: deterministic work units of about a second).")
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True,
              help="Solver threads; fix it with --seed for a reproducible plan.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Solver random seed.")
@click.option("--layers", "num_layers", type=click.IntRange(1, 1000), default=2, show_default=True,
              help="Layers unrolled, so one layer's tail can overlap the next one's head.")
@click.option("--chunk", type=click.IntRange(1, 65536), default=128, show_default=True,
              help="Nano-batch size granularity in tokens.")
@click.option("--allow-extrapolation", is_flag=True,
              help="No longer needed (accepted, no effect): sizes and contexts outside the profile's "
                   "measured grid scale by the roofline's shape from the nearest measured point, and say so.")
@click.option("--min-gain", type=FiniteFloatRange(0.0, 1.0, max_open=True), default=0.04, show_default=True,
              help="Keep an overlapped plan only if predicted at least this much faster than the sequential "
                   "plan (0.04 = 4%, at least the model's measured errors of 1.5-3.8% on an overlapped / "
                   "sequential ratio); else write the sequential plan.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Plan JSON to write (default: out/<model>-<workload>.json, or out/<model>-<trace>.family.json).")
@click.option("--family", "is_family", is_flag=True,
              help="One plan per engine bucket for --trace's batches, written as one plan family JSON "
                   "(--threads: buckets solved at once).")
@click.option("--trace", "trace_spec", help="With --family: E1-E4, const:IN:OUT, splitwise, lmsys, sharegpt or a .jsonl file.")
@click.option("--dense-batch", type=click.IntRange(1, 65536),
              help="With --family: the engine's dense batch (default: from memory, as the engine chooses it).")
@click.option("--num-requests", type=click.IntRange(1, 10_000_000), help="With --family: requests of the trace (default 2000).")
@click.option("--kv-cache-dtype", type=click.Choice(["auto", "fp8"]),
              help="With --family: the engine's KV cache dtype (default auto; fp8 holds more tokens, so the "
                   "engine may choose another dense batch and buckets).")
def solve(profile_path, solver, time_limit_s, threads, seed, num_layers, chunk, allow_extrapolation, min_gain,
          output, is_family, trace_spec, dense_batch, num_requests, kv_cache_dtype, **spec):
    """Search a schedule (stage 1 structure, stage 2 SM allocation) and write the plan JSON."""
    from nfsearch import plan, search
    if is_family or trace_spec or dense_batch or num_requests or kv_cache_dtype:
        from nfsearch.family.report import solve_family_cmd
        return solve_family_cmd(is_family, trace_spec, dense_batch, num_requests, profile_path, time_limit_s, threads,
                                seed, chunk, min_gain, output, spec, _check_outputs, _all_or_none, _echo,
                                kv_cache_dtype)
    model, workload = resolve_specs(**spec)
    if output is None:
        output = str(OUT_DIR / f"{_slug(model.name)}-{_slug(workload.name)}.json")
    _check_outputs([output], (".json",), may_create_out=True)
    output = Path(output)
    problem = _problem(model, workload, profile_path, num_layers, allow_extrapolation)
    # the stage log goes out live as progress; the returned notes repeat it, so they are not printed
    schedule, _notes = search.solve(problem, solver=solver, time_limit_s=time_limit_s, threads=threads,
                                    seed=seed, chunk=chunk, min_gain=min_gain,
                                    progress=lambda msg: _echo(f"  {msg}", err=True))
    with _all_or_none([output]):
        plan.write(schedule, output)
    from nfsearch.simulate import judge
    p = schedule.predicted
    seq, bound = p.sequential_layer_time_ms, p.bound_ms
    judged, power = judge(schedule, problem.cost), problem.cost.power_bound()
    layer, own = judged.replayed_layer_ms, judged.power_bound
    if own is None or own.bound_ms <= layer:
        capped = ""
    elif own.bound_ms == power.bound_ms:
        capped = f"; power-bound at {power.bound_ms:.3f} ms, plan and sequential alike"
    else:
        capped = (f"; power-bound at {own.bound_ms:.3f} ms with its overlaps' measured energy, sequential at "
                  f"{power.bound_ms:.3f}")
    _echo(f"wrote {output}: per layer: {layer:.3f} ms replayed vs sequential {seq:.3f} ms ({seq / layer:.2f}x{capped}); "
               f"roofline bound {bound:.3f} ms (the plan reaches {bound / layer:.0%} of it); solver "
               f"{schedule.solver.name}, {_gap_line(schedule.solver)}; {problem.profile.label}")


@main.command()
@click.argument("plan_path", type=click.Path(dir_okay=False))
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False),
              help="Replay with this profile table (default: the bundled one; it must be the plan's own "
                   "unless named here).")
@click.option("-o", "--output", "out_prefix", type=click.Path(),
              help="Output prefix for .html, .png, .trace.json (default: out/<plan stem>.sim).")
@click.option("--allow-extrapolation", is_flag=True,
              help="No longer needed (accepted, no effect): sizes and contexts outside the profile's "
                   "measured grid scale by the roofline's shape from the nearest measured point, and say so.")
def simulate(plan_path, profile_path, out_prefix, allow_extrapolation):
    """Check a plan's constraints, replay it through the cost model, write Gantt and trace."""
    from nfsearch import plan
    from nfsearch.family import artifact
    from nfsearch.simulate import check_and_judge, corun_sources, power_line, sources_line
    data = read_json(plan_path)
    if artifact.is_family(data):
        from nfsearch.family.report import simulate_family_cmd
        return simulate_family_cmd(artifact.from_dict(data, plan_path), profile_path, _echo)
    schedule = plan.from_dict(data, plan_path)
    if out_prefix is not None:
        if not out_prefix:
            raise NfsearchError("output prefix is empty")
        _check_outputs([out_prefix + ".html"], ())               # a name that cannot be printed, as given
    prefix = _simulate_prefix(plan_path, out_prefix)
    paths = [prefix.with_name(prefix.name + suffix) for suffix in (".html", ".png", ".trace.json")]
    _check_outputs(paths, (), may_create_out=out_prefix is None)     # all three before any is written
    problem = _problem(schedule.model, schedule.workload, profile_path, schedule.num_layers, allow_extrapolation)
    result = check_and_judge(schedule, problem.cost, is_profile_given=profile_path is not None)
    if problem.profile.fingerprint() != schedule.profile.fingerprint:
        _echo(f"note: plan was made with profile {schedule.profile.fingerprint}, replaying with "
                   f"{problem.profile.fingerprint()} ({problem.profile.label})", err=True)
    title = f"{schedule.model.name} {schedule.workload.name} on {schedule.gpu.name}"
    power = power_line(result, problem.cost)
    with _all_or_none(paths):
        written = report_mod.write_all([result.replay.timeline], prefix, title, (power,))
    p = schedule.predicted
    seq, bound = p.sequential_layer_time_ms, p.bound_ms
    layer = result.replayed_layer_ms
    _echo(f"plan {plan_path}: valid ({len(schedule.nano_ops)} nano-ops, {len(schedule.streams)} streams, "
               f"{schedule.num_layers} layers)")
    _echo(f"per layer: replayed layer time {layer:.3f} ms (plan states {p.layer_time_ms:.3f}); "
               f"sequential {seq:.3f} ms -> {seq / layer:.2f}x; roofline bound {bound:.3f} ms -> {bound / layer:.0%}")
    _echo(power)
    sources = sources_line(corun_sources(schedule, problem.cost))
    if sources:
        _echo(sources)
    _echo("wrote " + ", ".join(str(path) for path in written.values()))


@main.command()
@click.option("--cases", "cases_file", type=click.Path(dir_okay=False), default="tests/golden/cases.yaml",
              show_default=True, help="Golden cases file (model, workload, profile -> committed golden plan).")
@click.option("--tolerance", type=FiniteFloatRange(0.0, 1.0),
              help="Allowed makespan regression as a fraction, e.g. 0.02 (default: the cases file's).")
@click.option("--update", is_flag=True,
              help="Replace a golden plan only by a re-solved plan that is better under today's model "
                   "(or where the golden can no longer be replayed); says what it did per case.")
def check(cases_file, tolerance, update):
    """Re-solve the golden cases and compare each with its golden re-scored under today's model;
    exit 1 with a diff when a plan is invalid or got worse."""
    from nfsearch.golden import run_check, update_goldens
    if update:
        for line in update_goldens(cases_file, progress=lambda msg: _echo(f"  {msg}", err=True)):
            _echo(line)
        return
    result = run_check(cases_file, tolerance, progress=lambda msg: _echo(f"  {msg}", err=True))
    _echo(result.report())
    if not result.ok:
        sys.exit(1)


# ---- run / compare / tune: execute plans on the GPU (nfsearch.runtime.executor) ------------------

def _run_options(f):
    options = [
        click.option("--mode", type=click.Choice(["green", "grid"]), default="green", show_default=True,
                     help="green: SM partitions per launch (green contexts); grid: plain streams, "
                          "SM-bounded grids only."),
        click.option("--iters", type=click.IntRange(1, 10000), default=30, show_default=True,
                     help="Timed graph replays (median)."),
        click.option("--no-graph", "no_graph", is_flag=True, help="Time eager launches instead of a CUDA graph."),
        click.option("--force", is_flag=True, help="Run a plan made for another GPU or profile."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command("run")
@click.option("--schedule", "plan_path", required=True, type=click.Path(dir_okay=False), help="Plan JSON to run.")
@click.option("--layers", "num_layers", type=click.IntRange(1, 1000),
              help="Layers to run (must be the plan's unrolled layers).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Output folder (default: out/run-<plan stem>).")
@click.option("--timeline", "with_timeline", is_flag=True,
              help="Also measure per-op start/end (kernel trace of CUDA-graph replays) and write Gantt/Perfetto + measured.json.")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False),
              help="Profile the plan must have been made with.")
@_run_options
def run_cmd(plan_path, num_layers, out_dir, with_timeline, profile_path, mode, iters, no_graph, force):
    """Check a plan's output against the sequential reference, time it beside seq-torch and seq-same."""
    from nfsearch import plan
    schedule = plan.read(plan_path)
    if num_layers is not None and num_layers != schedule.num_layers:
        raise NfsearchError(f"{plan_path}: the plan unrolls {schedule.num_layers} layers, not {num_layers}; "
                            f"solve it again with --layers {num_layers}")
    if profile_path:
        from nfsearch.profile import load
        table = load(profile_path)
        if not force:
            _check_profile(schedule, table, plan_path)
    if out_dir is not None and not out_dir.strip():
        raise NfsearchError("--out is empty")
    out = Path(out_dir) if out_dir is not None else OUT_DIR / f"run-{Path(plan_path).stem}"
    if out.exists() and not out.is_dir():
        raise NfsearchError(f"{out}: cannot write (a file is in the way of the output folder)")
    if out.is_dir():
        _check_outputs([out / "run.json", out / "measured.json"], ())
    from nfsearch.runtime.device import check_device, require_cuda
    require_cuda("nfsearch run")
    check_device(schedule, plan_path, force)
    if schedule.workload.tp_degree > 1:      # one process per GPU, NCCL (nfsearch.runtime.tp)
        from nfsearch.runtime import tp
        report = tp.run_plan(plan_path, mode=mode, iters=iters, use_graph=not no_graph, timeline=with_timeline,
                             progress=lambda m: _echo(f"  {m}", err=True), profile=table if profile_path else None)
        if report is None:                   # another rank of a torchrun job: rank 0 writes the report
            return
        report["command"] = " ".join(["nfsearch"] + sys.argv[1:])
        measured = report.pop("timeline", None)          # rank 0's, timeline_to_dict form
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "run.json", report)
        if measured is not None:
            from nfsearch.simulate import stated_timeline
            _write_json(out / "measured.json", measured)
            try:
                report_mod.write_all([stated_timeline(schedule), timeline_from_dict(measured, "rank 0")],
                                     out / "timeline", f"{schedule.model.name} {schedule.workload.name} on "
                                     f"{report['tp_degree']}x {report['gpu']} (rank 0)")
            except ImportError as exc:
                _echo(f"note: no Gantt written ({exc}); measured.json has the timeline", err=True)
        for note in report.get("notes", []):
            if note.startswith("timeline:"):
                _echo(f"note: {note}", err=True)
        _echo(tp.format_line(report))
        for line in tp.power_lines(report):
            _echo(line)
        _echo(f"wrote {out / 'run.json'}" + (f", {out / 'measured.json'}" if measured is not None else ""))
        return
    from nfsearch.runtime import executor
    report = executor.execute(schedule, mode=mode, iters=iters, use_graph=not no_graph, timeline=with_timeline,
                              profile=table if profile_path else None,
                              progress=lambda m: _echo(f"  {m}", err=True))
    report = dataclasses.replace(report, command=" ".join(["nfsearch"] + sys.argv[1:]), plan_path=str(plan_path))
    measured = report.timeline
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "run.json", report.to_dict())
    if measured is not None:
        from nfsearch.simulate import stated_timeline
        _write_json(out / "measured.json", timeline_to_dict(measured))
        try:
            report_mod.write_all([stated_timeline(schedule), measured], out / "timeline",
                                 f"{schedule.model.name} {schedule.workload.name} on {report.gpu}")
        except ImportError as exc:
            _echo(f"note: no Gantt written ({exc}); measured.json has the timeline", err=True)
    for note in report.notes:
        _echo(f"note: {note}", err=True)
    _echo(executor.format_table([report]))
    _echo(f"wrote {out / 'run.json'}" + (f", {out / 'measured.json'}" if measured is not None else ""))


@main.command("compare")
@click.argument("plan_path", type=click.Path(dir_okay=False))
@click.argument("measured_path", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Also write the comparison as JSON here.")
@click.option("--worst", type=click.IntRange(0, 10000), default=5, show_default=True,
              help="How many of the worst-predicted ops to list.")
def compare_cmd(plan_path, measured_path, output, worst):
    """Per-op predicted (the plan's times) vs measured (a run's measured.json) error."""
    from nfsearch import plan
    from nfsearch.simulate import stated_timeline
    if output is not None:
        _check_outputs([output], (".json",))
    schedule = plan.read(plan_path)
    measured = timeline_from_dict(read_json(measured_path), measured_path)
    cmp = compare(stated_timeline(schedule), measured)
    _echo(format_table(cmp, worst))
    if output is not None:
        _write_json(output, cmp.to_dict())


@main.command("calibrate")
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
    _check_outputs([output], (".parquet", ".csv"))
    profile = load(profile_path)
    if from_path:
        table, cal = calibrate.transfer(profile, load(from_path))
        table.write(output)
        _echo(f"wrote {output}: {cal.label}, carried from {from_path}")
        return
    table, labels = profile, []
    if runs:
        triples = [(plan.read(p), timeline_from_dict(read_json(m), m), f"{p} + {m}") for p, m in runs]
        table, cal, ratios = calibrate.calibrate(table, triples)
        _echo(calibrate.format_report(cal, ratios))
        labels.append(cal.label)
    if energy_runs:
        triples = [(plan.read(p), evidence, f"{p} + {source}") for p, r in energy_runs
                   for evidence, source in calibrate.energy_evidence(read_json(r), r)]
        table, ecal = calibrate.calibrate_energy(table, triples)
        _echo(calibrate.format_energy_report(ecal))
        labels.append(ecal.label)
    table.write(output)
    _echo(f"wrote {output}: {'; '.join(labels)}")


@main.command("tune")
@workload_options
@click.option("--plans", "plans_dir", type=click.Path(file_okay=False),
              help="Folder of candidate plan JSONs (default: solve, plus the hand-made baselines).")
@click.option("-k", "top_k", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Candidates to run at most.")
@click.option("--time-limit", "time_limit_s", type=_TIME_LIMIT, default=8.0, show_default=True,
              help="Solver time limit in seconds when solving the candidates.")
@click.option("--layers", "num_layers", type=click.IntRange(1, 1000), default=2, show_default=True,
              help="Layers unrolled when solving the candidates.")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False),
              help="Profile to solve the candidates with (default: the bundled table of the model, else analytic); "
                   "with --plans, the table they were made with: each report's prediction then includes its "
                   "power bound.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Best plan JSON; every candidate's report goes beside it as <stem>.tune.json. With --family: "
                   "the tuned family (the measuring run's bench report beside it as <stem>.bench.json).")
@click.option("--family", "family_path", type=click.Path(dir_okay=False),
              help="A plan family (solve --family): per bucket, its plan against the same plan op by op on one "
                   "live engine (--model, --trace; bench --plans --compare), keeping the faster.")
@click.option("--trace", "trace_spec", help="With --family: the trace the engine serves (E1-E4, const:IN:OUT, FILE).")
@click.option("--num-requests", type=click.IntRange(1, 10_000_000), help="With --family: requests of the trace.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="With --family: where the engine runs.")
@_run_options
def tune_cmd(plans_dir, top_k, time_limit_s, num_layers, profile_path, output, family_path, trace_spec, num_requests,
             device, mode, iters, no_graph, force, **spec):
    """Run each candidate plan on the GPU, time those that ran against each other, keep the fastest."""
    if family_path or trace_spec:
        return _tune_family(family_path, spec["model_ref"], trace_spec, num_requests, device, profile_path, output)
    from nfsearch import tune
    _check_outputs([output, Path(output).with_suffix(".tune.json")], (".json",))
    profile = None                      # with --plans and no --profile: no power bound in the predictions
    if plans_dir:
        candidates = tune.read_candidates(plans_dir)
        if profile_path:                # the table the candidates were made with, for their predictions
            from nfsearch.profile import load
            profile = load(profile_path)
            if not force:
                for c in candidates:
                    _check_profile(c.schedule, profile, c.name)
    else:
        model, workload = resolve_specs(**spec)
        problem = _problem(model, workload, profile_path, num_layers, False)
        candidates = tune.solved_candidates(problem, time_limit_s, progress=lambda m: _echo(f"  {m}", err=True))
        profile = problem.profile
    result = tune.run_candidates(candidates[:top_k], mode=mode, iters=iters, use_graph=not no_graph, force=force,
                                 progress=lambda m: _echo(f"  {m}", err=True), profile=profile)
    with _all_or_none([Path(output), Path(output).with_suffix(".tune.json")]):
        record = tune.write_result(result, output, " ".join(["nfsearch"] + sys.argv[1:]))
    if result.best.schedule.workload.tp_degree > 1:
        from nfsearch.runtime import tp
        for t in result.trials:
            _echo(f"{t.name}: {tp.format_line(t.report)}")
    else:
        from nfsearch.runtime import executor
        _echo(executor.format_table([t.report for t in result.trials]))
    if tune.interleaved_line(result):
        _echo(tune.interleaved_line(result))
    _echo(f"wrote {output} (best: {result.best.name}, {result.best.measured_layer_ms:.4f} ms/layer) and {record}")


def _tune_family(family_path, model, trace_spec, num_requests, device, profile_path, output):
    if not (family_path and model and trace_spec):
        raise NfsearchError("tune --family needs --family FAMILY.json, --model (the engine's) and --trace")
    _check_outputs([output, Path(output).with_suffix(".bench.json")], (".json",))
    try:
        from nfsearch.runtime.family_tune import tune_family
    except ImportError as exc:
        raise NfsearchError(f"tune --family needs torch and the gpu extra ({exc.name} is not installed)") from None
    from nfsearch.family import artifact
    tuned, report, lines = tune_family(family_path, model, trace_spec, num_requests, device=device,
                                       profile_path=profile_path, echo=_echo)
    report["command"] = " ".join(["nfsearch"] + sys.argv[1:])
    with _all_or_none([Path(output), Path(output).with_suffix(".bench.json")]):
        artifact.write(tuned, output)
        _write_json(Path(output).with_suffix(".bench.json"), report)
    for line in lines:
        _echo(line)
    t = tuned.tune
    _echo(f"wrote {output}: {t['num_sequential']} of {len(tuned.buckets)} buckets keep the sequential plan, "
          f"{t['num_too_few']} had too few iterations to choose; predicted {tuned.prediction.tokens_per_s:,.0f} "
          f"tokens/s (was {artifact.read(family_path).prediction.tokens_per_s:,.0f})")


@main.command("bench")
@click.option("--model", help="Bundled name or config.json (random weights), or a HuggingFace folder (its weights). "
              "Required unless --url.")
@click.option("--url", help="Bench a running OpenAI-compatible server instead (e.g. http://127.0.0.1:8000): "
              "streaming /v1/completions with Poisson arrivals.")
@click.option("--request-rate", help="With --url: requests per second, Poisson arrivals (default: all at once); "
              "a list (1,2,4,8) sweeps the rates.")
@click.option("--sweep", type=click.Choice(["auto"]), help="With --url: double the rate (from --request-rate, "
              "default 1) until the SLO breaks.")
@click.option("--max-duration-s", type=FiniteFloatRange(1.0, 86400.0), default=540.0, show_default=True,
              help="With a sweep: stop before a rate that would not fit this budget.")
@click.option("--slo-stat", type=click.Choice(["p90", "mean"]), default="p90", show_default=True,
              help="With --url: the normalised-latency statistic the SLO bounds.")
@click.option("--max-concurrency", type=click.IntRange(1, 1_000_000), help="With --url: most requests in flight.")
@click.option("--slo", "slo_ms", type=FiniteFloatRange(0.0, 1e9, min_open=True), default=200.0, show_default=True,
              help="With --url: normalised-latency SLO (end-to-end ms per output token) for goodput.")
@click.option("--trace", "trace_spec", required=True,
              help="E1|E2|E3|E4, const:IN:OUT, splitwise, lmsys, sharegpt (synthetic) or FILE.jsonl.")
@click.option("--num-requests", type=click.IntRange(1, 10_000_000), help="Requests (a file: default all).")
@click.option("--dense-batch", type=click.IntRange(1, 65536), help="Tokens per iteration (default: from memory "
              "and the trace's lengths).")
@click.option("--max-tpot", "max_tpot_ms", type=FiniteFloatRange(0.0, 1e6, min_open=True),
              help="Cap the dense batch so that iterations (the time per output token) stay under this many ms.")
@click.option("--gpu-memory-utilization", "utilization", type=FiniteFloatRange(0.05, 1.0), default=0.9,
              show_default=True, help="Share of GPU memory for weights, activations and the KV cache.")
@click.option("--page-size", type=click.IntRange(1, 1024), default=16, show_default=True, help="KV page, tokens.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="Where the engine runs: cuda (Triton paged attention, CUDA graphs) or cpu (torch ops).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), help="Default: bf16 on cuda, fp32 on cpu.")
@click.option("--compare", "is_compare", is_flag=True,
              help="Alternate the plan's kernels with a baseline layer every 100 iterations; report both. With "
                   "--plans: the family's plans against the same family op by op, per bucket.")
@click.option("--quantization", type=click.Choice(["fp8"]), help="fp8: W8A8 e4m3 GEMMs (weights per output "
              "channel, activations per token); changes numerics, stated in the report. An FP8 checkpoint "
              "runs them anyway.")
@click.option("--kv-cache-dtype", type=click.Choice(["auto", "fp8"]), default="auto", show_default=True,
              help="auto: the model's dtype; fp8: e4m3 K/V with a float32 scale per token and KV head (about "
              "twice the tokens in the same memory, half the decode bytes; changes numerics, stated in the report).")
@click.option("--numerics", "numerics_text", metavar="LIST",
              help="Run the trace once per numerics setting, a fresh engine each, in this process: a comma list "
                   "of bf16 (the model's dtype), fp8 (FP8 GEMMs), fp8kv (FP8 KV cache), fp8+fp8kv (both); one "
                   "JSON with a report per setting and a side-by-side table. Not with --quantization, "
                   "--kv-cache-dtype, --compare, --tp, --plans or --url.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the random weights, the synthetic trace and the prompts' token ids.")
@click.option("--tp", "tp_degree", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Tensor-parallel ranks on this host (one GPU each, NCCL; gloo with --device cpu).")
@click.option("--plans", "plans_path", type=click.Path(dir_okay=False),
              help="A plan family (solve --family): each bucket's graph runs its plan's kernels; refused when made "
                   "for another model, dense batch or buckets.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="JSON report (default: ./out/bench-*.json).")
def bench_cmd(model, url, request_rate, sweep, max_duration_s, slo_stat, max_tpot_ms, max_concurrency, slo_ms, trace_spec, num_requests, dense_batch, utilization,
              page_size, device, dtype, is_compare, quantization, kv_cache_dtype, numerics_text, seed, tp_degree,
              plans_path, output):
    """Serve a request trace with the engine: tokens/s per GPU against optimal, idle, power, latency."""
    if numerics_text is not None:
        given = click.get_current_context().get_parameter_source("kv_cache_dtype") == ParameterSource.COMMANDLINE
        clash = [flag for flag, on in (("--quantization", quantization), ("--kv-cache-dtype", given),
                                       ("--compare", is_compare), ("--tp", tp_degree > 1), ("--plans", plans_path),
                                       ("--url", url)) if on]
        if clash:
            raise NfsearchError(f"--numerics sets the GEMMs and KV cache per setting on one engine: drop "
                                f"{', '.join(clash)}")
    if url:
        return _bench_url(url, request_rate, max_concurrency, slo_ms, trace_spec, num_requests, seed, output,
                          sweep, max_duration_s, slo_stat)
    if not model:
        raise NfsearchError("bench needs --model (the engine here) or --url (a running server)")
    try:
        from nfsearch.runtime.bench_engine import BenchOptions, default_output, format_report, run_bench
    except ImportError as exc:
        raise NfsearchError(f"nfsearch bench needs torch and the gpu extra ({exc.name} is not installed)") from None
    if plans_path and tp_degree > 1:
        raise NfsearchError("--plans runs the engine on one GPU (a plan family is solved for TP 1)")
    settings = None
    if numerics_text is not None:
        from nfsearch.runtime.bench_numerics import format_numerics, parse_numerics, run_numerics
        settings = parse_numerics(numerics_text)
    default = OUT_DIR / default_output(model, trace_spec)
    output = output or str(default.with_name(f"{default.stem}-numerics.json") if settings else default)
    _check_outputs([output], (".json",), may_create_out=True)
    opts = BenchOptions(model, trace_spec, num_requests, dense_batch, utilization, page_size, device, dtype,
                        is_compare, seed, max_tpot_ms=max_tpot_ms, quantization=quantization,
                        kv_cache_dtype=kv_cache_dtype, plans=plans_path)
    if settings:
        report = run_numerics(opts, settings, echo=_echo, on_report=lambda name, r: _echo(
            f"--- numerics {name}\n{format_report(r)}"))
        report["command"] = " ".join(["nfsearch"] + sys.argv[1:])
        _echo(format_numerics(report))
        with _all_or_none([Path(output)]):
            _write_json(output, report)
        _echo(f"wrote {output}")
        return None
    if tp_degree > 1:
        from nfsearch.runtime.engine_tp import run_bench_tp
        report = run_bench_tp(opts, tp_degree)
    else:
        report = run_bench(opts, echo=_echo)
    report["command"] = " ".join(["nfsearch"] + sys.argv[1:])
    _echo(format_report(report))
    with _all_or_none([Path(output)]):
        _write_json(output, report)
    _echo(f"wrote {output}")



@main.command("serve")
@click.option("--model", required=True,
              help="Bundled name or config.json (random weights, byte-level tokenizer), or a HuggingFace folder "
                   "(its weights and tokenizer).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free port, printed at start-up).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="Where the engine runs: cuda (Triton paged attention, CUDA graphs) or cpu (torch ops).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), help="Default: bf16 on cuda, fp32 on cpu.")
@click.option("--dense-batch", type=click.IntRange(1, 65536), help="Tokens per iteration (default: from memory).")
@click.option("--max-decode", type=click.IntRange(1, 65536), help="Most running requests (default: from memory).")
@click.option("--max-tpot", "max_tpot_ms", type=FiniteFloatRange(0.0, 1e6, min_open=True),
              help="Cap the dense batch so that iterations (the time per output token) stay under this many ms.")
@click.option("--gpu-memory-utilization", "utilization", type=FiniteFloatRange(0.05, 1.0), default=0.9,
              show_default=True, help="Share of GPU memory for weights, activations and the KV cache.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the random weights.")
@click.option("--quantization", type=click.Choice(["fp8"]), help="fp8: W8A8 e4m3 GEMMs (weights per output "
              "channel, activations per token); changes numerics, stated in the report. An FP8 checkpoint "
              "runs them anyway.")
@click.option("--kv-cache-dtype", type=click.Choice(["auto", "fp8"]), default="auto", show_default=True,
              help="auto: the model's dtype; fp8: e4m3 K/V with a float32 scale per token and KV head.")
@click.option("--plans", "plans_path", type=click.Path(dir_okay=False),
              help="A plan family (solve --family): each bucket's graph runs its plan's kernels, and the engine takes "
                   "its dense batch, decode slots and bucket contexts (requests up to its trace's longest); "
                   "refused when made for another model, dense batch or buckets.")
def serve_cmd(model, host, port, device, dtype, dense_batch, max_decode, max_tpot_ms, utilization, seed, quantization,
              kv_cache_dtype, plans_path):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    try:
        from nfsearch.serving.server import serve
    except ImportError as exc:
        raise NfsearchError(f"nfsearch serve needs aiohttp ({exc.name} is not installed)") from None
    engine_kwargs = {"device": device, "dtype": dtype or ("bf16" if device == "cuda" else "fp32"),
                     "dense_batch": dense_batch, "max_decode": max_decode, "gpu_memory_utilization": utilization,
                     "seed": seed, "max_tpot_ms": max_tpot_ms, "quantization": quantization,
                     "kv_cache_dtype": kv_cache_dtype, "plans": plans_path}
    serve(model, host, port, engine_kwargs, echo=lambda line: _echo(line, err=True))


def _bench_url(url, request_rate, max_concurrency, slo_ms, trace_spec, num_requests, seed, output, sweep=None,
               max_duration_s=540.0, slo_stat="p90"):
    """`bench --url`: the trace against a running server; latency percentiles and goodput; with a list of
    rates or --sweep auto, every rate and the highest meeting the SLO, plotted beside the JSON."""
    from nfsearch.serving.online_bench import format_online, run_online_bench
    from nfsearch.serving.online_sweep import SweepOptions, format_sweep, parse_rates, run_sweep
    from nfsearch.serving.traces import load_trace
    rates = parse_rates(request_rate) if request_rate else None
    is_sweep = sweep == "auto" or (rates is not None and len(rates) > 1)
    stem = f"bench-online-{'sweep-' if is_sweep else ''}{_slug(trace_spec)}"
    output = output or str(OUT_DIR / f"{stem}.json")
    plots = [Path(output).with_suffix(".png"), Path(output).with_suffix(".html")] if is_sweep else []
    _check_outputs([output, *map(str, plots)], (".json", ".png", ".html"), may_create_out=True)
    trace = load_trace(trace_spec, num_requests, seed)
    command = " ".join(["nfsearch"] + sys.argv[1:])
    if is_sweep:
        opts = SweepOptions(None if sweep == "auto" else rates, rates[0] if rates else 1.0, max_duration_s, slo_ms,
                            slo_stat, max_concurrency, seed)
        report = run_sweep(url, trace.requests, opts, echo=lambda line: _echo(line, err=True))
        report.update(trace=trace.name, command=command)
        _echo(format_sweep(report))
    else:
        report = run_online_bench(url, trace.requests, rates[0] if rates else float("inf"), max_concurrency,
                                  slo_ms, seed)
        report.update(trace=trace.name, command=command)
        _echo(format_online(report))
    with _all_or_none([Path(output), *plots]):
        _write_json(output, report)
        if plots:
            from nfsearch.serving.sweep_plot import write_plots
            write_plots(report, *plots)
    _echo(f"wrote {output}" + "".join(f", {p}" for p in plots))


# ---- helpers ---------------------------------------------------------------------------------------

def _problem(model, workload, profile_path, num_layers, allow_extrapolation):
    from nfsearch.cost import default_profile, make_problem
    from nfsearch.profile import load
    table = load(profile_path) if profile_path else default_profile(model, workload)
    if table.is_analytic:
        _echo(f"note: using the {table.label} (no measured table for {model.name})", err=True)
    return make_problem(model, workload, table, num_layers, allow_extrapolation)


def _check_profile(schedule, table, plan_path) -> None:
    """`run --profile P` (and `tune --plans D --profile P`): the plan must have been made with P (its
    times hold for P only)."""
    planned, got = schedule.profile.fingerprint, table.fingerprint()
    if planned != got:
        raise NfsearchError(f"{plan_path}: made with profile {planned}, {table.label} is {got} "
                            f"(--force to run anyway)")


def _simulate_prefix(plan_path: str, out_prefix: str | None) -> Path:
    if out_prefix is None:
        return OUT_DIR / f"{Path(plan_path).stem}.sim"
    prefix = Path(out_prefix)
    # report.write_all reads an existing folder as <folder>/timeline: name the same files here
    return prefix / "timeline" if prefix.is_dir() else prefix


@contextmanager
def _all_or_none(paths):
    """Write a command's output files together: each is written atomically, and when the writing
    stops part-way (an error, Ctrl-C) the ones made so far are removed, with ./out/ if it was made here."""
    paths = [Path(p) for p in paths]
    existed = {p for p in paths if p.exists()}
    made_out = not OUT_DIR.exists() and any(p.parent == OUT_DIR for p in paths)
    if made_out:
        try:
            OUT_DIR.mkdir()
        except OSError as exc:
            raise NfsearchError(f"{OUT_DIR}: cannot create ({exc.strerror})") from None
    try:
        yield
    except BaseException:
        for path in paths:
            if path not in existed:
                path.unlink(missing_ok=True)
        if made_out and OUT_DIR.is_dir() and not any(OUT_DIR.iterdir()):
            OUT_DIR.rmdir()
        raise


def _check_outputs(paths, suffixes: tuple[str, ...], may_create_out: bool = False) -> None:
    """Refuse before any work or writing: a wrong suffix, a folder in a file's place, a missing or
    unwritable folder. Multi-file outputs are all checked here, so none is left half-made."""
    for given in paths:
        text = str(given)
        if not text:
            raise NfsearchError("output path is empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # (bytes that are not UTF-8 in a file name: they could not even be printed back)
            raise NfsearchError(f"{_printable(text)}: output name is not valid UTF-8") from None
        if text.endswith(("/", os.sep)):
            raise NfsearchError(f"{text}: output names a folder, not a file")
        path = Path(text)
        if len(path.name.encode()) > 255:
            raise NfsearchError(f"{text[:60]}...: output file name is too long")
        if suffixes and not path.name.endswith(suffixes):
            raise NfsearchError(f"{path}: output must end with {' or '.join(suffixes)}")
        if path.is_dir():
            raise NfsearchError(f"{path}: cannot write (a folder is in the way)")
        parent = path.parent
        if may_create_out and parent == OUT_DIR and not parent.exists():
            continue                                             # made on demand by _make_out_dir
        if not parent.is_dir():
            raise NfsearchError(f"{path}: cannot write (no directory {parent})")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise NfsearchError(f"{path}: cannot write (no permission in {parent})")


def _printable(text: str) -> str:
    """Text safe to print: file names may carry undecodable bytes (surrogates) that stdout refuses."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _echo(text: str, err: bool = False, nl: bool = True) -> None:
    click.echo(_printable(text), err=err, nl=nl)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "plan"


def _gap_line(info) -> str:
    """The plan's stage-2 gap, or where a plan with none comes from (a stage-1 incumbent, a baseline)."""
    if info.gap is not None:
        return f"stage-2 gap {info.gap:.2%}"
    return f"no stage-2 gap ({info.source or info.name})"


def _progress_bar(done: int, total: int, eta_s: float, what: str) -> None:
    _echo(f"\r  [{done}/{total}] {done / max(total, 1):4.0%} eta {eta_s:5.0f} s  {what[:50]:<50}",
               err=True, nl=done >= total)


def _write_json(path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=float) + "\n")
