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
    from nfsearch.roofline import roofline
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
        from nfsearch.roofline import analytic_profile
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
               f"solver {schedule.solver.get('name')}, "
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


@main.command()
@click.option("--cases", "cases_file", type=click.Path(), default="tests/golden/cases.yaml", show_default=True,
              help="Golden cases file (model, workload, profile -> committed golden plan).")
@click.option("--tolerance", type=float, help="Allowed makespan regression (default: the cases file's).")
def check(cases_file, tolerance):
    """Re-solve the golden cases; exit 1 with a diff when a plan is invalid or got worse."""
    from nfsearch.golden import run_check
    result = run_check(cases_file, tolerance, progress=lambda msg: click.echo(f"  {msg}", err=True))
    click.echo(result.report())
    if not result.ok:
        sys.exit(1)


def _problem(model, workload, profile_path, num_layers, allow_extrapolation):
    from nfsearch.cost import default_profile, make_problem
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


# ---- run / compare / tune: execute plans on the GPU (nfsearch.runtime.executor) ------------------

def _run_options(f):
    options = [
        click.option("--mode", type=click.Choice(["green", "grid"]), default="green", show_default=True,
                     help="green: SM partitions per launch (green contexts); grid: plain streams, "
                          "SM-bounded grids only."),
        click.option("--iters", type=int, default=30, show_default=True, help="Timed graph replays (median)."),
        click.option("--no-graph", "no_graph", is_flag=True, help="Time eager launches instead of a CUDA graph."),
        click.option("--force", is_flag=True, help="Run a plan made for another GPU or profile."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command("run")
@click.option("--schedule", "plan_path", required=True, type=click.Path(), help="Plan JSON.")
@click.option("--layers", "num_layers", type=int, help="Layers to run (must be the plan's unrolled layers).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder (default out/run-<plan>).")
@click.option("--timeline", "with_timeline", is_flag=True,
              help="Also measure per-op start/end (eager, events) and write Gantt/Perfetto + measured.json.")
@click.option("--profile", "profile_path", type=click.Path(), help="Profile the plan must have been made with.")
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
        fp = load(profile_path).fingerprint()
        if fp != schedule.profile.get("fingerprint") and not force:
            raise NfsearchError(f"{plan_path}: made with profile {schedule.profile.get('fingerprint')}, "
                                f"{profile_path} is {fp} (--force to run anyway)")
    from nfsearch.runtime.device import check_device, require_cuda
    require_cuda("nfsearch run")
    check_device(schedule, plan_path, force)
    out = Path(out_dir or Path("out") / f"run-{Path(plan_path).stem}")
    out.mkdir(parents=True, exist_ok=True)
    from nfsearch.runtime import executor
    report, measured = executor.execute(schedule, mode=mode, iters=iters, use_graph=not no_graph,
                                        timeline=with_timeline, progress=lambda m: click.echo(f"  {m}", err=True))
    report["command"] = " ".join(["nfsearch"] + sys.argv[1:])
    report["plan_path"] = str(plan_path)
    _write_json(out / "run.json", report)
    if measured is not None:
        from nfsearch import report as report_mod
        from nfsearch.simulate import stated_timeline
        _write_json(out / "measured.json", timeline_to_dict(measured))
        try:
            report_mod.write_all([stated_timeline(schedule), measured], out / "timeline",
                                 f"{schedule.model.name} {schedule.workload.name} on {report['gpu']}")
        except ImportError as exc:
            click.echo(f"note: no Gantt written ({exc}); measured.json has the timeline", err=True)
    for note in report.get("notes", []):
        click.echo(f"note: {note}", err=True)
    click.echo(executor.format_table([report]))
    click.echo(f"wrote {out / 'run.json'}" + (f", {out / 'measured.json'}" if measured is not None else ""))


@main.command("compare")
@click.argument("plan_path", type=click.Path())
@click.argument("measured_path", type=click.Path())
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the comparison as JSON.")
@click.option("--worst", type=int, default=5, show_default=True)
def compare_cmd(plan_path, measured_path, output, worst):
    """Per-op predicted (the plan's times) vs measured (a run's measured.json) error."""
    from nfsearch import plan
    from nfsearch.compare import compare, format_table
    from nfsearch.files import read_json
    from nfsearch.simulate import stated_timeline
    schedule = plan.read(plan_path)
    measured = timeline_from_dict(read_json(measured_path), measured_path)
    cmp = compare(stated_timeline(schedule), measured)
    click.echo(format_table(cmp, worst))
    if output:
        _write_json(output, cmp.to_dict())


@main.command("tune")
@workload_options
@click.option("--plans", "plans_dir", type=click.Path(file_okay=False),
              help="Candidate plan JSONs (default: solve, plus the hand-made baselines).")
@click.option("-k", "top_k", type=int, default=3, show_default=True, help="Candidates to run at most.")
@click.option("--time-limit", "time_limit_s", type=float, default=8.0, show_default=True)
@click.option("--layers", "num_layers", type=int, default=2, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Best plan JSON.")
@_run_options
def tune_cmd(plans_dir, top_k, time_limit_s, num_layers, output, mode, iters, no_graph, force, **spec):
    """Run each candidate plan on the GPU and keep the fastest measured one (all are recorded)."""
    from nfsearch import plan
    _check_output(output, (".json",))
    if plans_dir:
        paths = sorted(Path(plans_dir).glob("*.json"))
        if not paths:
            raise NfsearchError(f"{plans_dir}: no plan JSON files")
        candidates = [(p.stem, plan.read(p)) for p in paths]
    else:
        from nfsearch import search
        model, workload = resolve_specs(**spec)
        problem = _problem(model, workload, None, num_layers, False)
        best, _notes = search.solve(problem, time_limit_s=time_limit_s)
        candidates = [("solved", best)] + sorted(search.baselines(problem).items())
    candidates = candidates[:max(1, top_k)]
    from nfsearch.runtime.device import check_device, require_cuda
    require_cuda("nfsearch tune")
    from nfsearch.runtime import bench, executor
    results, ceilings = [], None
    with executor.ExecContext("cuda", mode) as ctx:
        for name, schedule in candidates:
            check_device(schedule, name, force)
            try:
                report, _ = executor.execute(schedule, ctx=ctx, iters=iters, use_graph=not no_graph,
                                             with_baselines=not results, ceilings=ceilings)
                ceilings = ceilings or report.get("ceilings") or bench.ceilings()
            except NfsearchError as exc:
                report = {"workload": schedule.workload.name, "error": str(exc)}
            report["candidate"] = name
            results.append((report.get("measured_layer_ms", float("inf")), name, schedule, report))
            click.echo(f"  {name}: {report.get('measured_layer_ms', float('nan')):.4f} ms/layer", err=True)
    ok = [r for r in results if r[0] != float("inf")]
    if not ok:
        raise NfsearchError("no candidate plan ran correctly")
    best = min(ok, key=lambda r: r[0])
    plan.write(best[2], output)
    record = {"best": best[1], "command": " ".join(["nfsearch"] + sys.argv[1:]), "candidates": [r[3] for r in results]}
    _write_json(Path(output).with_suffix(".tune.json"), record)
    click.echo(executor.format_table([r[3] for r in results]))
    click.echo(f"wrote {output} (best: {best[1]}, {best[0]:.4f} ms/layer) and {Path(output).with_suffix('.tune.json')}")


def timeline_to_dict(timeline) -> dict:
    from dataclasses import asdict
    return {"label": timeline.label, "num_layers": timeline.num_layers, "spans": [asdict(s) for s in timeline.spans]}


def timeline_from_dict(data: dict, where: str = "timeline"):
    from nfsearch.timeline import Span, Timeline
    data = data.get("timeline", data)
    try:
        spans = tuple(Span(**s) for s in data["spans"])
        return Timeline(data["label"], spans, int(data["num_layers"]))
    except (KeyError, TypeError) as exc:
        raise NfsearchError(f"{where}: not a measured timeline ({exc})") from None


def _write_json(path, data) -> None:
    import json

    from nfsearch.files import write_text_atomic
    write_text_atomic(path, json.dumps(data, indent=1, default=float) + "\n")
