"""Does an op's energy depend on how many SMs it runs on, or on which kernel runs it?

The power bound of `nfsearch simulate/run` sums each op's energy measured on the whole GPU, so every
split of a layer gets the same bound. If a memory-bound op spends less energy on a small partition
(idle SMs draw less than SMs stalled on memory), an overlapped plan that gives decode attention
32 SMs would spend less energy per layer than its sequential twin, and under the power cap run
faster: what W2 measured (1.06x seq-same at the cap). This probe measures, on one GPU, the board
energy per call of llama-3-8b's decode attention and GEMMs at W2's sizes on green-context partitions
of several SM counts (runtime/power.measure_energy: a sustained back-to-back loop of a CUDA graph, the
other SMs idle), with the impl a plan uses there, and the static power.

    PYTHONPATH=. python benchmarks/energy_by_sms.py --out DIR      (one GPU, about 1.5 minutes)
    PYTHONPATH=. python benchmarks/energy_by_sms.py --by-impl --out DIR

--by-impl: each GEMM at 2048 tokens and decode attention at 512 requests on the whole GPU with every
registered impl instead (does the choice of kernel change the energy of a layer at the power cap?);
the ratio column is then over the op's torch impl.

Writes DIR/energy_by_sms_<gpu>_<date>.json (GPU name, date, command) and prints a table last: per
op and SM count, ms per call, J per call, dynamic J (above static x time), W, SM clock, capped share.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

from nfsearch.runtime import power
from nfsearch.runtime.bench import event_times
from nfsearch.runtime.kernels import IMPLS
from nfsearch.runtime.partitions import SmPartitions

DT = torch.bfloat16
HID, INTER, HQ, HKV, HD = 4096, 14336, 32, 8, 128
GEMMS = {"kqv": (HID, (HQ + 2 * HKV) * HD), "o": (HQ * HD, HID), "ug": (HID, 2 * INTER), "d": (INTER, HID)}
CASES = [("decode_attn", "tma", 512, (16, 32, 48, 64, 100, 132)),
         ("kqv", "tma", 2048, (84, 100, 116, 132)),
         ("ug", "tma", 2048, (84, 100, 116, 132)),
         ("d", "tma", 2048, (84, 100, 116, 132))]
IMPL_CASES = ([(op, impl, 2048, (132,)) for op in GEMMS for impl in ("torch", "tma", "triton", "cublaslt")]
              + [("decode_attn", impl, 512, (132,)) for impl in ("torch", "tma", "triton")])
GRAPH_MS = 2.0


def make_call(op: str, impl: str, size: int, sms: int):
    """A callable issuing one call of `op` on the current stream, and its rough GPU time in ms."""
    f = IMPLS[op][impl]
    if op == "decode_attn":
        ctx = 1024
        q = torch.randn(size, HQ, HD, device="cuda", dtype=DT)
        kc = torch.randn(size, ctx, HKV, HD, device="cuda", dtype=DT)
        vc = torch.randn(size, ctx, HKV, HD, device="cuda", dtype=DT)
        lens = torch.full((size,), ctx, device="cuda", dtype=torch.int32)
        out = torch.empty_like(q)
        return lambda: f(q, kc, vc, lens, out, sms)
    k, n = GEMMS[op]
    a = torch.randn(size, k, device="cuda", dtype=DT)
    w = torch.randn(k, n, device="cuda", dtype=DT) / k ** 0.5
    out = torch.empty(size, n, device="cuda", dtype=DT)
    return lambda: f(a, w, out, sms)


def graph_of(call, stream) -> tuple[object, int]:
    """A CUDA graph of about GRAPH_MS of back-to-back calls on `stream` (its replay enqueues them)."""
    with torch.cuda.stream(stream):
        k = max(1, round(GRAPH_MS / max(statistics.median(event_times(call, iters=5, warmup=1)), 1e-3)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(k):
                call()
    return graph, k


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--by-impl", action="store_true", help="every impl on the whole GPU instead of SM counts")
    args = ap.parse_args()
    cases = IMPL_CASES if args.by_impl else CASES
    device, how = power.open_device(0)
    if device is None:
        sys.exit(f"energy_by_sms: {how}")
    parts = SmPartitions(0, mode="green")
    gpu = torch.cuda.get_device_name(0)
    static = power.measure_static_power(device)
    rows = []
    try:
        for op, impl, size, counts in cases:
            if impl not in IMPLS[op]:
                print(f"  {op}: no impl {impl}", file=sys.stderr)
                continue
            for n in counts:
                sms, stream = (parts.num_sms, torch.cuda.Stream()) if n >= parts.num_sms else (parts.round(n), parts.stream(n))
                graph, k = graph_of(make_call(op, impl, size, sms), stream)
                with torch.cuda.stream(stream):
                    m = power.measure_energy(graph.replay, device, calls_per_fn=k)
                dyn = m.energy_j - static.static_power_w * m.time_ms / 1e3
                rows.append({"op": op, "impl": impl, "size": size, "sm_count": sms, "time_ms": m.time_ms,
                             "energy_j": m.energy_j, "dynamic_j": dyn, "power_w": m.power_w,
                             "sm_clock_mhz": m.samples.sm_clock_mhz, "capped_share": m.samples.capped_share})
                print(f"  {op} {size} @{sms}: {m.time_ms:.4f} ms {m.energy_j * 1e3:.1f} mJ "
                      f"(dynamic {dyn * 1e3:.1f}) {m.power_w:.0f} W", file=sys.stderr, flush=True)
                del graph
    finally:
        parts.close()
        device.close()
    result = {"gpu_name": gpu, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/energy_by_sms.py " + " ".join(sys.argv[1:]),
              "static_power_w": static.static_power_w, "how": how, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    tag = gpu.replace("NVIDIA ", "").replace(" ", "-")
    kind = "energy_by_impl" if args.by_impl else "energy_by_sms"
    path = os.path.join(args.out, f"{kind}_{tag}_{datetime.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}; static power {static.static_power_w:.0f} W")
    print(f"{'op':<12}{'impl':>9}{'size':>6}{'SMs':>5}{'ms':>9}{'mJ':>9}{'dyn mJ':>9}{'dyn/ref':>8}{'W':>6}"
          f"{'MHz':>6}{'cap':>5}")
    for r in rows:      # ref: the same impl on the whole GPU (by SM count), the op's torch impl (--by-impl)
        ref = next((q["dynamic_j"] for q in rows if q["op"] == r["op"] and (
            q["impl"] == "torch" if args.by_impl else (q["impl"] == r["impl"] and q["sm_count"] == parts.num_sms))), None)
        ratio = r["dynamic_j"] / ref if ref else float("nan")
        print(f"{r['op']:<12}{r['impl']:>9}{r['size']:>6}{r['sm_count']:>5}{r['time_ms']:>9.4f}{r['energy_j'] * 1e3:>9.1f}"
              f"{r['dynamic_j'] * 1e3:>9.1f}{ratio:>8.3f}{r['power_w']:>6.0f}{r['sm_clock_mhz'] or 0:>6.0f}"
              f"{r['capped_share']:>5.2f}")


if __name__ == "__main__":
    main()
