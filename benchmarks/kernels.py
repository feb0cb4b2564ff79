"""Time the SM-bounded kernels against the library kernels, by SM count, and co-run pairs.

Usage (on the GPU machine): PYTHONPATH=. python benchmarks/kernels.py [--out DIR] [--quick]
Writes kernels_<gpu>_<date>.json into --out (default $OUT or .) and prints a short table last.
Timing: CUDA events around each call, warm-up, median of N; inputs rotated across several copies
when one copy would fit in L2. Green-context partitions (mode green) and grid-only bounds (mode grid).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch

import importlib

from nfsearch.runtime.kernels import IMPLS

# the package re-exports functions under the submodules' names, so fetch the modules explicitly
dec_mod = importlib.import_module("nfsearch.runtime.kernels.decode_attention")
gemm_mod = importlib.import_module("nfsearch.runtime.kernels.gemm")
from nfsearch.runtime.partitions import PartitionError, SmPartitions

DT = torch.bfloat16
SM_COUNTS = [8, 16, 32, 48, 64, 84, 100, 116, 132]
HID, INTER, HQ, HKV, HD = 4096, 14336, 32, 8, 128
GEMMS = {"kqv": (HID, (HQ + 2 * HKV) * HD), "o": (HID, HID), "ug": (HID, 2 * INTER), "d": (INTER, HID)}
L2_ROTATE_BYTES = 256 << 20


def bench(fn, n_sets=1, warm=3, iters=25):
    for i in range(warm):
        fn(i % n_sets)
    torch.cuda.synchronize()
    ts = []
    for i in range(iters):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn(i % n_sets)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def on(stream, fn):
    """Run fn(i) on ``stream``, ordered after and before the current stream."""
    if stream is None:
        return fn

    def w(i):
        cur = torch.cuda.current_stream()
        stream.wait_stream(cur)
        with torch.cuda.stream(stream):
            fn(i)
        cur.wait_stream(stream)

    return w


def n_copies(set_bytes):
    return max(1, min(4, math.ceil(L2_ROTATE_BYTES / max(1, set_bytes))))


def _guard(R, name, fn, out_dir):
    """Run one benchmark section; record an error instead of losing the other sections."""
    t0 = time.time()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        R.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
    R.setdefault("section_s", {})[name] = round(time.time() - t0, 1)
    with open(os.path.join(out_dir, "kernels_partial.json"), "w") as f:
        json.dump(R, f, indent=1, default=str)
    torch.cuda.empty_cache()


def log(*a):
    print(*a, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="fewer SM counts and configs")
    ap.add_argument("--skip-sweep", action="store_true", help="no config sweeps, table defaults only")
    args = ap.parse_args()
    t_start = time.time()
    sm_counts = [16, 48, 132] if args.quick else SM_COUNTS
    dev = torch.cuda.get_device_properties(0)
    R = {"gpu": torch.cuda.get_device_name(0), "sms": dev.multi_processor_count,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "command": " ".join([sys.executable] + sys.argv), "torch": torch.__version__}
    try:
        import triton

        R["triton"] = triton.__version__
    except ImportError:
        pass
    parts = {}
    for mode in ("green", "grid"):
        try:
            parts[mode] = SmPartitions(mode=mode)
        except PartitionError as exc:
            R[f"partitions_{mode}_error"] = str(exc)
    if "green" in parts:
        R["granularity"] = parts["green"].granularity
    total = dev.multi_processor_count

    def stream_for(mode, n):
        if mode == "green":
            return parts["green"].stream(n), parts["green"].round(n)
        return None, n

    # ---------------------------------------------------------------- ceilings
    x = torch.randn(1 << 29, device="cuda", dtype=DT)  # 1 GiB
    y = torch.empty_like(x)
    t = bench(lambda i, x=x, y=y: y.copy_(x), iters=20)
    R["copy_TBps"] = 2 * x.numel() * 2 / t / 1e9
    x = y = None
    a = torch.randn(8192, 8192, device="cuda", dtype=DT)
    b = torch.randn(8192, 8192, device="cuda", dtype=DT)
    t = bench(lambda i, a=a, b=b: torch.matmul(a, b), iters=20)
    R["cublas_8192_TFLOPs"] = 2 * 8192**3 / t / 1e9
    a = b = None
    torch.cuda.empty_cache()
    log(f"copy {R['copy_TBps']:.2f} TB/s, cuBLAS 8192^3 {R['cublas_8192_TFLOPs']:.0f} TFLOP/s")

    best_cfg = {}
    Rq, C = 512, 1024  # W2 decode part: 512 requests x context 1024
    q = torch.randn(Rq, HQ, HD, device="cuda", dtype=DT)
    kc = torch.randn(Rq, C, HKV, HD, device="cuda", dtype=DT)
    vc = torch.randn(Rq, C, HKV, HD, device="cuda", dtype=DT)
    lens = torch.full((Rq,), C, device="cuda", dtype=torch.int32)
    dout = torch.empty_like(q)
    dec_state = {"cfg": (64, 4, 3, 4)}

    def dec_call(n):
        bn, w, s, p = dec_state["cfg"]
        return lambda i: dec_mod.decode_attention(q, kc, vc, lens, dout, n, block_n=bn, num_warps=w, num_stages=s,
                                                  programs_per_sm=p)

    def _sec_gemm():
        gem = {}
        R["gemm"] = gem
        configs = [(128, 256, 64, 8, 8, 3, 1), (128, 256, 64, 8, 8, 4, 1), (128, 128, 64, 8, 8, 4, 1),
                   (128, 128, 64, 8, 4, 4, 1), (64, 128, 64, 8, 4, 4, 1), (64, 256, 64, 8, 4, 3, 1)]
        if args.quick or args.skip_sweep:
            configs = []
        Ms = [128, 512, 2048, 4096]
        best_cfg = {}
        for name, (K, N) in GEMMS.items():
            wsets = n_copies(K * N * 2)
            ws = [torch.randn(K, N, device="cuda", dtype=DT) / K**0.5 for _ in range(wsets)]
            for M in Ms:
                a = torch.randn(M, K, device="cuda", dtype=DT)
                out = torch.empty(M, N, device="cuda", dtype=DT)
                fl = 2 * M * N * K
                ent = {}
                t = bench(lambda i: torch.matmul(a, ws[i], out=out), wsets)
                ent["torch_132"] = {"ms": t, "TFLOPs": fl / t / 1e9}
                t = bench(lambda i: gemm_mod.gemm(a, ws[i], out, total), wsets)
                ent["triton_132_default"] = {"ms": t, "TFLOPs": fl / t / 1e9, "cfg": list(gemm_mod.pick_config(M, N, K))}
                best = (t, gemm_mod.pick_config(M, N, K))
                for cfg in configs:
                    try:
                        t = bench(lambda i: gemm_mod.gemm(a, ws[i], out, total, config=cfg), wsets)
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                        ent[f"cfg_{'_'.join(map(str, cfg))}"] = f"error: {type(exc).__name__}"
                        continue
                    ent[f"cfg_{'_'.join(map(str, cfg))}"] = t
                    if t < best[0]:
                        best = (t, cfg)
                best_cfg[(name, M)] = best[1]
                ent["triton_132_best"] = {"ms": best[0], "TFLOPs": fl / best[0] / 1e9, "cfg": list(best[1]),
                                          "vs_cublas": ent["torch_132"]["ms"] / best[0]}
                log(f"gemm {name} M={M}: cublas {ent['torch_132']['ms']:.4f} ms, triton default "
                    f"{ent['triton_132_default']['ms']:.4f}, best {best[0]:.4f} {best[1]}")
                if M in (512, 2048):
                    for mode in parts:
                        for n in sm_counts:
                            st, nn = stream_for(mode, n)
                            t = bench(on(st, lambda i: gemm_mod.gemm(a, ws[i], out, nn, config=best[1])), wsets)
                            ent[f"triton_{mode}_{n}"] = {"ms": t, "TFLOPs": fl / t / 1e9, "sms": nn}
                gem[f"{name}_M{M}"] = ent
                R["gemm"] = gem

    _guard(R, 'gemm', _sec_gemm, args.out)

    def _sec_decode():
        kv_bytes = 2 * kc.numel() * 2 + 2 * q.numel() * 2
        dec = {"shape": [Rq, C, HQ, HKV, HD], "bytes": kv_bytes}
        R["decode_attn"] = dec
        t = bench(lambda i: IMPLS["decode_attn"]["torch"](q, kc, vc, lens, dout, total))
        dec["torch_132"] = {"ms": t, "TBps": kv_bytes / t / 1e9}
        log(f"decode SDPA full GPU {t:.4f} ms {kv_bytes / t / 1e9:.2f} TB/s")
        dcfgs = [(64, 4, 3, 4)]
        if not (args.quick or args.skip_sweep):
            dcfgs = [(bn, w, s, p) for (bn, w, s) in [(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 8, 2),
                                                       (128, 4, 2), (128, 8, 2), (128, 8, 3)]
                     for p in (3, 4, 6, 8, 16)]
        sweep_mode = "green" if "green" in parts else "grid"
        for sweep_n in (48, 132):
            st, nn = stream_for(sweep_mode, sweep_n)
            best = (1e9, None)
            for (bn, w, s, p) in dcfgs:
                try:
                    t = bench(on(st, lambda i: dec_mod.decode_attention(q, kc, vc, lens, dout, nn, block_n=bn, num_warps=w,
                                                                         num_stages=s, programs_per_sm=p)))
                except Exception as exc:  # noqa: BLE001
                    dec[f"sweep{sweep_n}_{bn}_{w}_{s}_{p}"] = f"error: {type(exc).__name__}"
                    continue
                dec[f"sweep{sweep_n}_{bn}_{w}_{s}_{p}"] = {"ms": t, "TBps": kv_bytes / t / 1e9}
                if t < best[0]:
                    best = (t, (bn, w, s, p))
            dec[f"best_at_{sweep_n}"] = {"ms": best[0], "TBps": kv_bytes / best[0] / 1e9, "cfg": best[1]}
            log(f"decode best at {sweep_n} SMs ({sweep_mode}): {kv_bytes / best[0] / 1e9:.2f} TB/s cfg {best[1]}")
        if dec["best_at_48"]["cfg"]:
            dec_state["cfg"] = dec["best_at_48"]["cfg"]

        for mode in parts:
            for n in sm_counts:
                st, nn = stream_for(mode, n)
                t = bench(on(st, dec_call(nn)))
                dec[f"triton_{mode}_{n}"] = {"ms": t, "TBps": kv_bytes / t / 1e9, "sms": nn}
        R["decode_attn"] = dec

    _guard(R, 'decode', _sec_decode, args.out)

    def _sec_prefill():
        plens = [1024, 512, 256, 256]
        T = sum(plens)
        pq = torch.randn(T, HQ, HD, device="cuda", dtype=DT)
        pk = torch.randn(T, HKV, HD, device="cuda", dtype=DT)
        pv = torch.randn(T, HKV, HD, device="cuda", dtype=DT)
        cu = torch.tensor([0] + list(torch.tensor(plens).cumsum(0)), device="cuda", dtype=torch.int32)
        pout = torch.empty_like(pq)
        pfl = sum(4 * L * L / 2 * HD * HQ for L in plens)  # causal: half of 2 GEMMs of 2*L*L*D
        pre = {"prompt_lens": plens}
        R["prefill_attn"] = pre
        t = bench(lambda i: IMPLS["prefill_attn"]["torch"](pq, pk, pv, cu, pout, total))
        pre["torch_132"] = {"ms": t, "TFLOPs": pfl / t / 1e9}
        for mode in parts:
            for n in sm_counts:
                st, nn = stream_for(mode, n)
                t = bench(on(st, lambda i: IMPLS["prefill_attn"]["triton"](pq, pk, pv, cu, pout, nn)))
                pre[f"triton_{mode}_{n}"] = {"ms": t, "TFLOPs": pfl / t / 1e9, "sms": nn}
        R["prefill_attn"] = pre
        log(f"prefill torch {pre['torch_132']['ms']:.4f} ms, triton132 {pre.get('triton_green_132', pre.get('triton_grid_132'))}")

    _guard(R, 'prefill', _sec_prefill, args.out)

    def _sec_small():
        Tt = 2048
        small = {}
        R["small_ops"] = small
        xs = [torch.randn(Tt, HID, device="cuda", dtype=DT) for _ in range(4)]
        rs = [torch.randn(Tt, HID, device="cuda", dtype=DT) for _ in range(4)]
        nw = torch.rand(HID, device="cuda", dtype=DT)
        no = torch.empty(Tt, HID, device="cuda", dtype=DT)
        ro = torch.empty(Tt, HID, device="cuda", dtype=DT)
        gu = [torch.randn(Tt, 2 * INTER, device="cuda", dtype=DT) for _ in range(2)]
        ao = torch.empty(Tt, INTER, device="cuda", dtype=DT)
        qkv = [torch.randn(Tt, (HQ + 2 * HKV) * HD, device="cuda", dtype=DT) for _ in range(4)]
        from nfsearch.runtime.kernels import rope_cos_sin

        cos, sin = rope_cos_sin(C, HD, device="cuda")
        pos = torch.randint(0, C - 1, (Tt,), device="cuda", dtype=torch.int32)
        slot = torch.arange(Tt, device="cuda", dtype=torch.int32) % Rq
        qo = torch.empty(Tt, HQ, HD, device="cuda", dtype=DT)
        ops = {
            "norm_fused": (lambda impl, n: (lambda i: IMPLS["norm1"][impl](xs[i], nw, no, n, residual=rs[i], residual_out=ro)),
                           4, 4 * Tt * HID * 2),
            "act": (lambda impl, n: (lambda i: IMPLS["act"][impl](gu[i], ao, n)), 2, 3 * Tt * INTER * 2),
            "rope_append": (lambda impl, n: (lambda i: IMPLS["rope_append"][impl](qkv[i], pos, cos, sin, qo, kc, vc, slot, n)),
                            4, Tt * (HQ + 2 * HKV) * HD * 2 * 2),
        }
        for name, (mk, sets, nbytes) in ops.items():
            ent = {"bytes": nbytes}
            if name != "rope_append":  # the torch rope impl is the host-syncing reference
                t = bench(mk("torch", total), sets)
                ent["torch_132"] = {"ms": t, "TBps": nbytes / t / 1e9}
            for mode in parts:
                for n in ([8, 16, 32, 64, 132] if not args.quick else sm_counts):
                    st, nn = stream_for(mode, n)
                    t = bench(on(st, mk("triton", nn)), sets)
                    ent[f"triton_{mode}_{n}"] = {"ms": t, "TBps": nbytes / t / 1e9, "sms": nn}
            small[name] = ent
        R["small_ops"] = small

    _guard(R, 'small', _sec_small, args.out)

    def _sec_corun():
        K, N = GEMMS["ug"]
        a = torch.randn(2048, K, device="cuda", dtype=DT)
        w = torch.randn(K, N, device="cuda", dtype=DT) / K**0.5
        out = torch.empty(2048, N, device="cuda", dtype=DT)
        gcfg = best_cfg.get(("ug", 2048))
        co = {}
        R["corun"] = co
        for mode in parts:
            for ng in (84, 100, 116):
                (n2, s2), (n1, s1) = parts[mode].split([total - ng, ng])  # decode group first: gemm gets the rest
                fg = lambda i: gemm_mod.gemm(a, w, out, n1, config=gcfg)  # noqa: E731
                fd = dec_call(n2)
                tg = bench(on(s1, fg))
                td = bench(on(s2, fd))

                def both(i):
                    cur = torch.cuda.current_stream()
                    s1.wait_stream(cur)
                    s2.wait_stream(cur)
                    with torch.cuda.stream(s1):
                        fg(i)
                    with torch.cuda.stream(s2):
                        fd(i)
                    cur.wait_stream(s1)
                    cur.wait_stream(s2)

                tb = bench(both)
                co[f"{mode}_g{n1}_d{n2}"] = {"gemm_ms": tg, "decode_ms": td, "both_ms": tb, "vs_sum": tb / (tg + td),
                                             "vs_max": tb / max(tg, td)}
                log(f"corun {mode} gemm {n1} SMs {tg:.3f} + decode {n2} SMs {td:.3f} -> {tb:.3f} ms "
                    f"({tb / (tg + td):.2f}x sum, {tb / max(tg, td):.2f}x max)")
        # sequential library baseline for the pair
        tseq = bench(lambda i: (torch.matmul(a, w, out=out), IMPLS["decode_attn"]["torch"](q, kc, vc, lens, dout, total)))
        co["seq_torch_ms"] = tseq
        R["corun"] = co
    _guard(R, 'corun', _sec_corun, args.out)

    R["elapsed_s"] = time.time() - t_start
    for p in parts.values():
        p.close()

    gpu_tag = R["gpu"].replace("NVIDIA ", "").replace(" ", "-").replace("/", "-")
    path = os.path.join(args.out, f"kernels_{gpu_tag}_{datetime.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(R, f, indent=1, default=str)
    try:
        print_table(R, sm_counts, parts)
    except Exception as exc:  # noqa: BLE001
        log(f"table failed: {type(exc).__name__}: {exc}; errors: {R.get('errors')}")
    log(f"wrote {path}")


def print_table(R, sm_counts, parts):
    log(f"\n== {R['gpu']} | copy {R['copy_TBps']:.2f} TB/s | cuBLAS {R['cublas_8192_TFLOPs']:.0f} TFLOP/s ==")
    for mode in parts:
        log(f"-- mode {mode}: by SM count " + " ".join(f"{n:>6}" for n in sm_counts))
        for key in ("kqv_M2048", "o_M2048", "ug_M2048", "d_M2048"):
            ent = R["gemm"][key]
            log(f"{key:>12} TF/s " + " ".join(f"{ent[f'triton_{mode}_{n}']['TFLOPs']:6.0f}" for n in sm_counts)
                + f" | cuBLAS {ent['torch_132']['TFLOPs']:.0f}")
        d = R["decode_attn"]
        log(f"{'decode TB/s':>17} " + " ".join(f"{d[f'triton_{mode}_{n}']['TBps']:6.2f}" for n in sm_counts)
            + f" | SDPA {d['torch_132']['TBps']:.2f}")
        p = R["prefill_attn"]
        log(f"{'prefill TF/s':>17} " + " ".join(f"{p[f'triton_{mode}_{n}']['TFLOPs']:6.0f}" for n in sm_counts)
            + f" | SDPA {p['torch_132']['TFLOPs']:.0f}")
    log("gemm vs cuBLAS @132 (best cfg): " + ", ".join(
        f"{k}={v['triton_132_best']['vs_cublas']:.2f}" for k, v in R["gemm"].items()))
    for k, v in R["small_ops"].items():
        tt = v.get("torch_132", {}).get("TBps", float("nan"))
        log(f"{k}: TB/s triton132 {v.get('triton_green_132', v.get('triton_grid_132'))['TBps']:.2f} "
            f"triton32 {v.get('triton_green_32', v.get('triton_grid_32'))['TBps']:.2f} torch {tt:.2f}")
    log(f"decode best@48: {R['decode_attn']['best_at_48']} best@132: {R['decode_attn']['best_at_132']}")
    for k, v in R["corun"].items():
        if isinstance(v, dict):
            log(f"corun {k}: gemm {v['gemm_ms']:.3f} dec {v['decode_ms']:.3f} both {v['both_ms']:.3f} "
                f"= {v['vs_sum']:.2f}x sum {v['vs_max']:.2f}x max")
    log(f"seq torch (cuBLAS UG + SDPA decode): {R['corun']['seq_torch_ms']:.3f} ms; elapsed {R['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
