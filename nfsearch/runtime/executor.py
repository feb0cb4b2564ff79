"""Execute a plan on the GPU: launches on their streams with cross-stream event waits, one CUDA graph
for the whole layer stack, correctness against the sequential torch reference, timing beside the
seq-torch and seq-same baselines and the measured roofline bound.

Everything the run needs lives in one ExecContext (device, SM partitions, a stream per stream key,
an event per recorded launch); there are no module globals. On a CPU device the same code runs the
launches in plan order with the "torch" impls (used by the CI tests).
"""

from __future__ import annotations

import datetime
import statistics
import time

import torch

from nfsearch.runtime import launch as launch_mod
from nfsearch.errors import NfsearchError
from nfsearch.runtime.launch import Launch, LaunchList
from nfsearch.runtime.bench import event_times
from nfsearch.runtime.kernels import IMPLS
from nfsearch.runtime.collectives import COLLECTIVE_OPS
from nfsearch.runtime.model import OP_OUTPUT, ModelInstance, rel_error
from nfsearch.runtime.partitions import PartitionError
from nfsearch.timeline import Span, Timeline

TOLERANCE = 2e-2


class ExecutionMismatch(NfsearchError):
    """The nano-batched run does not compute what the sequential reference computes."""


def resolve_impl(op: str, impl: str, device_type: str) -> str:
    """The impl to run: the plan's if the registry has it, else our SM-bounded kernels on CUDA and the
    torch impls on CPU (analytic profiles name their impl "analytic")."""
    if op in COLLECTIVE_OPS:          # network nano-ops: the TP model's op_allreduce_* (runtime.collectives)
        return "collective"
    if device_type != "cuda":
        return "torch"
    return impl if impl in IMPLS[op] else "triton"


# ---------------------------------------------------------------------------------------------- context
class ExecContext:
    """Device, SM partitions, streams per stream key, events per launch id, notes."""

    def __init__(self, device="cuda", mode: str = "green"):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.notes: list[str] = []
        self.partitions = None
        self.mode = mode if self.is_cuda else "cpu"
        self.num_sms, self.granularity = 1, 1
        self._streams: dict[str, object] = {}
        self._events: dict[str, object] = {}
        self._sm_mismatch_noted = False
        self._failed_splits: set[str] = set()
        if self.is_cuda:
            from nfsearch.runtime.partitions import SmPartitions
            idx = self.device.index or 0
            props = torch.cuda.get_device_properties(idx)
            self.gpu_name, self.num_sms = props.name, int(props.multi_processor_count)
            try:
                self.partitions = SmPartitions(idx, mode)
            except PartitionError as exc:
                if mode != "green":
                    raise
                self.notes.append(f"green contexts unavailable ({exc}); running grid mode (plain streams, "
                                  "SM-bounded grids)")
                self.mode = "grid"
                self.partitions = SmPartitions(idx, "grid")
            self.granularity = self.partitions.granularity if self.mode == "green" else 8
        else:
            self.gpu_name = "cpu"

    def stream_for(self, l: Launch):
        """Green mode: the stream of the launch's SM interval (keys on one interval share it: they are
        predicted not to co-run). Grid mode and whole-GPU launches: one plain stream per key."""
        if self.mode == "green" and not l.partition.is_whole:
            sizes, group = l.partition.split
            try:
                sms, stream = self.partitions.split(sizes)[group]
            except PartitionError as exc:
                # middle groups are built as nested splits (SmPartitions.build); a layout the driver
                # still refuses runs on a plain stream, its kernels bounded by their grids (num_sms).
                if l.partition.label not in self._failed_splits:
                    self._failed_splits.add(l.partition.label)
                    self.notes.append(f"no green context for {l.partition.label} (split {sizes}: {exc}); "
                                      "plain stream with an SM-bounded grid")
                key = "plain@" + l.partition.label
                if key not in self._streams:
                    self._streams[key] = torch.cuda.Stream(device=self.device)
                return self._streams[key]
            if sms != l.partition.sms and not self._sm_mismatch_noted:
                self._sm_mismatch_noted = True
                self.notes.append(f"green group for {l.partition.label} has {sms} SMs, not {l.partition.sms}")
            return stream
        if l.key not in self._streams:
            self._streams[l.key] = torch.cuda.Stream(device=self.device)
        return self._streams[l.key]

    def event(self, launch_id: str):
        if launch_id not in self._events:
            self._events[launch_id] = torch.cuda.Event()
        return self._events[launch_id]

    def close(self):
        if self.partitions is not None:
            self.partitions.close()
            self.partitions = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------- issue
def issue(ctx: ExecContext, model: ModelInstance, bufs, ll: LaunchList, impl: str | None = None,
          spans: dict | None = None) -> None:
    """Issue every launch in order. On CUDA: fork from the current stream, wait on events of other
    streams, record an event where a later launch waits on it, join back at the end (so the same
    code runs eagerly and under graph capture). `spans` (eager only): id -> (start, end) timing events."""
    if not ctx.is_cuda:
        for l in ll.launches:
            model.run(bufs, l.layer, l.op, *l.tokens, resolve_impl(l.op, impl or l.impl, "cpu"), l.sms)
        return
    origin = torch.cuda.current_stream(ctx.device)
    fork = torch.cuda.Event()
    fork.record(origin)
    used: dict[int, object] = {}
    for l in ll.launches:
        s = ctx.stream_for(l)
        if s.cuda_stream not in used:
            s.wait_event(fork)
            used[s.cuda_stream] = s
        for d in l.waits:
            s.wait_event(ctx.event(d))
        with torch.cuda.stream(s):
            if spans is not None:
                spans[l.id] = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                spans[l.id][0].record(s)
            model.run(bufs, l.layer, l.op, *l.tokens, resolve_impl(l.op, impl or l.impl, "cuda"), l.sms)
            if spans is not None:
                spans[l.id][1].record(s)
        if l.record:
            ctx.event(l.id).record(s)
    for s in used.values():
        join = torch.cuda.Event()
        join.record(s)
        origin.wait_event(join)


# ---------------------------------------------------------------------------------------------- correctness
def check(ctx: ExecContext, model: ModelInstance, ll: LaunchList, tol: float = TOLERANCE) -> dict:
    """Run the launches once on NaN-poisoned buffers, then the sequential torch reference; compare
    every op's output layer by layer. Returns {passed, max_rel_error, first_divergence, errors}."""
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
    errors, first, worst = [], None, 0.0
    for layer in range(model.num_layers):
        for op in dict.fromkeys(l.op for l in ref_ll.launches):
            rows = _op_rows(model, op)
            for name in OP_OUTPUT[op]:
                err = rel_error(bufs[layer][name][rows[0]:rows[1]], ref_bufs[layer][name][rows[0]:rows[1]])
                errors.append({"layer": layer, "op": op, "buffer": name, "rel_error": err})
                worst = max(worst, err)
                if first is None and not err <= tol:
                    first = {"id": f"L{layer}.{op}", "buffer": name, "rel_error": err}
    del bufs, ref_bufs
    return {"passed": first is None, "tolerance": tol, "max_rel_error": worst, "first_divergence": first,
            "errors": errors}


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
def time_launches(ctx: ExecContext, model: ModelInstance, bufs, ll: LaunchList, iters: int = 30,
                  use_graph: bool = True, impl: str | None = None) -> dict:
    """Median ms of one run of the launch list: CUDA-graph replays (eager if capture fails)."""
    issue(ctx, model, bufs, ll, impl)          # warm-up: compiles the kernels, outside any capture
    _sync(ctx)
    how, note, fn = "eager", None, (lambda: issue(ctx, model, bufs, ll, impl))
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                issue(ctx, model, bufs, ll, impl)
            graph.replay()
            _sync(ctx)
            how, fn = "cuda-graph", graph.replay
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager, with a note
            note = f"CUDA-graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); timed eagerly"
            _sync(ctx)
            graph = None
    times = event_times(fn, iters, warmup=3)
    out = {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "iters": iters, "how": how}
    if note:
        out["note"] = note
    return out


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
def execute(schedule, *, mode: str = "green", iters: int = 30, use_graph: bool = True, timeline: bool = False,
            tol: float = TOLERANCE, with_baselines: bool = True, with_ceilings: bool = True, seed: int = 0,
            device: str = "cuda", ctx: ExecContext | None = None, ceilings: dict | None = None,
            weights_path: str | None = None, progress=None) -> tuple[dict, Timeline | None]:
    """Check and time a plan on the device. Returns (report dict, measured Timeline or None).

    Raises ExecutionMismatch (naming the first diverging op) when the output is wrong.
    """
    from nfsearch.runtime import baselines, bench

    say = progress or (lambda msg: None)
    own_ctx = ctx is None
    ctx = ctx or ExecContext(device, mode)
    try:
        ll = launch_mod.build(schedule, num_sms=ctx.num_sms if ctx.is_cuda else None,
                              granularity=ctx.granularity if ctx.is_cuda else None)
        t_setup = time.time()
        model = ModelInstance(schedule.model, schedule.workload, schedule.num_layers, device=ctx.device,
                              seed=seed, weights_path=weights_path)
        model.prepare(ll.launches)
        say(f"model ready ({time.time() - t_setup:.1f} s); checking correctness")
        correctness = check(ctx, model, ll, tol)
        if not correctness["passed"]:
            f = correctness["first_divergence"]
            raise ExecutionMismatch(f"plan output differs from the sequential reference: first at {f['id']} "
                                    f"({f['buffer']}), rel error {f['rel_error']:.3g} > {tol:g}")
        report = _base_report(schedule, ctx, ll, correctness)
        if not ctx.is_cuda:
            return report, None
        bufs = model.new_buffers()
        if with_baselines:
            # baselines first: plain streams only, so a failed capture of the plan cannot spoil them
            say("timing the baselines")
            for name, bl in (("seq_torch", baselines.seq_torch(schedule, ctx.num_sms)),
                             ("seq_same", baselines.seq_same(schedule, ll, ctx.num_sms))):
                model.prepare(bl.launches)
                t = time_launches(ctx, model, bufs, bl, iters, use_graph)
                report["baselines"][name] = {**t, "layer_ms": t["ms"] / schedule.num_layers,
                                             "impls": baselines.plan_impls(bl)}
        say("timing the plan")
        plan_t = time_launches(ctx, model, bufs, ll, iters, use_graph)
        report["plan_run"] = plan_t
        measured = plan_t["ms"] / schedule.num_layers
        report["measured_layer_ms"] = measured
        pred = schedule.predicted.layer_time_ms if schedule.predicted is not None else None
        report["predicted_layer_ms"] = pred
        report["prediction_error"] = None if pred is None else (pred - measured) / measured
        for name, b in report["baselines"].items():
            report[f"speedup_vs_{name}"] = b["layer_ms"] / measured
        if with_ceilings:
            say("measuring ceilings")
            ceilings = ceilings or bench.ceilings()
        if ceilings:
            report["ceilings"] = ceilings
            report.update(_bound(schedule, ctx, ceilings, measured))
        report["tokens_per_s"] = schedule.workload.num_tokens / (measured * 1e-3 * schedule.model.num_layers)
        measured_tl = None
        if timeline:
            say("measuring the per-op timeline")
            measured_tl = measure_timeline(ctx, model, bufs, ll, f"measured ({ctx.mode}, eager, {ctx.gpu_name})")
            report["timeline_layer_ms_eager"] = measured_tl.layer_time_ms
        report["notes"] = list(ll.notes) + ctx.notes + ([plan_t["note"]] if "note" in plan_t else [])
        del bufs, model
        return report, measured_tl
    finally:
        if own_ctx:
            ctx.close()


def _base_report(schedule, ctx, ll, correctness) -> dict:
    import platform
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        versions["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton missing (CPU): the report just lacks its version
        versions["triton"] = None
    return {
        "gpu": ctx.gpu_name, "num_sms": ctx.num_sms, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": versions, "mode": ctx.mode,
        "model": schedule.model.name, "workload": schedule.workload.name, "num_tokens": schedule.workload.num_tokens,
        "num_layers": schedule.num_layers, "solver": schedule.solver.name,
        "plan_profile": schedule.profile.label, "plan_gpu": schedule.gpu.name,
        "launches": ll.summary(),
        "correctness": {k: v for k, v in correctness.items() if k != "errors"},
        "correctness_per_op": correctness["errors"], "baselines": {},
    }


def _bound(schedule, ctx, ceilings: dict, measured_ms: float) -> dict:
    from nfsearch.roofline import roofline
    from nfsearch.specs import GpuSpec
    gpu = GpuSpec(key="measured", name=ctx.gpu_name, num_sms=ctx.num_sms, sm_granularity=max(ctx.granularity, 1),
                  peak_tflops=ceilings["gemm_tflops"], mem_bandwidth_tbps=ceilings["copy_tbps"],
                  net_bandwidth_gbps=1e9, figures_source="measured in this run")
    r = roofline(schedule.model, schedule.workload, gpu)
    return {"bound_ms": r.bound_ms, "bound_compute_ms": r.compute_ms, "bound_mem_ms": r.mem_ms,
            "pct_of_bound": r.bound_ms / measured_ms, "optimal_tokens_per_s": r.tokens_per_s}


def format_table(reports: list[dict]) -> str:
    head = (f"{'workload':<16}{'layer ms':>9}{'pred ms':>9}{'err':>7}{'bound':>8}{'%bound':>8}"
            f"{'seq-torch':>10}{'x':>6}{'seq-same':>9}{'x':>6}  mode/graph")
    lines = [head]
    for r in reports:
        if "measured_layer_ms" not in r:
            lines.append(f"{r.get('workload', '?'):<16} FAILED: {r.get('error', '?')[:90]}")
            continue
        b = r.get("baselines", {})
        st, ss = b.get("seq_torch", {}), b.get("seq_same", {})
        pe = r.get("prediction_error")
        lines.append(
            f"{r['workload']:<16}{r['measured_layer_ms']:>9.3f}{(r.get('predicted_layer_ms') or 0):>9.3f}"
            f"{(pe * 100 if pe is not None else 0):>6.0f}%{r.get('bound_ms', 0):>8.3f}"
            f"{r.get('pct_of_bound', 0) * 100:>7.0f}%{st.get('layer_ms', 0):>10.3f}"
            f"{r.get('speedup_vs_seq_torch', 0):>6.2f}{ss.get('layer_ms', 0):>9.3f}"
            f"{r.get('speedup_vs_seq_same', 0):>6.2f}  {r['mode']}/{r['plan_run']['how']}")
    return "\n".join(lines)
