"""One-call check and timing of every kernel impl: per op at the full GPU, the chosen
impl against the library; per GEMM family the TMA kernel, cuBLAS and cuBLASLt told the SM count
(the "cublaslt" impl) at 64-124 SMs (green-context partitions) against linear scaling of the
full-GPU time; decode attention TB/s at 16/32/48 SMs.
--sweep also times config sweeps: the TMA GEMM and decode kernels', and the triton GEMM's (full GPU)
and triton decode attention's (16 and 48 SMs), whose defaults (gemm.pick_config, decode_attention.py)
were set from such sweeps (once benchmarks/kernels.py's; its last version: `git show
9f1daf8:benchmarks/kernels.py`). Times by SM count and co-run pairs are `nfsearch profile`'s (its solo
rows on the SM grid and its pair table).

Usage (GPU machine): PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/kernel_bench.py [--sweep] [--out DIR]

Timing: a batch of calls on the measuring stream behind a ~1 ms sleep kernel (so the host has queued
the whole batch before the GPU reaches it: launch overhead is not timed), CUDA events around the batch,
time per call = batch time / calls. Each figure is the median of REPS (>= 3) batches, with min and max.
Inputs rotate over several copies when one copy would sit in L2. Every impl is checked against the
op's torch impl run on float32 copies (fresh random inputs, NaN-poisoned outputs) before it is timed;
a failed check is recorded and the impl is not timed. Results go to DIR/kernels_<gpu>_<date>.json
(and a partial file after each section); a short table is printed last.
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
import traceback

import torch

import importlib

from nfsearch.runtime.kernels import IMPLS, decode_attention_tma, gemm_tma, prefill_attention_sdpa
from nfsearch.runtime.kernels import torch_ops as ref
from nfsearch.runtime.partitions import SmPartitions

gt_mod = importlib.import_module("nfsearch.runtime.kernels.gemm_tma")
dt_mod = importlib.import_module("nfsearch.runtime.kernels.decode_tma")

DT = torch.bfloat16
HID, INTER, HQ, HKV, HD = 4096, 14336, 32, 8, 128
GEMMS = {"kqv": (HID, (HQ + 2 * HKV) * HD), "o": (HID, HID), "ug": (HID, 2 * INTER), "d": (INTER, HID)}
GEMM_MS = (512, 2048, 4096)
PART_SMS = (64, 84, 100, 108, 116, 124)
DEC_SMS = (16, 32, 48)
REPS = 3
ROTATE_BYTES = 256 << 20
TOL = 2e-2
# --sweep, the triton impls' configs: GEMM (BM, BN, BK, GROUP_M, num_warps, num_stages, programs_per_sm);
# decode attention (block_n, num_warps, num_stages, programs_per_sm)
TRITON_GEMM_SWEEP = [(128, 256, 64, 8, 8, 3, 1), (128, 256, 64, 8, 8, 4, 1), (128, 128, 64, 8, 8, 4, 1),
                     (128, 128, 64, 8, 4, 4, 1), (64, 128, 64, 8, 4, 4, 1), (64, 256, 64, 8, 4, 3, 1)]
TRITON_DECODE_SWEEP = [(bn, w, s, p) for (bn, w, s) in [(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 8, 2),
                                                        (128, 4, 2), (128, 8, 2), (128, 8, 3)]
                       for p in (3, 4, 6, 8, 16)]


def log(*a):
    print(*a, flush=True)


def up(*tensors):
    """float32 copies: the torch impls run on them are the check's reference."""
    return [t.float() if t is not None and t.is_floating_point() else t for t in tensors]


def rel_err(out, r):
    out, r = out.float(), r.float()
    if torch.isnan(out).any():
        return float("nan")
    return ((out - r).norm() / r.norm()).item()


def n_sets(nbytes):
    return max(1, min(4, math.ceil(ROTATE_BYTES / max(1, nbytes))))


def time_batch(fn, sets, calls, stream=None):
    st = stream or torch.cuda.current_stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(st):
        torch.cuda._sleep(2_000_000)
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        for i in range(calls):
            fn(i % sets)
        e.record()
    e.synchronize()
    return s.elapsed_time(e) / calls


def measure(fn, sets=1, stream=None, est_ms=None, reps=REPS):
    """{"ms": median of reps, "min", "max", "reps"}; batch size from a warm-up estimate."""
    with torch.cuda.stream(stream or torch.cuda.current_stream()):
        for i in range(2):
            fn(i % sets)
    t0 = time_batch(fn, sets, 2, stream)
    calls = int(min(50, max(5, 3.0 / max(t0, 1e-3))))  # ~3 ms of work per batch
    ts = [time_batch(fn, sets, calls, stream) for _ in range(reps)]
    return {"ms": statistics.median(ts), "min": min(ts), "max": max(ts), "reps": ts, "calls": calls}


def fastest_config(run, ent, configs, label_of, fn_of, *run_args):
    """(config, measurement, label) of the fastest of `configs` that ran, or None: each timed as
    run(label_of(cfg), fn_of(cfg), *run_args); a config that raises (out of shared memory, say) is
    recorded in `ent` as its error and logged, and the others still run."""
    best = None
    for cfg in configs:
        lab = label_of(cfg)
        try:
            m = run(lab, fn_of(cfg), *run_args)
        except Exception as exc:  # noqa: BLE001 - this config cannot run here; the others may
            ent[lab] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(f"  {lab}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if m and (best is None or m["ms"] < best[1]["ms"]):
            best = (cfg, m, lab)
    return best


class Bench:
    def __init__(self, args):
        self.args = args
        dev = torch.cuda.get_device_properties(0)
        self.total = dev.multi_processor_count
        self.R = {"gpu": torch.cuda.get_device_name(0), "sms": self.total,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join([sys.executable] + sys.argv), "torch": torch.__version__, "reps": REPS}
        try:
            import triton

            self.R["triton"] = triton.__version__
        except ImportError:
            pass
        try:
            import cupy

            self.R["cupy"] = cupy.__version__
        except ImportError:
            pass
        self.parts = SmPartitions(mode="green")
        self.R["granularity"] = self.parts.granularity
        self.t0 = time.time()

    def save(self, name="kernels_partial.json"):
        with open(os.path.join(self.args.out, name), "w") as f:
            json.dump(self.R, f, indent=1, default=str)

    def guard(self, name, fn):
        t = time.time()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            self.R.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        self.R.setdefault("section_s", {})[name] = round(time.time() - t, 1)
        self.save()
        torch.cuda.empty_cache()

    def part_stream(self, n):
        """(sms, stream) of exactly n SMs where a 2-way split gives it as the remainder, else rounded."""
        if n >= self.total:
            return self.total, None
        rest = self.total - n
        if rest % self.parts.granularity == 0:
            (_, _), (m, s) = self.parts.split([rest, n])
            return m, s
        return self.parts.round(n), self.parts.stream(n)

    # ------------------------------------------------------------------ ceilings
    def ceilings(self):
        x = torch.randn(1 << 29, device="cuda", dtype=DT)
        y = torch.empty_like(x)
        m = measure(lambda i: y.copy_(x))
        self.R["copy_TBps"] = 4 * x.numel() / m["ms"] / 1e9
        x = y = None
        a = torch.randn(8192, 8192, device="cuda", dtype=DT)
        b = torch.randn(8192, 8192, device="cuda", dtype=DT)
        m = measure(lambda i: torch.matmul(a, b))
        self.R["cublas_8192_TFLOPs"] = 2 * 8192**3 / m["ms"] / 1e9
        log(f"copy {self.R['copy_TBps']:.2f} TB/s, cuBLAS 8192^3 {self.R['cublas_8192_TFLOPs']:.0f} TFLOP/s")

    # ------------------------------------------------------------------ GEMM
    def gemm(self):
        G = self.R.setdefault("gemm", {})
        mid_dp = gt_mod.MID[:6] + (False, False)
        sweep = [gt_mod.BIG, gt_mod.BIG_SK, gt_mod.MID, mid_dp] if self.args.sweep else []
        for name, (K, N) in GEMMS.items():
            wsets = n_sets(K * N * 2)
            ws = [torch.randn(K, N, device="cuda", dtype=DT) / K**0.5 for _ in range(wsets)]
            for M in GEMM_MS:
                key = f"{name}_M{M}"
                ent = G.setdefault(key, {"M": M, "K": K, "N": N, "flop": 2 * M * N * K})
                a = torch.randn(M, K, device="cuda", dtype=DT)
                out = torch.empty(M, N, device="cuda", dtype=DT)
                r = ref.gemm_torch(*up(a, ws[0]))
                fl = 2 * M * N * K

                def run(label, f, sms=self.total, stream=None):
                    o = torch.full_like(out, float("nan"))
                    with torch.cuda.stream(stream or torch.cuda.current_stream()):
                        f(a, ws[0], o, sms)
                    torch.cuda.synchronize()
                    err = rel_err(o, r)
                    if not err < TOL:
                        ent[label] = {"error": f"check failed: rel err {err}"}
                        log(f"  {key} {label}: CHECK FAILED {err}")
                        return None
                    m = measure(lambda i: f(a, ws[i], out, sms), wsets, stream)
                    m["TFLOPs"] = fl / m["ms"] / 1e9
                    m["rel_err"] = err
                    ent[label] = m
                    return m

                base = run("torch", IMPLS[name]["torch"])
                run("triton", IMPLS[name]["triton"])
                has_lt = "cublaslt" in IMPLS[name]
                if has_lt:
                    run("cublaslt", IMPLS[name]["cublaslt"])
                tbest = fastest_config(
                    run, ent, TRITON_GEMM_SWEEP if self.args.sweep else [],
                    lambda cfg: "triton_cfg_" + "_".join(map(str, cfg)),
                    lambda cfg: lambda a_, w_, o_, n_: IMPLS[name]["triton"](a_, w_, o_, n_, config=cfg))
                if tbest:
                    ent["triton_best"] = {"cfg": list(tbest[0]), "ms": tbest[1]["ms"]}
                best = fastest_config(
                    run, ent, [None] + sweep,
                    lambda cfg: "tma" if cfg is None else "tma_" + "_".join(str(int(c)) for c in cfg),
                    lambda cfg: lambda a_, w_, o_, n_: gemm_tma(a_, w_, o_, n_, config=cfg))
                if best and best[0] is None:       # the default: the config gemm_tma picks for this shape
                    best = (gt_mod.pick_config(M, N, K, self.total), *best[1:])
                if best:
                    ent["tma_best"] = {"cfg": list(best[0]), "label": best[2], "ms": best[1]["ms"]}
                    if base:
                        ent["tma_vs_cublas"] = base["ms"] / ent["tma"]["ms"] if "ms" in ent.get("tma", {}) else None
                        ent["tma_best_vs_cublas"] = base["ms"] / best[1]["ms"]
                cands = {k: ent[k]["ms"] for k in ("torch", "triton", "tma", "cublaslt") if "ms" in ent.get(k, {})}
                ent["chosen_full"] = min(cands, key=cands.get) if cands else None
                log(f"gemm {key}: " + ", ".join(f"{k} {v:.4f}" for k, v in cands.items())
                    + (f" | best tma {best[2]} {best[1]['ms']:.4f} ({ent['tma_best_vs_cublas']:.3f}x cuBLAS)" if best and base else ""))
                # partitions: linear scaling of the SM-bounded impl (and cuBLAS for comparison)
                cfgs = [("tma", None)]
                if self.args.sweep:
                    cfgs += [("tma_dp", gt_mod.BIG), ("tma_sk", gt_mod.BIG_SK), ("tma_midsk", gt_mod.MID)]
                for n in PART_SMS:
                    nn, st = self.part_stream(n)
                    for lab, cfg in cfgs:
                        try:
                            m = run(f"{lab}_{n}", lambda a_, w_, o_, n_, cfg=cfg: gemm_tma(a_, w_, o_, n_, config=cfg), nn, st)
                        except Exception as exc:  # noqa: BLE001
                            ent[f"{lab}_{n}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                            continue
                        full = ent.get(lab if lab == "tma" else "tma_" + "_".join(str(int(c)) for c in cfg), {})
                        if m and "ms" in full:
                            m["sms"] = nn
                            m["vs_linear"] = full["ms"] * self.total / (nn * m["ms"])
                    # cuBLAS as it comes (sized for the whole GPU) and told the partition's SM count,
                    # both against whole-GPU cuBLAS scaled linearly
                    for lab in ("torch",) + (("cublaslt",) if has_lt else ()):
                        m = run(f"{lab}_{n}", IMPLS[name][lab], nn, st)
                        if m and base:
                            m["sms"] = nn
                            m["vs_linear"] = base["ms"] * self.total / (nn * m["ms"])
                log("   partitions: " + ", ".join(
                    f"{n}: tma {ent.get(f'tma_{n}', {}).get('vs_linear', float('nan')):.3f}"
                    f" torch {ent.get(f'torch_{n}', {}).get('vs_linear', float('nan')):.3f}"
                    f" cublaslt {ent.get(f'cublaslt_{n}', {}).get('vs_linear', float('nan')):.3f}" for n in PART_SMS))
                self.save()

    # ------------------------------------------------------------------ decode attention
    def decode(self):
        D = self.R.setdefault("decode_attn", {})
        shapes = [(512, 1024), (256, 2048)]
        sweep = []
        if self.args.sweep:
            sweep = [(64, 4, 3, 3), (64, 4, 4, 3), (64, 4, 3, 4), (64, 4, 4, 4), (64, 4, 4, 2), (128, 4, 3, 2),
                     (128, 4, 2, 3), (64, 4, 2, 6), (32, 4, 4, 4), (64, 8, 4, 3)]
        for (Rq, C) in shapes:
            key = f"R{Rq}_C{C}"
            ent = D.setdefault(key, {})
            q = torch.randn(Rq, HQ, HD, device="cuda", dtype=DT)
            kc = torch.randn(Rq, C, HKV, HD, device="cuda", dtype=DT)
            vc = torch.randn(Rq, C, HKV, HD, device="cuda", dtype=DT)
            lens = torch.full((Rq,), C, device="cuda", dtype=torch.int32)
            out = torch.empty_like(q)
            nbytes = 2 * kc.numel() * 2 + 2 * q.numel() * 2
            ent["bytes"] = nbytes
            lens_chk = torch.randint(1, C + 1, (Rq,), device="cuda", dtype=torch.int32)
            r_chk = ref.decode_attention_torch(*up(q, kc, vc), lens_chk)

            def run(label, f, sms=self.total, stream=None):
                o = torch.full_like(out, float("nan"))
                with torch.cuda.stream(stream or torch.cuda.current_stream()):
                    f(q, kc, vc, lens_chk, o, sms)
                torch.cuda.synchronize()
                err = rel_err(o, r_chk)
                if not err < TOL:
                    ent[label] = {"error": f"check failed: rel err {err}"}
                    log(f"  decode {key} {label}: CHECK FAILED {err}")
                    return None
                m = measure(lambda i: f(q, kc, vc, lens, out, sms), 1, stream)
                m["TBps"] = nbytes / m["ms"] / 1e9
                m["sms"] = sms
                ent[label] = m
                return m

            run("torch", IMPLS["decode_attn"]["torch"])
            best = None
            for sw_n in ((16, 48) if sweep else ()):
                nsw, ssw = self.part_stream(sw_n)
                bn_ = fastest_config(
                    run, ent, sweep, lambda cfg: f"tma_cfg_{'_'.join(map(str, cfg))}_{sw_n}",
                    lambda cfg: lambda q_, k_, v_, l_, o_, n_: decode_attention_tma(
                        q_, k_, v_, l_, o_, n_, block_n=cfg[0], num_warps=cfg[1], num_stages=cfg[2],
                        programs_per_sm=cfg[3]), nsw, ssw)
                if bn_:
                    ent[f"tma_best_{sw_n}"] = {"cfg": list(bn_[0]), "TBps": bn_[1]["TBps"]}
                    log(f"decode {key} best TMA cfg at {sw_n} SMs {bn_[0]}: {bn_[1]['TBps']:.2f} TB/s")
                    if sw_n == 48:
                        best = bn_
                tbest = fastest_config(
                    run, ent, TRITON_DECODE_SWEEP, lambda cfg: f"triton_cfg_{'_'.join(map(str, cfg))}_{sw_n}",
                    lambda cfg: lambda q_, k_, v_, l_, o_, n_: IMPLS["decode_attn"]["triton"](
                        q_, k_, v_, l_, o_, n_, block_n=cfg[0], num_warps=cfg[1], num_stages=cfg[2],
                        programs_per_sm=cfg[3]), nsw, ssw)
                if tbest:
                    ent[f"triton_best_{sw_n}"] = {"cfg": list(tbest[0]), "TBps": tbest[1]["TBps"]}
                    log(f"decode {key} best triton cfg at {sw_n} SMs {tbest[0]}: {tbest[1]['TBps']:.2f} TB/s")
            for n in DEC_SMS + (self.total,):
                nn, st = self.part_stream(n)
                for lab, f in [("triton", IMPLS["decode_attn"]["triton"]), ("tma", IMPLS["decode_attn"]["tma"])] + (
                        [("tma_best", lambda q_, k_, v_, l_, o_, n_, cfg=best[0]: decode_attention_tma(
                            q_, k_, v_, l_, o_, n_, block_n=cfg[0], num_warps=cfg[1], num_stages=cfg[2],
                            programs_per_sm=cfg[3]))] if best else []):
                    try:
                        run(f"{lab}_{n}", f, nn, st)
                    except Exception as exc:  # noqa: BLE001
                        ent[f"{lab}_{n}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(f"decode {key} TB/s: SDPA@132 {ent.get('torch', {}).get('TBps', float('nan')):.2f} | " + ", ".join(
                f"{n}: triton {ent.get(f'triton_{n}', {}).get('TBps', float('nan')):.2f} "
                f"tma {ent.get(f'tma_{n}', {}).get('TBps', float('nan')):.2f}" for n in DEC_SMS + (self.total,)))
            self.save()

    # ------------------------------------------------------------------ prefill attention
    def prefill(self):
        P = self.R.setdefault("prefill_attn", {})
        for plens in ([1024, 512, 256, 256], [2048, 2048], [512] * 8):
            T = sum(plens)
            key = "_".join(map(str, plens)) if len(set(plens)) > 1 else f"{plens[0]}x{len(plens)}"
            ent = P.setdefault(key, {"prompt_lens": plens})
            q = torch.randn(T, HQ, HD, device="cuda", dtype=DT)
            k = torch.randn(T, HKV, HD, device="cuda", dtype=DT)
            v = torch.randn(T, HKV, HD, device="cuda", dtype=DT)
            cu = torch.tensor([0] + list(torch.tensor(plens).cumsum(0)), device="cuda", dtype=torch.int32)
            cu_cpu = cu.cpu()
            out = torch.empty_like(q)
            fl = sum(2 * L * L * HD * HQ for L in plens)  # causal: half of 4*L*L*D per head
            r = ref.prefill_attention_torch(*up(q, k, v), cu)
            impls = [("torch", IMPLS["prefill_attn"]["torch"], cu_cpu), ("triton", IMPLS["prefill_attn"]["triton"], cu),
                     ("flash", IMPLS["prefill_attn"]["flash"], cu), ("flash_hostcu", IMPLS["prefill_attn"]["flash"], cu_cpu),
                     ("sdpa_flash", prefill_attention_sdpa, cu_cpu)]
            for n in (self.total, 100):
                nn, st = self.part_stream(n)
                for lab, f, offs in impls:
                    label = lab if n == self.total else f"{lab}_{n}"
                    try:
                        o = torch.full_like(out, float("nan"))
                        with torch.cuda.stream(st or torch.cuda.current_stream()):
                            f(q, k, v, offs, o, nn)
                        torch.cuda.synchronize()
                        err = rel_err(o, r)
                        if not err < TOL:
                            ent[label] = {"error": f"check failed: rel err {err}"}
                            continue
                        m = measure(lambda i: f(q, k, v, offs, out, nn), 1, st)
                        m["TFLOPs"] = fl / m["ms"] / 1e9
                        m["sms"] = nn
                        ent[label] = m
                    except Exception as exc:  # noqa: BLE001
                        ent[label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                        log(f"  prefill {key} {label}: {type(exc).__name__}: {str(exc)[:200]}")
            log(f"prefill {key}: " + ", ".join(f"{k} {v['ms']:.4f} ms {v['TFLOPs']:.0f} TF/s"
                                               for k, v in ent.items() if isinstance(v, dict) and "ms" in v))
            self.save()

    # ------------------------------------------------------------------ small ops
    def small(self):
        S = self.R.setdefault("small_ops", {})
        Tt, C, Rq = 2048, 1024, 512
        xs = [torch.randn(Tt, HID, device="cuda", dtype=DT) for _ in range(4)]
        rs = [torch.randn(Tt, HID, device="cuda", dtype=DT) for _ in range(4)]
        nw = torch.rand(HID, device="cuda", dtype=DT) + 0.5
        no = torch.empty(Tt, HID, device="cuda", dtype=DT)
        ro = torch.empty(Tt, HID, device="cuda", dtype=DT)
        gu = [torch.randn(Tt, 2 * INTER, device="cuda", dtype=DT) for _ in range(2)]
        ao = torch.empty(Tt, INTER, device="cuda", dtype=DT)
        qkv = [torch.randn(Tt, (HQ + 2 * HKV) * HD, device="cuda", dtype=DT) for _ in range(4)]
        cos, sin = ref.rope_cos_sin(C, HD, device="cuda")
        pos = torch.randint(0, C - 1, (Tt,), device="cuda", dtype=torch.int32)
        slot = torch.arange(Tt, device="cuda", dtype=torch.int32) % Rq
        kc = torch.randn(Rq, C, HKV, HD, device="cuda", dtype=DT)
        vc = torch.randn(Rq, C, HKV, HD, device="cuda", dtype=DT)
        qo = torch.empty(Tt, HQ, HD, device="cuda", dtype=DT)
        ko = torch.empty(Tt, HKV, HD, device="cuda", dtype=DT)
        vo = torch.empty(Tt, HKV, HD, device="cuda", dtype=DT)

        def chk_norm(f, n):
            o, rr = torch.full_like(no, float("nan")), torch.full_like(ro, float("nan"))
            f(xs[0], nw, o, n, residual=rs[0], residual_out=rr)
            rr_ref = torch.empty(ro.shape, device="cuda")
            rf = ref.rmsnorm_torch(*up(xs[0], nw), residual=rs[0].float(), residual_out=rr_ref)
            return max(rel_err(o, rf), rel_err(rr, rr_ref))

        def chk_act(f, n):
            o = torch.full_like(ao, float("nan"))
            f(gu[0], o, n)
            return rel_err(o, ref.silu_and_mul_torch(gu[0].float()))

        def chk_rope(f, n):
            # unique slots so the cache writes do not collide
            sl = torch.arange(Tt, device="cuda", dtype=torch.int32) % Rq
            p2 = torch.randint(0, C // 4, (Tt,), device="cuda", dtype=torch.int32)
            p2 = (torch.arange(Tt, device="cuda", dtype=torch.int32) // Rq) * (C // 4) + p2  # unique per slot
            k0, v0 = kc.float(), vc.float()
            k1, v1 = kc.clone(), vc.clone()
            qr = torch.empty(qo.shape, device="cuda")
            kr, vr = torch.empty(ko.shape, device="cuda"), torch.empty(vo.shape, device="cuda")
            ref.rope_append_torch(qkv[0].float(), p2, cos, sin, qr, k0, v0, sl, k_out=kr, v_out=vr)
            q2 = torch.full_like(qo, float("nan"))
            k2, v2 = torch.full_like(ko, float("nan")), torch.full_like(vo, float("nan"))
            f(qkv[0], p2, cos, sin, q2, k1, v1, sl, n, k_out=k2, v_out=v2)
            return max(rel_err(q2, qr), rel_err(k2, kr), rel_err(v2, vr), rel_err(k1, k0), rel_err(v1, v0))

        ops = {
            "norm_fused": ("norm1", lambda f, n: (lambda i: f(xs[i], nw, no, n, residual=rs[i], residual_out=ro)), 4,
                           4 * Tt * HID * 2, chk_norm),
            "act": ("act", lambda f, n: (lambda i: f(gu[i], ao, n)), 2, 3 * Tt * INTER * 2, chk_act),
            "rope_append": ("rope_append", lambda f, n: (lambda i: f(qkv[i], pos, cos, sin, qo, kc, vc, slot, n)), 4,
                            Tt * (HQ + 2 * HKV) * HD * 2 * 2, chk_rope),
        }
        for name, (op, mk, sets, nbytes, chk) in ops.items():
            ent = S.setdefault(name, {"bytes": nbytes, "tokens": Tt})
            for impl, f in IMPLS[op].items():
                for n in (self.total, 32, 16):
                    if impl == "torch" and n != self.total:
                        continue
                    label = impl if n == self.total else f"{impl}_{n}"
                    nn, st = self.part_stream(n)
                    try:
                        with torch.cuda.stream(st or torch.cuda.current_stream()):
                            err = chk(f, nn)
                        torch.cuda.synchronize()
                        if not err < TOL:
                            ent[label] = {"error": f"check failed: rel err {err}"}
                            log(f"  {name} {label}: CHECK FAILED {err}")
                            continue
                        m = measure(mk(f, nn), sets, st)
                        m["TBps"] = nbytes / m["ms"] / 1e9
                        m["rel_err"] = err
                        ent[label] = m
                    except Exception as exc:  # noqa: BLE001
                        ent[label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                        log(f"  {name} {label}: {type(exc).__name__}: {str(exc)[:300]}")
            log(f"{name}: " + ", ".join(f"{k} {v['ms'] * 1e3:.1f} us {v['TBps']:.2f} TB/s"
                                        for k, v in ent.items() if isinstance(v, dict) and "ms" in v))
            self.save()


def table(R):
    lines = [f"== {R['gpu']} | {R['date']} | copy {R.get('copy_TBps', 0):.2f} TB/s | cuBLAS 8192^3 "
             f"{R.get('cublas_8192_TFLOPs', 0):.0f} TFLOP/s =="]
    lines.append("GEMM @132: ms cuBLAS / triton / tma (x cuBLAS) | vs whole-GPU cuBLAS scaled linearly @"
                 + "/".join(map(str, PART_SMS)) + ": tma | tma stream-K | cuBLAS | cuBLASLt with the SM target")
    for k, e in R.get("gemm", {}).items():
        g = lambda lab, f="ms": e.get(lab, {}).get(f, float("nan"))  # noqa: E731
        lines.append(f"{k:>9}: {g('torch'):.4f} / {g('triton'):.4f} / {g('tma'):.4f} ({g('torch') / g('tma'):.3f}x)"
                     f" best {e.get('tma_best', {}).get('label', '-')} {e.get('tma_best_vs_cublas', float('nan')):.3f}x | "
                     + " ".join(f"{g(f'tma_{n}', 'vs_linear'):.3f}" for n in PART_SMS) + " | sk "
                     + " ".join(f"{g(f'tma_sk_{n}', 'vs_linear'):.3f}" for n in PART_SMS) + " | "
                     + " ".join(f"{g(f'torch_{n}', 'vs_linear'):.3f}" for n in PART_SMS) + " | lt "
                     + " ".join(f"{g(f'cublaslt_{n}', 'vs_linear'):.3f}" for n in PART_SMS))
    for k, e in R.get("decode_attn", {}).items():
        g = lambda lab: e.get(lab, {}).get("TBps", float("nan"))  # noqa: E731
        lines.append(f"decode {k} TB/s: SDPA@132 {g('torch'):.2f} | triton " + " ".join(
            f"{n}:{g(f'triton_{n}'):.2f}" for n in DEC_SMS + (R['sms'],)) + " | tma " + " ".join(
            f"{n}:{g(f'tma_{n}'):.2f}" for n in DEC_SMS + (R['sms'],)) + (
            f" | best cfg@16 {e.get('tma_best_16')} @48 {e['tma_best_48']}" if "tma_best_48" in e else ""))
    for k, e in R.get("prefill_attn", {}).items():
        lines.append(f"prefill {k}: " + ", ".join(f"{lab} {v['TFLOPs']:.0f}" for lab, v in e.items()
                                                   if isinstance(v, dict) and "TFLOPs" in v) + " TF/s")
    for k, e in R.get("small_ops", {}).items():
        lines.append(f"{k}: " + ", ".join(f"{lab} {v['ms'] * 1e3:.1f}us" for lab, v in e.items()
                                           if isinstance(v, dict) and "ms" in v))
    if R.get("errors"):
        lines.append(f"errors: {R['errors']}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true", help="also sweep the TMA and triton GEMM and decode configs")
    ap.add_argument("--only", default="", help="comma list of sections (ceilings,gemm,decode,prefill,small)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    B = Bench(args)
    secs = [("ceilings", B.ceilings), ("small", B.small), ("decode", B.decode), ("prefill", B.prefill),
            ("gemm", B.gemm)]
    only = {s for s in args.only.split(",") if s}
    for name, fn in secs:
        if not only or name in only:
            B.guard(name, fn)
    B.R["elapsed_s"] = round(time.time() - B.t0, 1)
    B.parts.close()
    tag = B.R["gpu"].replace("NVIDIA ", "").replace(" ", "-").replace("/", "-")
    path = os.path.join(args.out, f"kernels_{tag}_{datetime.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(B.R, f, indent=1, default=str)
    log(f"wrote {path}")
    log(table(B.R))


if __name__ == "__main__":
    main()
