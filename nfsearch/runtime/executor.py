"""Execute a plan on the GPU: launches on their streams with cross-stream event waits, one CUDA graph
for the whole layer stack, correctness against the sequential torch reference, timing beside the
seq-torch, seq-same and seq-compiled baselines (nfsearch.runtime.baselines) and the measured
roofline bound. Returns a nfsearch.runreport.RunReport.

Streams: every launch carries (layout, group) from nfsearch.runtime.launch: one buildable layout per
set of launches predicted to run side by side. The stream of a launch is group ``group`` of ONE
build of its layout (``SmPartitions.build``, cached per layout), so launches whose groups differ in
one layout run on disjoint SMs (green mode); builds of different layouts may share SMs, and only
launches predicted NOT to co-run take their streams from different builds. Whole-GPU launches run
on plain streams. In grid mode the build gives plain streams and the kernels bound their grids to
the group's SMs.

CUDA graphs: ``issue`` forks from the current stream with an event, each green-context stream
waits on it, launches wait on the events of the launches they depend on, and every stream used is
joined back into the current stream at the end: the pattern of ``partitions.capture_graph``, so
the same code runs eagerly and under capture across green-context streams. Layouts are built and
kernels compiled by an eager warm-up before any capture.

Everything the run needs lives in one ExecContext (runtime/context.py: device, SM partitions, a
stream per stream key, an event per recorded launch); there are no module globals. On a CPU device
the same code runs the launches in plan order with the "torch" impls (used by the CI tests).
"""

from __future__ import annotations

import contextlib
import datetime
import platform
import statistics
import time

import torch

from nfsearch.errors import NfsearchError
from nfsearch.runreport import (Bound, Correctness, LaunchSummary, OpError, PowerReading, RunReport, Timing,
                                format_table)
from nfsearch.roofline import roofline
from nfsearch.runtime import baselines, bench, power, trace
from nfsearch.runtime import launch as launch_mod
from nfsearch.runtime.bench import event_times, host_times, rotated
from nfsearch.runtime.context import ExecContext, issue, resolve_impl
from nfsearch.runtime.launch import WAIT_KINDS, LaunchList, layout_label
from nfsearch.runtime.model import OP_OUTPUT, ModelInstance, rel_error
from nfsearch.simulate import power_bound_for
from nfsearch.specs import Ceilings, GpuSpec
from nfsearch.timeline import Span, Timeline

TOLERANCE = 2e-2
__all__ = ["ExecContext", "ExecutionMismatch", "build_launch_list", "check", "execute", "format_table", "issue",
           "one_problem", "resolve_impl", "time_plans"]


class ExecutionMismatch(NfsearchError):
    """The nano-batched run does not compute what the sequential reference computes."""


# ---------------------------------------------------------------------------------------------- correctness
def check(ctx: ExecContext, model: ModelInstance, ll: LaunchList, tol: float = TOLERANCE):
    """Run the launches once on NaN-poisoned buffers, then the sequential torch reference; compare
    every op's output layer by layer. Returns (Correctness, the reference's final output)."""
    bufs = model.new_buffers(fill=float("nan"))
    issue(ctx, model, bufs, ll)
    _sync(ctx)
    ref_ll = launch_mod.sequential_launches(model.model, model.workload, model.num_layers, ll.num_sms, "torch",
                                            stream="reference")
    ref_bufs = model.new_buffers(fill=float("nan"))
    if ctx.is_cuda:
        # the reference runs on the current stream alone (no partitions, no side streams)
        for l in ref_ll.launches:
            model.run(ref_bufs, l.layer, l.op, *l.tokens, "torch", l.sms)
    else:
        issue(ctx, model, ref_bufs, ref_ll)
    _sync(ctx)
    errors, first, worst = [], "", 0.0
    for layer in range(model.num_layers):
        for op in dict.fromkeys(l.op for l in ref_ll.launches):
            rows = _op_rows(model, op)
            for name in OP_OUTPUT[op]:
                err = rel_error(bufs[layer][name][rows[0]:rows[1]], ref_bufs[layer][name][rows[0]:rows[1]])
                errors.append(OpError(layer, op, name, err))
                worst = max(worst, err)
                if not first and not err <= tol:
                    first = f"L{layer}.{op} ({name}): {err:.3g}"
    ref_out = ref_bufs[-1]["out"].clone()
    del bufs, ref_bufs
    return Correctness(not first, tol, worst, first, tuple(errors)), ref_out


def _op_rows(model: ModelInstance, op: str) -> tuple[int, int]:
    if op == "decode_attn":
        return (0, model.num_decode)
    if op == "prefill_attn":
        return (model.num_decode, model.num_tokens)
    return (0, model.num_tokens)


def _sync(ctx):
    if ctx.is_cuda:
        torch.cuda.synchronize(ctx.device)


# ---------------------------------------------------------------------------------------------- timing
class _Variant:
    """One thing to time: a callable, captured as a CUDA graph where it can be."""

    def __init__(self, label: str, fn, impls: dict[str, str], note: str = ""):
        self.label, self.fn, self.impls, self.note = label, fn, impls, note
        self.run, self.how = fn, "eager"
        self.repeats: list[float] = []

    def prepare(self, ctx: ExecContext, use_graph: bool) -> None:
        self.fn()                       # warm-up: builds layouts, compiles kernels, outside any capture
        _sync(ctx)
        if not use_graph:
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.fn()
            graph.replay()
            _sync(ctx)
            self.run, self.how, self.graph = graph.replay, "cuda-graph", graph
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager, with a note
            _sync(ctx)
            self.note = (self.note + "; " if self.note else "") + (
                f"CUDA-graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); timed eagerly")

    def timing(self, iters: int, num_layers: int, is_cuda: bool) -> Timing:
        return Timing(self.label, tuple(ms / num_layers for ms in self.repeats), iters,
                      self.how if is_cuda else "cpu", self.impls, self.note)


def time_variants(ctx: ExecContext, variants: list[_Variant], iters: int, repeats: int, watch=None) -> None:
    """`repeats` rounds; in each, every variant is timed as the median of `iters` runs (rounds interleave
    the variants, so drift of the clock or temperature hits all alike). Round r starts at variant
    r mod n (bench.rotated): no variant always runs first, right after the host's idle gap, or last,
    after the others have heated the GPU towards its power cap. CUDA events on the GPU, the host
    clock on the CPU. `watch(label)`: a context manager around each variant's round (NVML
    readings: give every variant the same one, so none pays for a sampler the others run without),
    or None."""
    for r in range(repeats):
        for v in rotated(variants, r):
            with watch(v.label) if watch is not None else contextlib.nullcontext():
                times = event_times(v.run, iters, warmup=2) if ctx.is_cuda else host_times(v.run, iters, warmup=1)
            v.repeats.append(statistics.median(times))


def measure_timeline(ctx: ExecContext, model: ModelInstance, bufs, ll: LaunchList, label: str,
                     runs: int = 3) -> Timeline:
    """Per-launch start/end from events around each launch (eager, outside the timed runs); the run
    with the median makespan is kept."""
    results = []
    for _ in range(runs):
        spans: dict = {}
        t0 = torch.cuda.Event(enable_timing=True)
        t0.record()
        issue(ctx, model, bufs, ll, spans=spans)
        _sync(ctx)
        rows = {i: (t0.elapsed_time(s), t0.elapsed_time(e)) for i, (s, e) in spans.items()}
        first = min(s for s, _ in rows.values())
        results.append({i: (s - first, e - first) for i, (s, e) in rows.items()})
    results.sort(key=lambda r: max(e for _, e in r.values()))
    chosen = results[len(results) // 2]
    spans_out = tuple(Span(l.id, l.op, l.layer, l.op_class, l.stream, l.sms, l.num_tokens, *chosen[l.id])
                      for l in ll.launches)
    return Timeline(label, spans_out, ll.num_layers)


# ---------------------------------------------------------------------------------------------- whole run
def execute(schedule, *, mode: str = "green", iters: int = 30, repeats: int = 3, use_graph: bool = True,
            timeline: bool = False, tol: float = TOLERANCE, with_baselines: bool = True,
            with_compiled: bool = True, compile_mode: str = "default", with_ceilings: bool = True, seed: int = 0,
            device: str = "cuda", ctx: ExecContext | None = None, ceilings: Ceilings | None = None, profile=None,
            weights_path: str | None = None, time_on_cpu: bool = False, progress=None) -> RunReport:
    """Check and time a plan on the device (with_baselines: seq-torch, seq-same and, with_compiled,
    seq-compiled beside it); returns a RunReport (its ``timeline`` is the measured per-launch one
    when asked). `profile`: the plan's profile (seq-same's impls; default: the bundled one).
    On a CPU device only the correctness check runs, unless time_on_cpu (host-clock timing of the
    same variants, no graphs, no ceilings measured: the CI tests walk the whole path with it).

    Raises ExecutionMismatch (naming the first diverging op) when the output is wrong.
    """
    if repeats < 1 or iters < 1:
        raise NfsearchError(f"repeats and iters must be >= 1, not {repeats} and {iters}")
    say = progress or (lambda msg: None)
    own_ctx = ctx is None
    ctx = ctx or ExecContext(device, mode)
    try:
        ll = build_launch_list(ctx, schedule)
        t_setup = time.time()
        model = ModelInstance(schedule.model, schedule.workload, schedule.num_layers, device=ctx.device,
                              seed=seed, weights_path=weights_path)
        model.prepare(ll.launches)
        _build_layouts(ctx, ll)
        say(f"model ready ({time.time() - t_setup:.1f} s; layouts {', '.join(layout_label(x) for x in ll.layouts)});"
            " checking correctness")
        correctness, ref_out = check(ctx, model, ll, tol)
        if not correctness.passed:
            raise ExecutionMismatch(f"plan output differs from the sequential reference: first at "
                                    f"{correctness.first_divergence} > {tol:g}")
        base = _base_fields(schedule, ctx, ll, correctness)
        notes = list(ll.notes)
        if not ctx.is_cuda and not time_on_cpu:
            return RunReport(**base, notes=tuple(notes + ctx.notes))
        use_graph = use_graph and ctx.is_cuda

        bufs = model.new_buffers()
        x0 = bufs[0]["x"]
        variants, failures = [], []
        if with_baselines:
            forward = baselines.torch_forward(model)
            variants.append(_checked(_Variant("seq-torch", lambda: forward(x0), {"layer": "torch (F.rms_norm, "
                                     "cuBLAS, bf16 RoPE, SDPA)"}), ref_out, tol))
            impls, same_notes = baselines.fastest_impls(schedule, ctx.num_sms, profile)
            notes += same_notes
            same = baselines.seq_same(schedule, ctx.num_sms, impls)
            model.prepare(same.launches)
            variants.append(_Variant("seq-same", lambda: issue(ctx, model, bufs, same), impls))
            if with_compiled:
                say(f"compiling seq-torch with torch.compile (mode {compile_mode})")
                v = _compiled(forward, x0, compile_mode, ref_out, tol, failures)
                say("seq-compiled: " + (v.note if v is not None else failures[-1][1]))
                if v is not None:
                    variants.append(v)
        variants.append(_Variant("plan", lambda: issue(ctx, model, bufs, ll), _resolved_impls(ll, "cuda")))
        kept = []
        for v in variants:
            say(f"capturing {v.label}")
            try:
                v.prepare(ctx, use_graph)
                kept.append(v)
            except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
                if v.label == "plan":
                    raise
                _sync(ctx)
                failures.append((v.label, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
        say(f"timing {', '.join(v.label for v in kept)}: {repeats} rounds of {iters} runs")
        nvml = windows = None
        if ctx.is_cuda:
            nvml, why = power.open_device(ctx.device.index or 0)
            if nvml is None:
                notes.append(f"power: {why}")
            else:
                # one window per variant: every round runs under the same NVML sampler (only the plan's
                # readings are reported), so the sampler's cost does not fall on the plan alone
                windows = {v.label: power.EnergyWindows(nvml) for v in kept}
        try:
            time_variants(ctx, kept, iters, repeats, watch=None if windows is None else (
                lambda label: windows[label].window()))
            reading = None
            if nvml is not None:
                say("measuring the plan's energy (back-to-back graph replays, NVML energy counter)")
                reading = _power_reading(next(v for v in kept if v.label == "plan"), nvml, windows["plan"],
                                         schedule.num_layers, notes)
        finally:
            if nvml is not None:
                nvml.close()
        timings = {v.label: v.timing(iters, schedule.num_layers, ctx.is_cuda) for v in kept}
        plan_t = timings.pop("plan")
        if plan_t.note:
            notes.append("plan: " + plan_t.note)
        ceil = ceilings
        if ceil is None and with_ceilings and ctx.is_cuda:
            say("measuring ceilings")
            ceil = bench.ceilings()
        measured_tl = None
        if timeline and ctx.is_cuda:
            say("measuring the per-op timeline (kernel trace of CUDA-graph replays)")
            try:
                measured_tl, facts = trace.measure_graph_timeline(
                    ctx, model, bufs, ll, f"measured ({ctx.mode}, CUDA-graph replay kernel trace, {ctx.gpu_name})")
                notes.append(f"timeline: kernel trace of {facts['num_replays']} graph replays, median kept; "
                             f"matched by {facts['method']}, {facts['num_skipped']} kernels unexpected")
            except Exception as exc:  # noqa: BLE001 - the profiler fails in many ways; eager timing, labelled
                _sync(ctx)
                notes.append(f"timeline: kernel trace failed ({type(exc).__name__}: {str(exc)[:200]}); "
                             "eager event timing instead")
                measured_tl = measure_timeline(ctx, model, bufs, ll, f"measured ({ctx.mode}, eager, {ctx.gpu_name})")
        pred = schedule.predicted.layer_time_ms if schedule.predicted is not None else None
        power_bound, power_note = _power_bound(schedule, profile)
        if power_bound is None:
            notes.append(f"power: {power_note}")
        bufs = model = variants = kept = None       # let the GPU buffers go (the variants close over them)
        return RunReport(**base, plan=plan_t,
                         baselines=tuple(timings[k] for k in ("seq-torch", "seq-same", "seq-compiled") if k in timings),
                         baseline_failures=tuple(failures),
                         predicted_layer_ms=(power_bound.layer_ms(pred) if pred and power_bound else pred or None),
                         ceilings=ceil, bound=None if ceil is None else _bound(schedule, ctx, ceil),
                         notes=tuple(notes + ctx.notes), timeline=measured_tl,
                         replay_layer_ms=pred if pred and power_bound else None,
                         power_bound=power_bound if pred else None, power=reading)
    finally:
        if own_ctx:
            ctx.close()


def time_plans(schedules: dict, ctx: ExecContext, *, iters: int = 30, repeats: int = 5, use_graph: bool = True,
               tol: float = TOLERANCE, seed: int = 0, progress=None) -> tuple[dict[str, Timing], list[str]]:
    """Plans of one problem timed against each other in one process (name -> plan): one model (the
    same weights and inputs for all), each plan checked against the sequential reference, then
    `repeats` rounds that interleave them (time_variants). Plans run one after another in separate
    runs see the clock and the temperature drift between them: under the power cap one W3 plan can
    time 3.37 and 3.64 ms/layer on the same H100 in two runs minutes apart, more than most gaps
    between candidates.
    Returns each correct plan's timing and a note for each plan left out."""
    first = one_problem(schedules)
    say = progress or (lambda msg: None)
    model = ModelInstance(first.model, first.workload, first.num_layers, device=ctx.device, seed=seed)
    bufs = model.new_buffers()
    variants, notes = [], []
    for name, schedule in schedules.items():
        ll = build_launch_list(ctx, schedule)
        model.prepare(ll.launches)
        _build_layouts(ctx, ll)
        correctness, _ = check(ctx, model, ll, tol)
        if not correctness.passed:
            notes.append(f"{name}: left out, output differs from the reference at {correctness.first_divergence}")
            continue
        variants.append(_Variant(name, lambda ll=ll: issue(ctx, model, bufs, ll),
                                 _resolved_impls(ll, "cuda" if ctx.is_cuda else "cpu")))
    for v in variants:
        v.prepare(ctx, use_graph and ctx.is_cuda)
    say(f"timing {', '.join(v.label for v in variants)} against each other: {repeats} interleaved rounds of "
        f"{iters} runs")
    time_variants(ctx, variants, iters, repeats)
    timings = {v.label: v.timing(iters, first.num_layers, ctx.is_cuda) for v in variants}
    variants = bufs = model = None          # let the GPU buffers go (the variants close over them)
    return timings, notes


def one_problem(schedules: dict):
    """The first of `schedules` (name -> plan), after checking that all are of its model, workload and
    layer count: plans are timed against each other within one problem only."""
    if not schedules:
        raise NfsearchError("no plans to time")
    names = list(schedules)
    first = schedules[names[0]]
    for name in names[1:]:
        s = schedules[name]
        if (s.model, s.workload, s.num_layers) != (first.model, first.workload, first.num_layers):
            raise NfsearchError(f"plan {name} is of another model, workload or layer count than {names[0]}: "
                                f"plans are timed against each other within one problem")
    return first


def build_launch_list(ctx: ExecContext, schedule) -> LaunchList:
    """The plan's launch list for `ctx`: on the GPU at its SM count and partition granularity."""
    return launch_mod.build(schedule, num_sms=ctx.num_sms if ctx.is_cuda else None,
                            granularity=ctx.granularity if ctx.is_cuda else None)


def _build_layouts(ctx: ExecContext, ll: LaunchList) -> None:
    """Build every green-context layout the launch list uses before any capture (fails early); none
    off the GPU."""
    if ctx.is_cuda:
        for layout in ll.layouts:
            if layout.build != "whole":
                ctx.build(layout)


def _resolved_impls(ll: LaunchList, device_type: str) -> dict[str, str]:
    """op -> the impl each of the launch list's ops runs on `device_type` (a timing's impls)."""
    return {op: resolve_impl(op, i, device_type) for op, i in baselines.plan_impls(ll).items()}


PLAN_ENERGY_WINDOW_S = 0.5      # the sustained loop of the plan's graph (runtime/power.py)


def _power_reading(plan: _Variant, nvml, windows, num_layers: int, notes: list[str]) -> PowerReading | None:
    """The plan's PowerReading: a sustained back-to-back loop of its graph (energy per layer, time,
    power, samples) and what the timing rounds' windows saw; None (noted) where the loop fails."""
    try:
        m = power.measure_energy(plan.run, nvml, window_s=PLAN_ENERGY_WINDOW_S)
    except Exception as exc:  # noqa: BLE001 - the run stands without its energy
        _sync_quietly()
        notes.append(f"power: the plan's energy loop failed ({type(exc).__name__}: {str(exc)[:160]})")
        return None
    return power.reading_of(m, windows, num_layers)


def _sync_quietly() -> None:
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - a device error shows again where it matters
        pass


def _power_bound(schedule, profile):
    """The profile's power bound of one layer of the plan (simulate.power_bound_for: the plan's own
    where the profile has pair energy points), or None and why."""
    if profile is None:
        return None, "no power bound: no profile given (run --profile with a profile that has energy)"
    try:
        return power_bound_for(schedule, profile)
    except NfsearchError as exc:
        return None, f"no power bound: {exc}"


def _checked(variant: _Variant, ref_out, tol: float) -> _Variant:
    """Run a whole-stack variant once and compare its output with the reference's (noted on the
    timing: a baseline that computes something else is no baseline)."""
    out = variant.fn()
    err = rel_error(out, ref_out)
    variant.note = f"output vs reference: rel error {err:.2g}" + ("" if err <= tol else f" > {tol:g} (WRONG)")
    return variant


def _compiled(forward, x0, compile_mode: str, ref_out, tol: float, failures: list) -> _Variant | None:
    """seq-compiled: torch.compile of the seq-torch forward (first call compiles); None on failure."""
    t0 = time.time()
    try:
        fn = torch.compile(forward, mode=None if compile_mode == "default" else compile_mode, dynamic=False)
        fn(x0)
        if x0.is_cuda:
            torch.cuda.synchronize(x0.device)
    except Exception as exc:  # noqa: BLE001 - torch.compile fails in many ways; one line says which
        failures.append(("seq-compiled", f"torch.compile failed ({type(exc).__name__}: "
                                         f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})"))
        return None
    v = _checked(_Variant("seq-compiled", lambda: fn(x0), {"layer": f"torch.compile(seq-torch, mode={compile_mode})"}),
                 ref_out, tol)
    v.note += f"; compiled in {time.time() - t0:.0f} s"
    return v


def _base_fields(schedule, ctx, ll: LaunchList, correctness: Correctness) -> dict:
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        versions["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton missing (CPU): the report just lacks its version
        versions["triton"] = ""
    waits = [k for l in ll.launches for k in l.wait_kinds]
    summary = LaunchSummary(len(ll.launches), tuple(ll.keys), tuple(layout_label(x) for x in ll.layouts),
                            tuple((k, waits.count(k)) for k in WAIT_KINDS),
                            len(ll.capacity_edges))
    return dict(gpu=ctx.gpu_name, num_sms=ctx.num_sms, date=datetime.datetime.now().isoformat(timespec="seconds"),
                mode=ctx.mode, versions=versions, model=schedule.model.name,
                model_num_layers=schedule.model.num_layers, workload=schedule.workload.name,
                num_tokens=schedule.workload.num_tokens, num_layers=schedule.num_layers,
                solver=schedule.solver.name, plan_profile=schedule.profile.label, plan_gpu=schedule.gpu.name,
                launches=summary, correctness=correctness)


def _bound(schedule, ctx, ceilings: Ceilings) -> Bound:
    gpu = GpuSpec(key="measured", name=ctx.gpu_name, num_sms=ctx.num_sms, sm_granularity=max(ctx.granularity, 1),
                  peak_tflops=ceilings.gemm_tflops, mem_bandwidth_tbps=ceilings.copy_tbps,
                  net_bandwidth_gbps=1e9, figures_source="measured in this run")
    r = roofline(schedule.model, schedule.workload, gpu)
    return Bound(r.bound_ms, r.compute_ms, r.mem_ms, r.tokens_per_s)
