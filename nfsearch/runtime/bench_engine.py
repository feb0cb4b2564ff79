"""`nfsearch bench`: a trace through the engine, then tokens/s against optimal and what explains it.

trace (serving.traces) -> Engine.run (with an NVML sampler on a thread and the board's energy counter
read at both ends) -> serving.metrics.summarize (whole run and steady window) -> GPU idle, variants,
power, the energy of each bucket (runtime.bucket_energy: the sampled energy counter split by a fit over
the iterations' GPU timeline), P_gemm (a large bf16 cuBLAS GEMM measured after the run, same process), the
per-op trace of one iteration per bucket -> one JSON-able dict and a printed table.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

from nfsearch.errors import NfsearchError
from nfsearch.runtime import engine_stats as es
from nfsearch.runtime.bucket_energy import bucket_energy
from nfsearch.runtime.bucket_energy_report import format_lines as energy_lines
from nfsearch.runtime.engine import Engine, TraceShape
from nfsearch.serving.metrics import RequestRecord, optimal_tokens_per_s, summarize
from nfsearch.serving.model_config import load_model_config
from nfsearch.serving.traces import load_trace

COMPARE_EVERY = 100              # iterations per variant turn under --compare
FAMILY_COMPARE = ("plan: the family's plans (overlapped where a plan splits or overlaps ops: nano-ops on side "
                  "streams and SM shares in the bucket's graph); sequential: the same family op by op on one "
                  "stream (same buckets, kernels per op, graphs, cache and batches)")


@dataclass
class BenchOptions:
    model: str
    trace: str
    num_requests: int | None
    dense_batch: int | None = None
    gpu_memory_utilization: float = 0.90
    page_size: int = 16
    device: str = "cuda"
    dtype: str | None = None         # None: bf16 on the GPU, fp32 on the CPU
    is_compare: bool = False
    seed: int = 0
    is_async: bool = True
    with_op_trace: bool | None = None   # None: on the GPU only (eager torch attention on the CPU is slow)
    max_tpot_ms: float | None = None    # --max-tpot: cap the dense batch so iterations stay under it
    tp_degree: int = 1               # >1: this process is one TP rank (runtime.engine_tp.run_bench_tp)
    quantization: str | None = None  # "fp8": W8A8 e4m3 GEMMs (Engine's quantization)
    plans: str | None = None         # a plan family file: each bucket's graph with its plan's kernels
    kv_cache_dtype: str = "auto"     # "auto": the model's dtype; "fp8": e4m3 + per-(token, kv head) scales
    compare_every: int | None = None  # iterations per variant turn under --compare (None: COMPARE_EVERY)
    choose_gemms: bool = True        # per bucket rows, cuBLAS or a faster GEMM timed at start-up (gemm_choice)


def run_bench(opts: BenchOptions, echo=print, progress: bool = True, make_engine=Engine) -> dict:
    """make_engine: Engine's signature (a TP rank passes its TpEngine)."""
    cfg = load_model_config(opts.model)
    trace = load_trace(opts.trace, opts.num_requests, opts.seed, max_context=cfg.max_model_len)
    servable = [r for r in trace.requests if r.prompt_len + r.output_len <= cfg.max_model_len]
    if not servable:
        raise NfsearchError(f"trace {trace.name}: no request fits the model's context {cfg.max_model_len}")
    echo(f"trace {trace.name}: {trace.description}")
    # --compare: the plan's kernels against torch's; with a family, its plans against the same run op by op
    variants = ("plan", "sequential" if opts.plans else "baseline") if opts.is_compare else ("plan",)
    every = opts.compare_every or COMPARE_EVERY
    engine = make_engine(opts.model, device=opts.device, dtype=opts.dtype or ("bf16" if opts.device == "cuda" else "fp32"),
                    gpu_memory_utilization=opts.gpu_memory_utilization, dense_batch=opts.dense_batch,
                    page_size=opts.page_size, is_async=opts.is_async, seed=opts.seed,
                    trace_shape=TraceShape.of(servable), variants=variants, log=echo,
                    **({"max_tpot_ms": opts.max_tpot_ms} if opts.max_tpot_ms else {}),
                    **({"quantization": opts.quantization} if opts.quantization else {}),
                    **({"plans": opts.plans} if opts.plans else {}),
                    **({"kv_cache_dtype": opts.kv_cache_dtype} if opts.kv_cache_dtype != "auto" else {}),
                    **({} if opts.choose_gemms else {"choose_gemms": False}))
    nvml = _open_nvml(engine)
    with _Progress(len(trace.requests), progress) as bar:
        sampler, energy0 = _start_power(nvml)
        run = engine.run(trace.requests, compare_every=every if opts.is_compare else 0,
                         on_finish=bar.update)
        energy_j = _stop_power(nvml, sampler, energy0)
    p_gemm = es.gpu_peak_flops(engine.device)
    optimal = optimal_tokens_per_s(p_gemm, es.count_params(cfg.spec)) if p_gemm else None
    summary = summarize([RequestRecord.from_sequence(s) for s in run.sequences], 0.0, run.wall_s, optimal,
                        num_gpus=opts.tp_degree)
    steady = es.window(run, summary.steady_start_s, summary.steady_end_s)
    report = {
        "gpu": engine.device_name(), "tp_degree": opts.tp_degree, "model": cfg.spec.name, "dtype": engine.dtype_name,
        "gemm": engine.gemm_numerics, "quantization": engine.quantization, "kv_cache_dtype": engine.kv_dtype_name,
        "weights_source": engine.weights.fp8_source, "weights_bytes": engine.weights.num_bytes,
        "trace": {"name": trace.name, "description": trace.description, "is_synthetic": trace.is_synthetic,
                  "num_requests": len(trace.requests)},
        "engine": _engine_dict(engine),
        "summary": summary.to_dict(),
        "p_gemm_tflops": p_gemm / 1e12 if p_gemm else None,
        "params_layers_and_head": es.count_params(cfg.spec),
        "whole_run": es.window(run, 0.0, run.wall_s).to_dict(), "steady": steady.to_dict(),
        "batches": {v: s.to_dict() for v, s in run.batch_stats.items()},
        "kv_pages": {"num_pages": engine.num_pages, "peak_used": run.peak_used_pages,
                     "peak_used_fraction": run.peak_used_pages / engine.num_pages},
        "num_preemptions": run.num_preemptions, "num_discarded_tokens": run.num_discarded_tokens,
        "host_waits_per_iteration": run.num_host_waits / max(len(run.iterations), 1),
        "num_eager_launches": run.num_eager_launches,
        "refused": [{"request_id": s.seq_id, "reason": s.error} for s in run.refused][:20],
        "num_refused": len(run.refused),
        "power": _power(nvml, sampler, run, summary, steady, energy_j),
    }
    report["buckets_energy"] = _analysis("energy per bucket", echo, lambda: bucket_energy(
        run.iterations, sampler.samples if sampler else [], run.start_perf_s, run.wall_s,
        (report["power"] or {}).get("power_limit_w"), list(engine.buckets)).to_dict())
    if opts.is_compare:
        report["compare"] = {
            "every_iterations": every,
            "what_differs": FAMILY_COMPARE if opts.plans else ("plan: the engine's kernels per dense op (" + ", ".join(
                f"{op} {impl}" for op, impl in sorted(engine_ops().items())) + ", the rest torch/cuBLAS); "
                "baseline: torch (cuBLAS GEMMs, F.rms_norm, torch SiLU) for every dense op. Both: the same "
                "paged Triton attention, RoPE, sampling, buckets, graphs, cache and batches."),
            "steady": [v.to_dict() for v in es.variant_stats(run, summary.steady_start_s, summary.steady_end_s)]}
    if getattr(engine, "family", None) is not None:
        from nfsearch.runtime.engine_plans import family_report
        report["family"] = _analysis("the family's report", echo, lambda: family_report(engine, run))
    if opts.with_op_trace or (opts.with_op_trace is None and engine.is_cuda):
        report["op_trace"] = _analysis("the per-op trace", echo, lambda: es.op_trace(engine))
    if nvml is not None:
        nvml.close()
    return report


def _analysis(what: str, echo, compute):
    """A block computed from a finished run: a failure there is recorded in its place ({"error": ...})
    and said in one line, so minutes of measured serving are never lost to the analysis after them."""
    try:
        return compute()
    except Exception as exc:  # noqa: BLE001 - any failure of an analysis, the run's own numbers kept
        echo(f"warning: {what} failed after the run: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}


def engine_ops() -> dict:
    from nfsearch.runtime.engine import PLAN_OPS
    return dict(PLAN_OPS)


def _engine_dict(engine: Engine) -> dict:
    return {"kv_tokens": engine.kv_tokens, "num_pages": engine.num_pages, "page_size": engine.page_size,
            "kv_dtype": engine.kv_dtype_name, "kv_bytes_per_token": engine.kv_token_bytes,
            "max_concurrency": engine.max_concurrency(), "dense_batch": engine.dense_batch,
            "max_decode": engine.max_decode, "attn_impl": engine.attn_impl, "is_cuda": engine.is_cuda,
            "cuda_graphs": engine.use_cuda_graphs, "is_async": engine.is_async,
            "buckets": [asdict(b) for b in engine.buckets],
            "max_tpot": _tpot_dict(getattr(engine, "tpot_cap", None)),
            "memory": engine.plan.to_dict() if engine.plan else None,
            "startup_s": {"load": engine.load_s, "compile": engine.compile_s, "capture": engine.capture_s},
            "gemm_choice": getattr(engine, "gemm_choice", None)}


def _tpot_dict(cap) -> dict | None:
    """What --max-tpot chose: the cap, the dense batch against the uncapped one, the time model."""
    if cap is None:
        return None
    return {"max_tpot_ms": cap.max_tpot_ms, "dense_batch": cap.dense_batch,
            "uncapped_dense_batch": cap.uncapped_dense_batch, "max_decode": cap.max_decode,
            "predicted_ms": cap.predict_ms(cap.dense_batch), "time_model": asdict(cap.time_model),
            "measured_over_predicted": cap.ratio, "final_token_budget": cap.token_budget}


# ------------------------------------------------------------------------------------ power
def _open_nvml(engine: Engine):
    if not engine.is_cuda:
        return None
    from nfsearch.runtime.power import open_device
    device, _ = open_device(engine.device.index or 0)
    return device


def _start_power(nvml):
    if nvml is None:
        return None, None
    from nfsearch.runtime.power import Sampler
    sampler = Sampler(nvml, period_s=0.05)
    sampler.__enter__()
    return sampler, nvml.energy_mj()


def _stop_power(nvml, sampler, energy0) -> float | None:
    if sampler is None:
        return None
    sampler.__exit__(None, None, None)
    return (nvml.energy_mj() - energy0) / 1e3


def _power(nvml, sampler, run, summary, steady, energy_j) -> dict | None:
    if sampler is None:
        return None
    tokens = summary.input_tokens + summary.output_tokens
    out = es.power_summary(sampler.samples, run.start_perf_s, summary.steady_start_s, summary.steady_end_s,
                           energy_j, tokens)
    if out["mean_power_w"] and summary.steady_total_tokens_per_s:
        out["steady_joules_per_token"] = out["mean_power_w"] / summary.steady_total_tokens_per_s
    out["power_limit_w"] = nvml.power_limit_w()
    return out


class _Progress:
    """tqdm over finished requests; a plain line every ~10% where tqdm is not installed."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.bar = total, enabled, 0, None
        self._t0 = time.perf_counter()

    def __enter__(self):
        if self.enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=self.total, unit="req", file=sys.stderr, mininterval=0.5)
            except ImportError:
                pass
        return self

    def update(self, seq=None) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and self.done % max(1, self.total // 10) == 0:
            print(f"  {self.done}/{self.total} requests done, {time.perf_counter() - self._t0:.1f} s",
                  file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------ the table
def format_report(r: dict) -> str:
    s, e, steady, whole = r["summary"], r["engine"], r["steady"], r["whole_run"]
    b = r["batches"]["plan"] if "plan" in r["batches"] else next(iter(r["batches"].values()))
    pct = f"{s['pct_of_optimal']:.1f}% of {s['optimal_tokens_per_s']:,.0f}" if s["pct_of_optimal"] else "-"
    rows = [
        ("GPU", r["gpu"] + (f" x {r['tp_degree']} (tensor parallel)" if r.get("tp_degree", 1) > 1 else "")),
        ("model / trace", (f"{r['model']} {r['dtype']} / {r['trace']['name']} ({r['trace']['num_requests']} requests"
                          f"{', synthetic' if r['trace']['is_synthetic'] else ''})")),
        ("GEMMs", r.get("gemm", r["dtype"]) + (f" ({r['weights_source']})" if r.get("weights_source") else "")),
        ("KV cache", (f"{e.get('kv_dtype', r['dtype'])} {e['kv_tokens']:,} tokens ({e['num_pages']:,} pages of "
                     f"{e['page_size']}), max concurrency {e['max_concurrency']:,}")),
        ("dense batch / decode slots", f"{e['dense_batch']} / {e['max_decode']}, {len(e['buckets'])} buckets"),
        ("start-up s", "load {load:.1f}, compile {compile:.1f}, capture {capture:.1f}".format(**e["startup_s"])),
        ("", f"{'steady':>12} {'whole run':>12}"),
        ("total tokens/s per GPU", f"{s['steady_total_tokens_per_s']:>12,.0f} {s['total_tokens_per_s']:>12,.0f}"),
        ("output tokens/s per GPU", f"{s['steady_output_tokens_per_s']:>12,.0f} {s['output_tokens_per_s']:>12,.0f}"),
        ("iterations/s", f"{steady['iterations_per_s']:>12.2f} {whole['iterations_per_s']:>12.2f}"),
        ("GPU idle", f"{steady['idle_pct']:>11.1f}% {whole['idle_pct']:>11.1f}%" if r["engine"]["is_cuda"]
         else "- (no GPU)"),
        ("window s", f"{steady['wall_s']:>12.1f} {whole['wall_s']:>12.1f}"
                     + ("" if s["is_steady_window"] else "  (no steady window: whole run)")),
        ("% of optimal (steady)", pct + (f" (P_gemm {r['p_gemm_tflops']:.0f} TFLOP/s)" if r["p_gemm_tflops"] else "")),
        ("mean decode / dense batch", (f"{b['mean_decode_batch']:.1f} / {b['mean_dense_batch']:.1f} tokens, "
                                      f"padding {100 * b['padding_fraction']:.1f}% (whole run)")),
        ("steady mean decode batch", (f"{steady['mean_decode_batch']:.1f} = "
                                     f"{100 * steady['mean_decode_batch'] / max(e['max_concurrency'], 1):.0f}% of the "
                                     f"{e['max_concurrency']} requests the KV cache holds")),
        ("TTFT s p50/p90/p99", _pcts(s["ttft_s"], 1.0, "{:.2f}")),
        ("TPOT ms p50/p90/p99", _pcts(s["tpot_s"], 1e3, "{:.1f}")),
        ("KV pages peak", (f"{r['kv_pages']['peak_used']:,} of {r['kv_pages']['num_pages']:,} "
                          f"({100 * r['kv_pages']['peak_used_fraction']:.0f}%)")),
        ("preemptions / refused", f"{r['num_preemptions']} / {r['num_refused']}"),
        ("host waits per iteration", f"{r['host_waits_per_iteration']:.2f}"),
    ]
    p = r.get("power")
    if p:
        clock = f"{p['median_sm_clock_mhz']:.0f} MHz" if p["median_sm_clock_mhz"] else "-"
        watts = f"{p['mean_power_w']:.0f} W" if p["mean_power_w"] else "-"
        rows.append(("power / SM clock (steady)", (f"{watts} of {p['power_limit_w']:.0f} W, {clock}, "
                                                  f"power-capped {100 * p['power_capped_share']:.0f}% of samples")))
        if p.get("joules_per_token"):
            rows.append(("joules per token", (f"{p.get('steady_joules_per_token') or 0:.4f} steady, "
                                             f"{p['joules_per_token']:.4f} whole run")))
    lines = [f"{k:<28} {v}" for k, v in rows]
    lines.append("buckets (tokens/decode/segments/context): hits, " + "; ".join(
        f"{h['max_tokens']}/{h['max_decode']}/{h['max_segments']}/{h['max_context']} {100 * h['fraction']:.0f}%"
        for h in b["bucket_hits"]))
    failed = {k: r[k]["error"] for k in ("op_trace", "buckets_energy", "family")
              if isinstance(r.get(k), dict) and "error" in r[k]}
    lines += [f"{k}: not computed ({why})" for k, why in failed.items()]
    for t in ([] if "op_trace" in failed else r.get("op_trace", [])):
        ms = t["ms_by_class"]
        lines.append(f"op trace bucket {t['max_tokens']}/{t['max_decode']}/{t['max_segments']}/{t['max_context']}: "
                     f"gemm {ms['gemm']:.2f} ms, attention {ms['attention']:.2f}, other {ms['other']:.2f}, "
                     f"total {t['total_ms']:.2f} ms")
    for v in r.get("compare", {}).get("steady", []):
        lines.append(f"compare {v['variant']:<9} {v['tokens_per_s']:>9,.0f} tokens/s over {v['num_iterations']} "
                     f"iterations, GPU {v['gpu_ms_per_iteration']:.2f} ms/iteration, {v['gpu_us_per_token']:.2f} us/token")
    if r.get("compare"):
        lines.append("compare: " + r["compare"]["what_differs"])
    energy = None if "buckets_energy" in failed else r.get("buckets_energy")
    if r.get("family") and "family" not in failed:
        from nfsearch.runtime.engine_plans import format_family
        lines += format_family(r["family"], r["summary"]["total_tokens_per_s"], energy)
    if energy and (not r.get("family") or "family" in failed or len({b["variant"] for b in energy["buckets"]}) > 1):
        lines += energy_lines(energy)          # a family's table shows the "plan" variant's beside its predictions
    return "\n".join(lines)


def _pcts(p: dict, scale: float, fmt: str) -> str:
    if p["p50"] is None:
        return "-"
    return " / ".join(fmt.format(p[k] * scale) for k in ("p50", "p90", "p99"))


def default_output(model: str, trace: str) -> str:
    """bench-<model>-<trace>.json (a config.json path is named by its folder)."""
    import re
    from pathlib import Path
    path = Path(model)
    name = path.parent.name if path.name == "config.json" else path.name
    slug = "-".join(re.sub(r"[^A-Za-z0-9._]+", "-", s).strip("-.") for s in (name, Path(trace).stem))
    return f"bench-{slug}.json"
