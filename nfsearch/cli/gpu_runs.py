"""Plans on the GPU (nfsearch.runtime.executor): run (check and time one plan), compare (its predicted
against its measured timeline), tune (run the candidates, keep the fastest)."""

import dataclasses
import sys
from pathlib import Path

import click

from nfsearch import report as report_mod
from nfsearch.cli.common import (
    OUT_DIR,
    TIME_LIMIT,
    all_or_none,
    check_outputs,
    cli_problem,
    echo,
    resolve_specs,
    workload_options,
    write_json,
)
from nfsearch.compare import compare, format_table
from nfsearch.errors import NfsearchError
from nfsearch.files import read_json
from nfsearch.timeline import timeline_from_dict, timeline_to_dict


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


@click.command("run")
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
    out = _run_out_dir(plan_path, out_dir)
    from nfsearch.runtime.device import check_device, require_cuda
    require_cuda("nfsearch run")
    check_device(schedule, plan_path, force)
    profile = table if profile_path else None
    if schedule.workload.tp_degree > 1:      # one process per GPU, NCCL (nfsearch.runtime.tp)
        _run_tp(plan_path, schedule, out, mode, iters, no_graph, with_timeline, profile)
    else:
        _run_one_gpu(plan_path, schedule, out, mode, iters, no_graph, with_timeline, profile)


def _run_out_dir(plan_path, out_dir) -> Path:
    """`run`'s output folder (--out, else out/run-<plan stem>), checked before the GPU is touched."""
    if out_dir is not None and not out_dir.strip():
        raise NfsearchError("--out is empty")
    out = Path(out_dir) if out_dir is not None else OUT_DIR / f"run-{Path(plan_path).stem}"
    if out.exists() and not out.is_dir():
        raise NfsearchError(f"{out}: cannot write (a file is in the way of the output folder)")
    if out.is_dir():
        check_outputs([out / "run.json", out / "measured.json"], ())
    return out


def _run_tp(plan_path, schedule, out, mode, iters, no_graph, with_timeline, profile) -> None:
    """`run` of a TP plan: rank 0 writes run.json (and with --timeline its measured timeline and Gantt)."""
    from nfsearch.runtime import tp
    report = tp.run_plan(plan_path, mode=mode, iters=iters, use_graph=not no_graph, timeline=with_timeline,
                         progress=lambda m: echo(f"  {m}", err=True), profile=profile)
    if report is None:                   # another rank of a torchrun job: rank 0 writes the report
        return
    report["command"] = " ".join(["nfsearch"] + sys.argv[1:])
    measured = report.pop("timeline", None)          # rank 0's, timeline_to_dict form
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", report)
    if measured is not None:
        from nfsearch.simulate import stated_timeline
        write_json(out / "measured.json", measured)
        try:
            report_mod.write_all([stated_timeline(schedule), timeline_from_dict(measured, "rank 0")],
                                 out / "timeline", f"{schedule.model.name} {schedule.workload.name} on "
                                 f"{report['tp_degree']}x {report['gpu']} (rank 0)")
        except ImportError as exc:
            echo(f"note: no Gantt written ({exc}); measured.json has the timeline", err=True)
    for note in report.get("notes", []):
        if note.startswith("timeline:"):
            echo(f"note: {note}", err=True)
    echo(tp.format_line(report))
    for line in tp.power_lines(report):
        echo(line)
    echo(f"wrote {out / 'run.json'}" + (f", {out / 'measured.json'}" if measured is not None else ""))


def _run_one_gpu(plan_path, schedule, out, mode, iters, no_graph, with_timeline, profile) -> None:
    """`run` of a one-GPU plan (nfsearch.runtime.executor): run.json, with --timeline the measured
    timeline and its Gantt beside the plan's."""
    from nfsearch.runtime import executor
    report = executor.execute(schedule, mode=mode, iters=iters, use_graph=not no_graph, timeline=with_timeline,
                              profile=profile, progress=lambda m: echo(f"  {m}", err=True))
    report = dataclasses.replace(report, command=" ".join(["nfsearch"] + sys.argv[1:]), plan_path=str(plan_path))
    measured = report.timeline
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", report.to_dict())
    if measured is not None:
        from nfsearch.simulate import stated_timeline
        write_json(out / "measured.json", timeline_to_dict(measured))
        try:
            report_mod.write_all([stated_timeline(schedule), measured], out / "timeline",
                                 f"{schedule.model.name} {schedule.workload.name} on {report.gpu}")
        except ImportError as exc:
            echo(f"note: no Gantt written ({exc}); measured.json has the timeline", err=True)
    for note in report.notes:
        echo(f"note: {note}", err=True)
    echo(executor.format_table([report]))
    echo(f"wrote {out / 'run.json'}" + (f", {out / 'measured.json'}" if measured is not None else ""))


def _check_profile(schedule, table, plan_path) -> None:
    """`run --profile P` (and `tune --plans D --profile P`): the plan must have been made with P (its
    times hold for P only)."""
    planned, got = schedule.profile.fingerprint, table.fingerprint()
    if planned != got:
        raise NfsearchError(f"{plan_path}: made with profile {planned}, {table.label} is {got} "
                            f"(--force to run anyway)")


@click.command("compare")
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
        check_outputs([output], (".json",))
    schedule = plan.read(plan_path)
    measured = timeline_from_dict(read_json(measured_path), measured_path)
    cmp = compare(stated_timeline(schedule), measured)
    echo(format_table(cmp, worst))
    if output is not None:
        write_json(output, cmp.to_dict())


@click.command("tune")
@workload_options
@click.option("--plans", "plans_dir", type=click.Path(file_okay=False),
              help="Folder of candidate plan JSONs (default: solve, plus the hand-made baselines).")
@click.option("-k", "top_k", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Candidates to run at most.")
@click.option("--time-limit", "time_limit_s", type=TIME_LIMIT, default=8.0, show_default=True,
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
    check_outputs([output, Path(output).with_suffix(".tune.json")], (".json",))
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
        problem = cli_problem(model, workload, profile_path, num_layers, False)
        candidates = tune.solved_candidates(problem, time_limit_s, progress=lambda m: echo(f"  {m}", err=True))
        profile = problem.profile
    result = tune.run_candidates(candidates[:top_k], mode=mode, iters=iters, use_graph=not no_graph, force=force,
                                 progress=lambda m: echo(f"  {m}", err=True), profile=profile)
    with all_or_none([Path(output), Path(output).with_suffix(".tune.json")]):
        record = tune.write_result(result, output, " ".join(["nfsearch"] + sys.argv[1:]))
    if result.best.schedule.workload.tp_degree > 1:
        from nfsearch.runtime import tp
        for t in result.trials:
            echo(f"{t.name}: {tp.format_line(t.report)}")
    else:
        from nfsearch.runtime import executor
        echo(executor.format_table([t.report for t in result.trials]))
    if tune.interleaved_line(result):
        echo(tune.interleaved_line(result))
    echo(f"wrote {output} (best: {result.best.name}, {result.best.measured_layer_ms:.4f} ms/layer) and {record}")


def _tune_family(family_path, model, trace_spec, num_requests, device, profile_path, output):
    if not (family_path and model and trace_spec):
        raise NfsearchError("tune --family needs --family FAMILY.json, --model (the engine's) and --trace")
    check_outputs([output, Path(output).with_suffix(".bench.json")], (".json",))
    try:
        from nfsearch.runtime.family_tune import tune_family
    except ImportError as exc:
        raise NfsearchError(f"tune --family needs torch and the gpu extra ({exc.name} is not installed)") from None
    from nfsearch.family import artifact
    tuned, report, lines = tune_family(family_path, model, trace_spec, num_requests, device=device,
                                       profile_path=profile_path, echo=echo)
    report["command"] = " ".join(["nfsearch"] + sys.argv[1:])
    with all_or_none([Path(output), Path(output).with_suffix(".bench.json")]):
        artifact.write(tuned, output)
        write_json(Path(output).with_suffix(".bench.json"), report)
    for line in lines:
        echo(line)
    t = tuned.tune
    echo(f"wrote {output}: {t['num_sequential']} of {len(tuned.buckets)} buckets keep the sequential plan, "
          f"{t['num_too_few']} had too few iterations to choose; predicted {tuned.prediction.tokens_per_s:,.0f} "
          f"tokens/s (was {artifact.read(family_path).prediction.tokens_per_s:,.0f})")
