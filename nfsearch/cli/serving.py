"""Serving requests with the engine: bench (a request trace, here or against a running server) and serve
(an OpenAI-compatible HTTP API)."""

import sys
from pathlib import Path

import click
from click.core import ParameterSource

from nfsearch.cli.common import (
    MAX_SEED,
    OUT_DIR,
    FiniteFloatRange,
    all_or_none,
    check_outputs,
    echo,
    slug,
    write_json,
)
from nfsearch.errors import NfsearchError


@click.command("bench")
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
                   "JSON with a report per setting and a side-by-side table (the settings done so far are "
                   "kept in OUTPUT's .partial.json until the last ends). Not with --quantization, "
                   "--kv-cache-dtype, --compare, --tp, --plans or --url.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the random weights, the synthetic trace and the prompts' token ids.")
@click.option("--tp", "tp_degree", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Tensor-parallel ranks on this host (one GPU each, NCCL; gloo with --device cpu).")
@click.option("--plans", "plans_path", type=click.Path(dir_okay=False),
              help="A plan family (solve --family): each bucket's graph runs its plan's kernels; refused when made "
                   "for another model, dense batch or buckets.")
@click.option("--gemm-choice/--no-gemm-choice", "choose_gemms", default=True, show_default=True,
              help="On the GPU, time each bucket's GEMMs at its row count with cuBLAS and the Triton TMA GEMM "
                   "before capture and run the faster (by >= 5%); off: cuBLAS everywhere.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="JSON report (default: ./out/bench-*.json).")
def bench_cmd(model, url, request_rate, sweep, max_duration_s, slo_stat, max_tpot_ms, max_concurrency, slo_ms,
              trace_spec, num_requests, dense_batch, utilization, page_size, device, dtype, is_compare, quantization,
              kv_cache_dtype, numerics_text, seed, tp_degree, plans_path, choose_gemms, output):
    """Serve a request trace with the engine: tokens/s per GPU against optimal, idle, power, latency."""
    if numerics_text is not None:
        _refuse_beside_numerics(quantization, is_compare, tp_degree, plans_path, url)
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
        from nfsearch.runtime.bench_numerics import parse_numerics
        settings = parse_numerics(numerics_text)
    default = OUT_DIR / default_output(model, trace_spec)
    output = output or str(default.with_name(f"{default.stem}-numerics.json") if settings else default)
    check_outputs([output], (".json",), may_create_out=True)
    opts = BenchOptions(model, trace_spec, num_requests, dense_batch, utilization, page_size, device, dtype,
                        is_compare, seed, max_tpot_ms=max_tpot_ms, quantization=quantization,
                        kv_cache_dtype=kv_cache_dtype, plans=plans_path, choose_gemms=choose_gemms)
    if settings:
        return _bench_numerics(opts, settings, output, format_report)
    if tp_degree > 1:
        from nfsearch.runtime.engine_tp import run_bench_tp
        report = run_bench_tp(opts, tp_degree)
    else:
        report = run_bench(opts, echo=echo)
    report["command"] = " ".join(["nfsearch"] + sys.argv[1:])
    with all_or_none([Path(output)]):        # written before it is formatted: the run is kept whatever follows
        write_json(output, report)
    echo(format_report(report))
    echo(f"wrote {output}")


def _refuse_beside_numerics(quantization, is_compare, tp_degree, plans_path, url) -> None:
    """`bench --numerics` sets the numerics itself, on one engine here: refuse the flags that would clash."""
    given = click.get_current_context().get_parameter_source("kv_cache_dtype") == ParameterSource.COMMANDLINE
    clash = [flag for flag, on in (("--quantization", quantization), ("--kv-cache-dtype", given),
                                   ("--compare", is_compare), ("--tp", tp_degree > 1), ("--plans", plans_path),
                                   ("--url", url)) if on]
    if clash:
        raise NfsearchError(f"--numerics sets the GEMMs and KV cache per setting on one engine: drop "
                            f"{', '.join(clash)}")


def _bench_numerics(opts, settings, output, format_report) -> None:
    """`bench --numerics`: the trace once per setting (runtime/bench_numerics.py), one JSON and a table."""
    from nfsearch.runtime.bench_numerics import format_numerics, run_numerics
    command = " ".join(["nfsearch"] + sys.argv[1:])
    # a setting takes minutes on a GPU: each one done is kept, so a run cut short keeps what it measured
    partial, done = Path(output).with_suffix(".partial.json"), []

    def on_report(name, r):
        echo(f"--- numerics {name}\n{format_report(r)}")
        done.append(r)
        write_json(partial, {"is_partial": True, "settings": list(settings), "numerics": done, "command": command})

    report = run_numerics(opts, settings, echo=echo, on_report=on_report)
    report["command"] = command
    echo(format_numerics(report))
    with all_or_none([Path(output)]):
        write_json(output, report)
    partial.unlink(missing_ok=True)
    echo(f"wrote {output}")


def _bench_url(url, request_rate, max_concurrency, slo_ms, trace_spec, num_requests, seed, output, sweep=None,
               max_duration_s=540.0, slo_stat="p90"):
    """`bench --url`: the trace against a running server; latency percentiles and goodput; with a list of
    rates or --sweep auto, every rate and the highest meeting the SLO, plotted beside the JSON."""
    from nfsearch.serving.online_bench import format_online, run_online_bench
    from nfsearch.serving.online_sweep import SweepOptions, format_sweep, parse_rates, run_sweep
    from nfsearch.serving.traces import load_trace
    rates = parse_rates(request_rate) if request_rate else None
    is_sweep = sweep == "auto" or (rates is not None and len(rates) > 1)
    stem = f"bench-online-{'sweep-' if is_sweep else ''}{slug(trace_spec)}"
    output = output or str(OUT_DIR / f"{stem}.json")
    plots = [Path(output).with_suffix(".png"), Path(output).with_suffix(".html")] if is_sweep else []
    check_outputs([output, *map(str, plots)], (".json", ".png", ".html"), may_create_out=True)
    trace = load_trace(trace_spec, num_requests, seed)
    command = " ".join(["nfsearch"] + sys.argv[1:])
    if is_sweep:
        opts = SweepOptions(None if sweep == "auto" else rates, rates[0] if rates else 1.0, max_duration_s, slo_ms,
                            slo_stat, max_concurrency, seed)
        report = run_sweep(url, trace.requests, opts, echo=lambda line: echo(line, err=True))
        report.update(trace=trace.name, command=command)
        echo(format_sweep(report))
    else:
        report = run_online_bench(url, trace.requests, rates[0] if rates else float("inf"), max_concurrency,
                                  slo_ms, seed)
        report.update(trace=trace.name, command=command)
        echo(format_online(report))
    with all_or_none([Path(output), *plots]):
        write_json(output, report)
        if plots:
            from nfsearch.serving.sweep_plot import write_plots
            write_plots(report, *plots)
    echo(f"wrote {output}" + "".join(f", {p}" for p in plots))


@click.command("serve")
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
    serve(model, host, port, engine_kwargs, echo=lambda line: echo(line, err=True))
