"""`nfsearch bench --numerics bf16,fp8,fp8+fp8kv`: one trace through a fresh engine per numerics setting,
in one process on one GPU, and a table of the settings side by side.

Each setting is run_bench with its quantization and KV cache dtype; its report is run_bench's own. Between
settings the previous engine (weights, KV cache, CUDA graphs and their pool) is dropped and the device's
cached memory handed back (gc, cuBLAS workspaces, torch.cuda.empty_cache), so every engine sizes its KV
cache from the same free memory: the engine's dry run counts whatever torch still holds allocated as
weights, and memory cached but unused as its own, so a leftover would shrink the next cache. The memory
seen before each engine start is recorded ("memory_at_start") to show it was the same.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import torch

from nfsearch.errors import NfsearchError
from nfsearch.runtime.bench_engine import BenchOptions, run_bench
from nfsearch.runtime.engine import Engine

# setting -> (BenchOptions.quantization, BenchOptions.kv_cache_dtype); "bf16" is the model's dtype (fp32 on the CPU)
NUMERICS = {"bf16": (None, "auto"), "fp8": ("fp8", "auto"), "fp8kv": (None, "fp8"), "fp8+fp8kv": ("fp8", "fp8")}
GIB = 1 << 30


def parse_numerics(text: str) -> list[str]:
    """'bf16,fp8,fp8+fp8kv' -> the settings in the order given; NfsearchError (one line) on an unknown,
    empty or repeated one."""
    names = [part.strip() for part in text.split(",")]
    known = ", ".join(NUMERICS)
    for i, name in enumerate(names):
        if name not in NUMERICS:
            what = "an empty setting" if not name else f"unknown setting {name!r}"
            raise NfsearchError(f"--numerics {text!r}: {what} (use a comma-separated list of {known})")
        if name in names[:i]:
            raise NfsearchError(f"--numerics {text!r}: {name} is given twice")
    return names


def run_numerics(opts: BenchOptions, settings: list[str], echo=print, progress: bool = True,
                 make_engine=Engine, on_report=None) -> dict:
    """run_bench once per setting, a fresh engine each time, the same trace and seed. on_report(setting,
    report) is called as each run ends. Returns {"settings", "seed", "numerics": [run_bench's report per
    setting], "table": numerics_table(...), "memory_at_start": [release_device_memory's dict per setting]}."""
    if opts.is_compare or opts.tp_degree != 1 or opts.plans:
        raise NfsearchError("--numerics runs one engine per setting on one GPU: drop --compare, --tp and --plans")
    reports, memory, previous = [], [], None
    for i, name in enumerate(settings):
        quantization, kv_cache_dtype = NUMERICS[name]
        at_start = release_device_memory(opts.device)
        at_start["setting"] = name
        at_start["is_previous_engine_released"] = None if previous is None else previous() is None
        if at_start["is_previous_engine_released"] is False:
            echo("warning: the previous engine is still referenced, so its memory is not free for this one")
        memory.append(at_start)
        echo(f"numerics {name} ({i + 1} of {len(settings)}): quantization {quantization or 'none'}, "
             f"KV cache {kv_cache_dtype}")
        made = []
        report = run_bench(replace(opts, quantization=quantization, kv_cache_dtype=kv_cache_dtype), echo,
                           progress, _tracking(make_engine, made))
        previous = made[-1] if made else None
        reports.append(report)
        if on_report is not None:
            on_report(name, report)
    release_device_memory(opts.device)
    return {"settings": list(settings), "seed": opts.seed, "numerics": reports,
            "table": numerics_table(settings, reports), "memory_at_start": memory}


def _tracking(make_engine, made: list):
    """make_engine that leaves a weak reference to each engine it makes in `made` (to see it released)."""
    def make(*args, **kwargs):
        engine = make_engine(*args, **kwargs)
        made.append(weakref.ref(engine))
        return engine
    return make


def release_device_memory(device: str) -> dict:
    """Collect dropped engines and hand the device's cached blocks back; what the device has then."""
    gc.collect()
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"free_bytes": None, "allocated_bytes": None, "reserved_bytes": None}
    torch.cuda.synchronize(dev)
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:     # cuBLAS keeps its workspace allocated: the next dry run counts it anew
        clear_workspaces()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(dev)
    return {"free_bytes": free, "allocated_bytes": torch.cuda.memory_allocated(dev),
            "reserved_bytes": torch.cuda.memory_reserved(dev)}


# ------------------------------------------------------------------------------------ the table
def numerics_table(settings: list[str], reports: list[dict]) -> list[dict]:
    """One row per setting: the numbers to read side by side (steady window unless named whole)."""
    rows = []
    for name, r in zip(settings, reports, strict=True):
        s, e, steady, p = r["summary"], r["engine"], r["steady"], r.get("power") or {}
        rows.append({
            "setting": name, "gpu": r["gpu"], "gemm": r["gemm"], "quantization": r["quantization"],
            "kv_cache_dtype": r["kv_cache_dtype"], "kv_tokens": e["kv_tokens"], "num_pages": e["num_pages"],
            "dense_batch": e["dense_batch"], "max_decode": e["max_decode"],
            "steady_total_tokens_per_s": s["steady_total_tokens_per_s"], "total_tokens_per_s": s["total_tokens_per_s"],
            "steady_output_tokens_per_s": s["steady_output_tokens_per_s"],
            "output_tokens_per_s": s["output_tokens_per_s"], "is_steady_window": s["is_steady_window"],
            "steady_joules_per_token": p.get("steady_joules_per_token"), "joules_per_token": p.get("joules_per_token"),
            "mean_power_w": p.get("mean_power_w"), "median_sm_clock_mhz": p.get("median_sm_clock_mhz"),
            "steady_mean_decode_batch": steady["mean_decode_batch"], "max_concurrency": e["max_concurrency"],
            "decode_batch_pct_of_kv": 100 * steady["mean_decode_batch"] / max(e["max_concurrency"], 1),
            "pct_of_optimal": s["pct_of_optimal"], "optimal_tokens_per_s": s["optimal_tokens_per_s"]})
    return rows


TABLE_COLUMNS = ("setting", "GEMMs", "KV cache (tokens)", "total tok/s steady (whole)", "output tok/s",
                 "J/token", "power W", "SM MHz", "decode batch (% KV)", "% optimal")


def format_numerics(result: dict) -> str:
    """The side-by-side table printed after the per-setting reports."""
    rows, first = result["table"], result["numerics"][0]
    trace = first["trace"]
    cells = [TABLE_COLUMNS] + [_cells(row) for row in rows]
    widths = [max(len(c[k]) for c in cells) for k in range(len(TABLE_COLUMNS))]
    lines = [(f"numerics side by side: {first['gpu']}, {first['model']}, {trace['name']} "
              f"({trace['num_requests']} requests, seed {result.get('seed', '-')}); steady window, whole run "
              "in brackets")]
    lines += ["  ".join(c.ljust(w) if k < 3 else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths)))
              for row in cells]
    free = [m["free_bytes"] for m in result.get("memory_at_start", [])]
    if free and None not in free:
        held = [m["allocated_bytes"] / (1 << 20) for m in result["memory_at_start"]]
        lines.append("GPU memory free at each engine's start: " + " / ".join(f"{f / GIB:.2f}" for f in free)
                     + " GiB (torch holding " + " / ".join(f"{h:.0f}" for h in held) + " MiB)")
    return "\n".join(lines)


def _cells(row: dict) -> tuple[str, ...]:
    gemm = "fp8 w8a8" if row["quantization"] == "fp8" else row["gemm"]
    whole = f" ({row['total_tokens_per_s']:,.0f})" if row["is_steady_window"] else " (whole run)"
    return (row["setting"], gemm, f"{row['kv_cache_dtype']} {row['kv_tokens']:,}",
            f"{row['steady_total_tokens_per_s']:,.0f}{whole}", f"{row['steady_output_tokens_per_s']:,.0f}",
            _num(row["steady_joules_per_token"], "{:.4f}"),
            _num(row["mean_power_w"], "{:.0f}"), _num(row["median_sm_clock_mhz"], "{:.0f}"),
            f"{row['steady_mean_decode_batch']:.1f} ({row['decode_batch_pct_of_kv']:.0f}%)",
            _num(row["pct_of_optimal"], "{:.1f}%"))


def _num(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
