"""Per-op times of a plan AS EXECUTED: a kernel trace (torch.profiler, CUPTI) of CUDA-graph replays of
the plan, mapped back to nano-ops. `nfsearch run --timeline` writes this as measured.json.

Why not events around each launch: eager launches from Python leave host gaps the graph does not
have, and events recorded between kernels add their own waits; a kernel trace of the replayed graph
times exactly the kernels the timed plan runs, where and when they run.

How kernels are mapped back (a replayed graph has no Python ranges in it):
1. SIGNATURES. One profiler run first issues every launch once eagerly, alone, on its own
   stream (its green-context group), inside a range named ``nf:<launch id>`` and synchronised, so
   each kernel record is attributed to its launch by CUPTI correlation (the launch API call inside
   the range) or, failing that, by lying inside the range's time window. Each launch's signature is
   the names of its kernels in order.
2. REPLAY. In the same profiler run the launches are captured into one CUDA graph exactly as
   ``context.issue`` issues them for the executor's timing, and the graph is replayed back to back,
   as the timing loop replays it: STEADY_REPLAYS replays first (traced, dropped), then the kept
   ones, with no synchronisation in between. Replays synchronised one by one let the GPU idle
   between them and run at clocks the timing loop does not see (W3 on an H100 traced that way ran
   3.21 ms/layer against 3.69 in the timing loop). Kernel records of one replay carry the
   correlation of its cudaGraphLaunch (or lie inside the ``nf:replay:<i>`` range when they do not).
3. MATCH. The replay's kernels, in start order, are handed out greedily: a kernel goes to the
   earliest-issued launch that can be running it: the first unfinished launch of its stream key
   (a stream runs its launches in issue order), whose waits are all finished, and whose next
   expected kernel has this kernel's name. Kernels no launch expects (e.g. a memset a capture adds)
   are counted and skipped. If names do not line up (a library picks another kernel under capture),
   the match is retried on structure and kernel counts alone, and the timeline's label says so.
A nano-op's span is its first kernel's start to its last kernel's end; times are relative to the
replay's first kernel. Of the replays, the one with the median makespan is kept.

The mapping (`signatures_from_events`, `replays_from_events`, `match_kernels`, `timeline_from_match`)
works on plain trace events and is tested on the CPU; `measure_graph_timeline` needs CUDA.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import tempfile
from dataclasses import dataclass

from nfsearch.errors import NfsearchError
from nfsearch.timeline import Span, Timeline

RANGE_PREFIX = "nf:"
REPLAY_PREFIX = "nf:replay:"
GRAPH_LAUNCH_NAMES = ("cudaGraphLaunch", "cuGraphLaunch")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver", "runtime", "driver")
RANGE_CATEGORIES = ("user_annotation", "cpu_op", "python_function")
# device records mapped to launches: kernels, and copies (a copy-engine all-reduce's nano-op is its
# peer copies and its sum kernel: its span starts with the copies)
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy")
DEFAULT_REPLAYS = 5
STEADY_REPLAYS = 20         # back-to-back replays before the kept ones (clocks and power settle)


class TraceError(NfsearchError):
    """The kernel trace could not be mapped back to the plan's nano-ops."""


@dataclass(frozen=True)
class Kernel:
    """One kernel record of a trace (times in microseconds, the trace's clock)."""
    name: str
    start_us: float
    end_us: float
    stream: int = -1
    correlation: int = -1

    def __post_init__(self):
        if not (math.isfinite(self.start_us) and math.isfinite(self.end_us)) or self.end_us < self.start_us:
            raise TraceError(f"kernel {self.name[:60]}: bad times {self.start_us!r}..{self.end_us!r}")


@dataclass(frozen=True)
class Expected:
    """What one launch is known to run: its stream key, the launches it waits on, its kernel names."""
    id: str
    key: str
    waits: tuple[str, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        if not self.names:
            raise TraceError(f"launch {self.id} ran no kernel in the signature pass")


@dataclass(frozen=True)
class Match:
    """Kernels handed to each launch id, how the match was made, kernels no launch expected."""
    kernels: dict
    method: str                     # "names" | "structure"
    num_skipped: int

    def bounds_us(self, launch_id: str) -> tuple[float, float]:
        ks = self.kernels[launch_id]
        return min(k.start_us for k in ks), max(k.end_us for k in ks)


# ------------------------------------------------------------------------------------ trace events
def _complete(events) -> list[dict]:
    return [e for e in events if isinstance(e, dict) and e.get("ph") == "X" and "ts" in e]


def _correlation(e: dict) -> int:
    args = e.get("args") or {}
    value = args.get("correlation", args.get("correlation id", -1))
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _kernel(e: dict) -> Kernel:
    args = e.get("args") or {}
    try:
        stream = int(args.get("stream", -1))
    except (TypeError, ValueError):
        stream = -1
    start = float(e["ts"])
    return Kernel(str(e.get("name", "")), start, start + float(e.get("dur", 0.0)), stream, _correlation(e))


def _ranges(events: list[dict], prefix: str) -> list[tuple[float, float, str, object]]:
    """Host ranges whose name starts with `prefix`: (start, end, name without prefix, thread)."""
    out = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e["name"][len(prefix):], e.get("tid"))
           for e in events if e.get("cat") in RANGE_CATEGORIES and str(e.get("name", "")).startswith(prefix)]
    return sorted(out)


def _in_range(ranges, ts: float):
    """The range containing `ts` (ranges sorted and disjoint), or None."""
    i = bisect.bisect_right([r[0] for r in ranges], ts) - 1
    return ranges[i] if i >= 0 and ranges[i][0] <= ts <= ranges[i][1] else None


def signatures_from_events(events, ids: list[str]) -> dict[str, list[Kernel]]:
    """Kernels of each `nf:<id>` range of the signature pass: by correlation with a launch API call
    inside the range, else (no such call recorded) by the kernel lying inside the range's window
    (the pass synchronises inside each range)."""
    events = _complete(events)
    wanted = set(ids)
    ranges = [r for r in _ranges(events, RANGE_PREFIX) if r[2] in wanted]
    if not ranges:
        raise TraceError("the trace has no nf:<launch> ranges (the profiler recorded no host ranges)")
    owner: dict[int, str] = {}
    for e in events:
        if e.get("cat") in LAUNCH_CATEGORIES and _correlation(e) >= 0:
            r = _in_range(ranges, float(e["ts"]))
            if r is not None and (r[3] is None or e.get("tid") is None or r[3] == e.get("tid")):
                owner[_correlation(e)] = r[2]
    out: dict[str, list[Kernel]] = {i: [] for i in ids}
    for e in events:
        if e.get("cat") not in DEVICE_CATEGORIES:
            continue
        k = _kernel(e)
        name = owner.get(k.correlation)
        if name is None:
            r = _in_range(ranges, k.start_us)
            if r is None or k.end_us > r[1]:
                continue                    # a kernel of the replays, or of no launch
            name = r[2]
        out[name].append(k)
    for ks in out.values():
        ks.sort(key=lambda k: (k.start_us, k.end_us))
    return out


def replays_from_events(events) -> list[list[Kernel]]:
    """The kernels of each graph replay, replays in launch order: grouped by the correlation of their
    cudaGraphLaunch; where kernels carry none, by lying inside an `nf:replay:<i>` range."""
    events = _complete(events)
    launches = sorted((float(e["ts"]), _correlation(e)) for e in events
                      if e.get("name") in GRAPH_LAUNCH_NAMES and _correlation(e) >= 0)
    kernels = [_kernel(e) for e in events if e.get("cat") in DEVICE_CATEGORIES]
    by_corr: dict[int, list[Kernel]] = {c: [] for _, c in launches}
    for k in kernels:
        if k.correlation in by_corr:
            by_corr[k.correlation].append(k)
    groups = [by_corr[c] for _, c in launches if by_corr[c]]
    if not groups:
        ranges = _ranges(events, REPLAY_PREFIX)
        groups = [[k for k in kernels if lo <= k.start_us and k.end_us <= hi] for lo, hi, _, _ in ranges]
        groups = [g for g in groups if g]
    for g in groups:
        g.sort(key=lambda k: (k.start_us, k.end_us))
    return groups


# ------------------------------------------------------------------------------------ matching
def match_kernels(kernels: list[Kernel], expected: list[Expected]) -> Match:
    """Hand each replayed kernel to its launch (see the module doc); by names first, then by
    structure alone. Raises TraceError when neither accounts for every expected kernel."""
    try:
        return _greedy(kernels, expected, by_name=True)
    except TraceError as first:
        if len(kernels) != sum(len(x.names) for x in expected):
            raise TraceError(f"{first}; and the replay ran {len(kernels)} kernels where the launches ran "
                             f"{sum(len(x.names) for x in expected)}, so no structural match either") from None
        return _greedy(kernels, expected, by_name=False)


def _greedy(kernels: list[Kernel], expected: list[Expected], by_name: bool) -> Match:
    order = {x.id: i for i, x in enumerate(expected)}
    unknown = sorted({w for x in expected for w in x.waits if w not in order})
    if unknown:
        raise TraceError(f"launches wait on unknown ids {unknown[:3]}")
    queues: dict[str, list[Expected]] = {}
    for x in expected:
        queues.setdefault(x.key, []).append(x)
    head = {key: 0 for key in queues}
    got: dict[str, list[Kernel]] = {x.id: [] for x in expected}
    done: set[str] = set()
    skipped = 0
    for k in sorted(kernels, key=lambda k: (k.start_us, k.end_us)):
        best = None
        for key, q in queues.items():
            if head[key] >= len(q):
                continue
            x = q[head[key]]
            if any(w not in done for w in x.waits):
                continue
            if by_name and x.names[len(got[x.id])] != k.name:
                continue
            if best is None or order[x.id] < order[best.id]:
                best = x
        if best is None:
            skipped += 1
            continue
        got[best.id].append(k)
        if len(got[best.id]) == len(best.names):
            done.add(best.id)
            head[best.key] += 1
    missing = [x.id for x in expected if x.id not in done]
    if missing:
        how = "by kernel names" if by_name else "by structure"
        raise TraceError(f"{len(missing)} of {len(expected)} launches not found in the replay {how} "
                         f"(first {missing[0]}: {len(got[missing[0]])} of "
                         f"{len(next(x for x in expected if x.id == missing[0]).names)} kernels)")
    return Match(got, "names" if by_name else "structure", skipped)


def timeline_from_match(match: Match, launches, label: str, num_layers: int) -> Timeline:
    """One span per launch: first kernel start to last kernel end, in ms from the replay's first kernel."""
    t0 = min(match.bounds_us(l.id)[0] for l in launches)
    spans = []
    for l in launches:
        lo, hi = match.bounds_us(l.id)
        spans.append(Span(l.id, l.op, l.layer, l.op_class, l.stream, l.sms, l.num_tokens,
                          (lo - t0) / 1e3, (hi - t0) / 1e3))
    return Timeline(label, tuple(spans), num_layers)


def expected_from(launches, signatures: dict[str, list[Kernel]]) -> list[Expected]:
    return [Expected(l.id, l.key, tuple(l.waits), tuple(k.name for k in signatures.get(l.id, ())))
            for l in launches]


def timeline_from_events(events, launches, label: str, num_layers: int,
                         num_kept: int | None = None) -> tuple[Timeline, dict]:
    """The whole mapping on one trace: signatures, replays (the last `num_kept` of them, all when
    None), a match per replay, the replay with the median makespan kept. Returns (timeline, facts
    about the trace for the report's notes)."""
    launches = list(launches)
    signatures = signatures_from_events(events, [l.id for l in launches])
    expected = expected_from(launches, signatures)
    replays = replays_from_events(events)
    if not replays:
        raise TraceError("the trace holds no kernels of a graph replay")
    if num_kept is not None:
        if len(replays) < num_kept:
            raise TraceError(f"the trace holds {len(replays)} graph replays, not the {num_kept} kept ones")
        replays = replays[-num_kept:]
    results = []
    for ks in replays:
        m = match_kernels(ks, expected)
        tl = timeline_from_match(m, launches, label, num_layers)
        results.append((tl.makespan_ms, tl, m))
    results.sort(key=lambda r: r[0])
    _, tl, m = results[len(results) // 2]
    facts = {"num_replays": len(replays), "method": m.method, "num_skipped": m.num_skipped,
             "num_kernels": sum(len(v) for v in m.kernels.values()),
             "replay_makespans_ms": [round(r[0], 4) for r in results]}
    if m.method != "names":
        tl = Timeline(tl.label + ", matched by structure (kernel names differed under capture)", tl.spans,
                      tl.num_layers)
    return tl, facts


# ------------------------------------------------------------------------------------ on the GPU
def measure_graph_timeline(ctx, model, bufs, ll, label: str, replays: int = DEFAULT_REPLAYS,
                           steady_replays: int = STEADY_REPLAYS, agree=None) -> tuple[Timeline, dict]:
    """Trace `steady_replays` + `replays` back-to-back CUDA-graph replays of the plan's launches (see
    the module doc), keep the last `replays`, and map them back to nano-ops. `ctx`, `model`, `bufs`, `ll`: as executor.execute holds them (layouts built,
    kernels compiled). Returns (Timeline with one span per launch, facts).

    `agree` (tensor parallel, runtime.tp): agree(ok) -> whether every rank was ok, called by every
    rank after each step a rank may fail alone (profiler start, signature pass, capture). A rank's
    failure inside a step is held until the step ends (a failed launch of the signature pass does
    not stop the later ones: the other ranks' collectives need this rank's), then every rank raises
    TraceError together, before the next step issues a collective: the ranks issue the same
    collectives the same number of times (one per network launch in the signature pass, then the
    graph's 1 + steady_replays + replays replays) or stop at the same point. Without `agree` a
    failure raises at once."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from nfsearch.runtime.context import issue, resolve_impl  # torch: not for the CPU-tested mapping

    if not ctx.is_cuda:
        raise TraceError("a kernel trace needs a CUDA device")
    if replays < 1:
        raise TraceError(f"replays must be >= 1, not {replays}")
    device = ctx.device
    failures: list[str] = []

    def attempt(fn, *args) -> None:
        if agree is None:
            fn(*args)
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - held until every rank has finished the step
            failures.append(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}")

    def settle(step: str) -> None:
        if agree is not None and not agree(not failures):
            raise TraceError(f"{step} failed " + (f"on this rank ({failures[0]})" if failures else "on another rank"))

    def signature(l) -> None:                 # each launch alone, on its own stream
        with record_function(RANGE_PREFIX + l.id):
            with torch.cuda.stream(ctx.stream_for(l)):   # (the device was synchronised: nothing to wait on)
                model.run(bufs, l.layer, l.op, *l.tokens, resolve_impl(l.op, l.impl, "cuda"), l.sms)
            torch.cuda.synchronize(device)

    graph = torch.cuda.CUDAGraph()

    def capture() -> None:
        with torch.cuda.graph(graph):
            issue(ctx, model, bufs, ll)

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    attempt(prof.start)
    is_started = not failures
    try:
        settle("starting the profiler")
        torch.cuda.synchronize(device)
        for l in ll.launches:
            attempt(signature, l)
        settle("the signature pass")
        attempt(capture)
        settle("the graph capture")
        graph.replay()                      # first replay: uploads the graph; not used
        torch.cuda.synchronize(device)
        for i in range(steady_replays + replays):     # back to back, as the timing loop runs them
            with record_function(f"{REPLAY_PREFIX}{i}"):
                graph.replay()
        torch.cuda.synchronize(device)
    finally:
        if is_started:
            prof.stop()
    fd, path = tempfile.mkstemp(suffix=".json", prefix="nfsearch-trace-")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            data = json.load(f)
    finally:
        os.unlink(path)
    graph = None                # the graph holds its memory pool; drop it before mapping
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    return timeline_from_events(events, ll.launches, label, ll.num_layers, num_kept=replays)

