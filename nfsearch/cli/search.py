"""The search, no GPU needed: analyze (the roofline of one layer), solve (a plan), simulate (replay a plan
through the cost model), check (the golden cases)."""

import sys
from pathlib import Path

import click
from click.core import ParameterSource

from nfsearch import report as report_mod
from nfsearch.cli.common import (
    GPU_HELP,
    MAX_SEED,
    OUT_DIR,
    TIME_LIMIT,
    FiniteFloatRange,
    all_or_none,
    check_outputs,
    cli_problem,
    echo,
    resolve_specs,
    slug,
    workload_options,
)
from nfsearch.errors import NfsearchError
from nfsearch.files import read_json


@click.command()
@workload_options
@click.option("--gpu", "gpu_key", default="h100-sxm", show_default=True, help=GPU_HELP)
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
        echo(analyze_pairs(pairs_path, json_path, spec["tp_degree"], given))
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
        echo(f"{key:<{width}}  {value}")


@click.command()
@workload_options
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False),
              help="Profile table (default: the bundled H100 table of the model, else an analytic one).")
@click.option("--solver", type=click.Choice(["auto", "cpsat", "gurobi"]), default="auto", show_default=True,
              help="Stage-2 backend; auto takes Gurobi when licensed, else CP-SAT.")
@click.option("--time-limit", "time_limit_s", type=TIME_LIMIT, default=8.0, show_default=True,
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
                                seed, chunk, min_gain, output, spec, check_outputs, all_or_none, echo,
                                kv_cache_dtype)
    model, workload = resolve_specs(**spec)
    if output is None:
        output = str(OUT_DIR / f"{slug(model.name)}-{slug(workload.name)}.json")
    check_outputs([output], (".json",), may_create_out=True)
    output = Path(output)
    problem = cli_problem(model, workload, profile_path, num_layers, allow_extrapolation)
    # the stage log goes out live as progress; the returned notes repeat it, so they are not printed
    schedule, _notes = search.solve(problem, solver=solver, time_limit_s=time_limit_s, threads=threads,
                                    seed=seed, chunk=chunk, min_gain=min_gain,
                                    progress=lambda msg: echo(f"  {msg}", err=True))
    with all_or_none([output]):
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
    echo(f"wrote {output}: per layer: {layer:.3f} ms replayed vs sequential {seq:.3f} ms ({seq / layer:.2f}x{capped}); "
               f"roofline bound {bound:.3f} ms (the plan reaches {bound / layer:.0%} of it); solver "
               f"{schedule.solver.name}, {_gap_line(schedule.solver)}; {problem.profile.label}")


def _gap_line(info) -> str:
    """The plan's stage-2 gap, or where a plan with none comes from (a stage-1 incumbent, a baseline)."""
    if info.gap is not None:
        return f"stage-2 gap {info.gap:.2%}"
    return f"no stage-2 gap ({info.source or info.name})"


@click.command()
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
        return simulate_family_cmd(artifact.from_dict(data, plan_path), profile_path, echo)
    schedule = plan.from_dict(data, plan_path)
    if out_prefix is not None:
        if not out_prefix:
            raise NfsearchError("output prefix is empty")
        check_outputs([out_prefix + ".html"], ())               # a name that cannot be printed, as given
    prefix = _simulate_prefix(plan_path, out_prefix)
    paths = [prefix.with_name(prefix.name + suffix) for suffix in (".html", ".png", ".trace.json")]
    check_outputs(paths, (), may_create_out=out_prefix is None)     # all three before any is written
    problem = cli_problem(schedule.model, schedule.workload, profile_path, schedule.num_layers, allow_extrapolation)
    result = check_and_judge(schedule, problem.cost, is_profile_given=profile_path is not None)
    if problem.profile.fingerprint() != schedule.profile.fingerprint:
        echo(f"note: plan was made with profile {schedule.profile.fingerprint}, replaying with "
                   f"{problem.profile.fingerprint()} ({problem.profile.label})", err=True)
    title = f"{schedule.model.name} {schedule.workload.name} on {schedule.gpu.name}"
    power = power_line(result, problem.cost)
    with all_or_none(paths):
        written = report_mod.write_all([result.replay.timeline], prefix, title, (power,))
    p = schedule.predicted
    seq, bound = p.sequential_layer_time_ms, p.bound_ms
    layer = result.replayed_layer_ms
    echo(f"plan {plan_path}: valid ({len(schedule.nano_ops)} nano-ops, {len(schedule.streams)} streams, "
               f"{schedule.num_layers} layers)")
    echo(f"per layer: replayed layer time {layer:.3f} ms (plan states {p.layer_time_ms:.3f}); "
               f"sequential {seq:.3f} ms -> {seq / layer:.2f}x; roofline bound {bound:.3f} ms -> {bound / layer:.0%}")
    echo(power)
    sources = sources_line(corun_sources(schedule, problem.cost))
    if sources:
        echo(sources)
    echo("wrote " + ", ".join(str(path) for path in written.values()))


def _simulate_prefix(plan_path: str, out_prefix: str | None) -> Path:
    if out_prefix is None:
        return OUT_DIR / f"{Path(plan_path).stem}.sim"
    prefix = Path(out_prefix)
    # report.write_all reads an existing folder as <folder>/timeline: name the same files here
    return prefix / "timeline" if prefix.is_dir() else prefix


@click.command()
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
        for line in update_goldens(cases_file, progress=lambda msg: echo(f"  {msg}", err=True)):
            echo(line)
        return
    result = run_check(cases_file, tolerance, progress=lambda msg: echo(f"  {msg}", err=True))
    echo(result.report())
    if not result.ok:
        sys.exit(1)
