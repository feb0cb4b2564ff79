"""The command line: one thin command per verb (parse, build config, call the library, write)."""

import sys
from pathlib import Path

import click

from nfsearch.errors import NfsearchError


class _Group(click.Group):
    """Errors users can cause: one line on stderr, exit code 2, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NfsearchError as exc:
            click.echo(f"nfsearch: error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="nfsearch")
def main():
    """Find and run NanoFlow-style intra-GPU overlap schedules for LLM serving."""


def workload_options(f):
    """--workload (W1-W5 or a YAML file) or the flags that describe a dense batch."""
    options = [
        click.option("--model", "model_ref", help="Bundled name, model YAML, or HuggingFace config.json."),
        click.option("--workload", "workload_ref", help="W1-W5 or a workload YAML file."),
        click.option("--decode", "num_decode", type=int, help="Decode requests in the batch."),
        click.option("--context", "decode_context", type=int, default=1024, show_default=True,
                     help="Average decode context."),
        click.option("--prefill", "prefill", default="", help="Prompt lengths, comma separated."),
        click.option("--tp", "tp_degree", type=int, default=1, show_default=True, help="Tensor-parallel degree."),
        click.option("--dtype", default="bf16", show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def resolve_specs(model_ref, workload_ref, num_decode, decode_context, prefill, tp_degree, dtype):
    from nfsearch.specs import load_model, load_workload, workload_from_flags
    if workload_ref and num_decode is not None:
        raise NfsearchError("give either --workload or --decode/--prefill flags, not both")
    if workload_ref:
        workload = load_workload(workload_ref)
    elif num_decode is not None or prefill:
        workload = workload_from_flags(num_decode or 0, decode_context, _lengths(prefill), tp_degree, dtype)
    else:
        raise NfsearchError("no workload: give --workload W1..W5|FILE or --decode/--prefill flags")
    model_ref = model_ref or workload.model
    if not model_ref:
        raise NfsearchError("no model: give --model")
    return load_model(model_ref), workload


def _lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise NfsearchError(f"--prefill must be comma-separated integers, got '{text}'") from None


@main.command()
@workload_options
@click.option("--gpu", "gpu_key", default="h100-sxm", show_default=True, help="h100-sxm | h200 | a100-sxm")
def analyze(gpu_key, **spec):
    """FLOPs, bytes, T_compute, T_mem, T_net, TR, the bound and optimal tokens/s of one layer."""
    from nfsearch.analysis import roofline
    from nfsearch.specs import load_gpu
    model, workload = resolve_specs(**spec)
    gpu = load_gpu(gpu_key)
    r = roofline(model, workload, gpu)
    rows = [("model", model.name), ("workload", f"{workload.name} ({workload.num_tokens} tokens, "
                                                 f"{workload.num_decode} decode, TP={workload.tp_degree})"),
            ("gpu", f"{gpu.name}: {gpu.peak_tflops:g} TFLOP/s, {gpu.mem_bandwidth_tbps:g} TB/s, "
                    f"{gpu.net_bandwidth_gbps:g} GB/s net ({gpu.figures_source})"),
            ("FLOPs per layer", f"{r.flops / 1e9:.1f} GFLOP"),
            ("bytes per layer", f"{r.num_bytes / 1e9:.3f} GB"),
            ("network bytes per layer", f"{r.net_bytes / 1e6:.1f} MB"),
            ("T_compute", f"{r.compute_ms:.3f} ms"), ("T_mem", f"{r.mem_ms:.3f} ms"),
            ("T_net", f"{r.net_ms:.3f} ms"), ("TR = T_mem / T_compute", f"{r.ratio:.2f}"),
            ("bound per layer", f"{r.bound_ms:.3f} ms"),
            ("optimal throughput", f"{r.tokens_per_s:,.0f} tokens/s ({model.num_layers} layers)")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


@main.command()
@workload_options
@click.option("--analytic", "is_analytic", is_flag=True, help="Roofline table of --gpu instead of measuring.")
@click.option("--gpu", "gpu_key", default="h100-sxm", show_default=True)
@click.option("--gpu-id", type=int, default=0, show_default=True)
@click.option("--quick", "is_quick", is_flag=True, help="Coarse grid.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help=".parquet or .csv")
def profile(is_analytic, gpu_key, gpu_id, is_quick, output, **spec):
    """Write a profile table: measured on the GPU, or --analytic from a roofline model."""
    model, workload = resolve_specs(**spec)
    _check_output(output, (".parquet", ".csv"))
    if is_analytic:
        from nfsearch.analytic import analytic_profile
        from nfsearch.specs import load_gpu
        table = analytic_profile(model, workload, load_gpu(gpu_key))
    else:
        from nfsearch.runtime.device import require_cuda
        require_cuda("nfsearch profile")
        from nfsearch.runtime.profiler import measure_profile
        table = measure_profile(model, workload, gpu_id=gpu_id, is_quick=is_quick, output=output,
                                progress=_progress_bar)
    table.write(output)
    click.echo(f"wrote {output}: {len(table.rows)} rows, {table.label}, fingerprint {table.fingerprint()}")


@main.command()
@workload_options
@click.option("--profile", "profile_path", type=click.Path(), help="Profile table (default: bundled H100).")
@click.option("--solver", type=click.Choice(["auto", "cpsat", "gurobi"]), default="auto", show_default=True)
@click.option("--time-limit", "time_limit_s", type=float, default=8.0, show_default=True, help="Seconds.")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layers", "num_layers", type=int, default=2, show_default=True, help="Layers unrolled.")
@click.option("--chunk", type=int, default=128, show_default=True, help="Nano-batch size granularity.")
@click.option("--allow-extrapolation", is_flag=True, help="Let the profile answer outside its grid.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
def solve(profile_path, solver, time_limit_s, threads, seed, num_layers, chunk, allow_extrapolation, output,
          **spec):
    """Search a schedule (stage 1 structure, stage 2 SM allocation) and write the plan JSON."""
    from nfsearch import plan, search
    model, workload = resolve_specs(**spec)
    _check_output(output, (".json",))
    problem = _problem(model, workload, profile_path, num_layers, allow_extrapolation)
    schedule, notes = search.solve(problem, solver=solver, time_limit_s=time_limit_s, threads=threads,
                                   seed=seed, chunk=chunk, progress=lambda msg: click.echo(f"  {msg}", err=True))
    for note in notes:
        click.echo(note, err=True)
    plan.write(schedule, output)
    p = schedule.predicted
    click.echo(f"wrote {output}: layer {p['layer_time_ms']:.3f} ms predicted vs sequential "
               f"{p['sequential_layer_time_ms']:.3f} ms ({p['sequential_layer_time_ms'] / p['layer_time_ms']:.2f}x), "
               f"bound {p['bound_ms']:.3f} ms ({p['bound_ms'] / p['layer_time_ms']:.0%} of bound); "
               f"solver {schedule.solver.get('name')} {schedule.solver.get('wall_s', 0):.1f} s, "
               f"gap {_gap(schedule.solver.get('gap'))}; {problem.profile.label}")


@main.command()
@click.argument("plan_path", type=click.Path())
@click.option("--profile", "profile_path", type=click.Path(), help="Profile table (default: bundled H100).")
@click.option("-o", "--output", "out_prefix", type=click.Path(),
              help="Output prefix for .html, .png, .trace.json (default: beside the plan).")
@click.option("--allow-extrapolation", is_flag=True)
def simulate(plan_path, profile_path, out_prefix, allow_extrapolation):
    """Check a plan's constraints, replay it through the cost model, write Gantt and trace."""
    from nfsearch import plan, report
    from nfsearch.simulate import replay, verify
    schedule = plan.read(plan_path)
    verify(schedule)
    problem = _problem(schedule.model, schedule.workload, profile_path, schedule.num_layers, allow_extrapolation)
    if problem.profile.fingerprint() != schedule.profile["fingerprint"]:
        click.echo(f"note: plan was made with profile {schedule.profile['fingerprint']}, replaying with "
                   f"{problem.profile.fingerprint()} ({problem.profile.label})", err=True)
    result = replay(schedule, problem.cost)
    prefix = out_prefix or str(Path(plan_path).with_suffix("")) + ".sim"
    title = f"{schedule.model.name} {schedule.workload.name} on {schedule.gpu['name']}"
    paths = report.write_all([result.timeline], prefix, title)
    seq, bound = schedule.predicted["sequential_layer_time_ms"], schedule.predicted["bound_ms"]
    layer = result.timeline.layer_time_ms
    click.echo(f"plan {plan_path}: valid ({len(schedule.nano_ops)} nano-ops, {len(schedule.streams)} streams, "
               f"{schedule.num_layers} layers)")
    click.echo(f"replayed layer time {layer:.3f} ms (plan states {schedule.predicted['layer_time_ms']:.3f}); "
               f"sequential {seq:.3f} ms -> {seq / layer:.2f}x; bound {bound:.3f} ms -> {bound / layer:.0%}")
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def _problem(model, workload, profile_path, num_layers, allow_extrapolation):
    from nfsearch.problem import default_profile, make_problem
    from nfsearch.profile import load
    table = load(profile_path) if profile_path else default_profile(model, workload)
    if table.is_analytic:
        click.echo(f"note: using the {table.label} (no measured table for {model.name})", err=True)
    return make_problem(model, workload, table, num_layers, allow_extrapolation)


def _check_output(path: str, suffixes: tuple[str, ...]) -> None:
    if not path.endswith(suffixes):
        raise NfsearchError(f"{path}: output must end with {' or '.join(suffixes)}")
    parent = Path(path).parent
    if not parent.is_dir():
        raise NfsearchError(f"{path}: cannot write (no directory {parent})")


def _gap(gap) -> str:
    return "n/a" if gap is None else f"{gap:.2%}"


def _progress_bar(done: int, total: int, eta_s: float, what: str) -> None:
    click.echo(f"\r  [{done}/{total}] {done / max(total, 1):4.0%} eta {eta_s:5.0f} s  {what[:50]:<50}",
               err=True, nl=done >= total)
