"""Paged attention kernels vs torch on contiguous caches (LLaMA-3-8B heads: Hq 32, Hkv 8, D 128, bf16).

Decode: achieved bandwidth = K+V bytes of the real contexts / median time (an fp8 cache: the fp8 K/V
plus its float32 scale per token and kv head, the bytes the kernel actually reads). Prefill: causal
TFLOP/s (4 * D * Hq * sum over rows of keys seen). bf16 and fp8 caches (--kv-cache-dtype fp8) side by
side at 300x1280 and 1024x1024. SM shares run inside green contexts (SM-accurate) with
num_sms = the share. Usage: python benchmarks/paged_attention.py [--budget-s S] [--out DIR] [--dry]
[--sections decode_rows,...,decode_fp8_sweep]
"""

import argparse
import copy
import dataclasses
import json
import math
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from nfsearch.runtime.kernels import paged_attention as pa

HQ, HKV, D = 32, 8, 128
DT = torch.bfloat16
DEV = "cuda"
DRY = False           # --dry: CPU, Triton interpreter, fp32, tiny shapes, every timing 1 ms (plumbing check)
SCALE = 1 / math.sqrt(D)
T0 = time.time()
ROWS = []


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def timed(fn, stream=None):
    if DRY:
        fn()
        return 1.0
    if stream is None:
        return do_bench(fn, warmup=20, rep=120, return_mode="median")
    with torch.cuda.stream(stream):
        return do_bench(fn, warmup=20, rep=120, return_mode="median")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def copy_ceiling():
    if DRY:
        return 0.0
    x = torch.empty(1 << 30, dtype=DT, device=DEV)
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x))
    del x, y
    return 2 * (1 << 31) / ms / 1e9


def to_fp8_cache(kc, vc):
    """(fp8 K, fp8 V, {k_scales, v_scales}) of bf16 caches [pages, ps, Hkv, D], quantized by write_kv."""
    k8, v8 = torch.zeros(kc.shape, device=kc.device, dtype=torch.float8_e4m3fn), None
    v8 = torch.zeros_like(k8)
    ks, vs = (pa.new_kv_scales(*kc.shape[:3], device=kc.device) for _ in range(2))
    slots = torch.arange(kc.shape[0] * kc.shape[1], device=kc.device)
    pa.write_kv(kc.view(-1, HKV, D), vc.view(-1, HKV, D), k8, v8, slots, k_scales=ks, v_scales=vs)
    return k8, v8, {"k_scales": ks, "v_scales": vs}


class Decode:
    def __init__(self, B, ctx, ps=16):
        if DRY:
            B, ctx = min(B, 3), 128
        self.B, self.ctx, self.ps = B, ctx, ps
        npages = B * ctx // ps
        self.kc = torch.randn(npages, ps, HKV, D, device=DEV, dtype=DT)
        self.vc = torch.randn_like(self.kc)
        self.scales = {}
        self.pt = torch.randperm(npages, device=DEV).to(torch.int32).view(B, ctx // ps)
        self.cl = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
        self.q = torch.randn(B, HQ, D, device=DEV, dtype=DT)
        self.out = torch.empty_like(self.q)
        self.bytes = B * ctx * HKV * D * 2 * 2

    def fp8(self):
        """The same requests over an fp8 copy of the cache: it reads 1-byte K/V plus a 4-byte scale per
        token and kv head."""
        twin = copy.copy(self)
        twin.kc, twin.vc, twin.scales = to_fp8_cache(self.kc, self.vc)
        twin.out = torch.empty_like(self.out)
        twin.bytes = self.B * self.ctx * HKV * 2 * (D + 4)
        return twin

    def run(self, num_sms, cfg=None, num_splits=None):
        return lambda: pa.paged_decode_attention(self.q, self.kc, self.vc, self.pt, self.cl, self.out, SCALE,
                                                 num_sms=num_sms, num_splits=num_splits, config=cfg, **self.scales)

    def contiguous(self):
        """Same data, contiguous [B, ctx, Hkv, D]; the SDPA baseline (the G query heads of a kv head as
        G query rows, so K/V are read once), and its output for a cross-check."""
        k = self.kc[self.pt.long()].reshape(self.B, self.ctx, HKV, D)
        v = self.vc[self.pt.long()].reshape(self.B, self.ctx, HKV, D)
        qg = self.q.view(self.B, HKV, HQ // HKV, D)

        def sdpa():
            return F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), scale=SCALE)
        return sdpa, k, v

    def tbps(self, ms):
        return self.bytes / ms / 1e9


# (block_n, warps, stages, programs/SM). With the page-id load in the pipeline, stages=3 leaves ONE K/V
# tile in flight (AOT: 39 KB smem); stages 5 (64 tokens) or 6 (32 tokens) give two, as the contiguous
# kernel has at stages 3 (aot_check.py). First H100 sweep (stages <= 4 only): 64/4/3/3 best at 32 SMs.
DECODE_SWEEP = [pa.DecodeConfig(64, 4, 3, 3), pa.DecodeConfig(64, 4, 5, 3), pa.DecodeConfig(64, 4, 6, 3),
                pa.DecodeConfig(32, 4, 6, 4), pa.DecodeConfig(32, 4, 8, 4), pa.DecodeConfig(128, 4, 5, 1),
                pa.DecodeConfig(64, 4, 5, 2), pa.DecodeConfig(32, 4, 4, 4), pa.DecodeConfig(128, 4, 3, 2)]
PREFILL_SWEEP = [pa.PrefillConfig(64, 64, 4, 3, 2), pa.PrefillConfig(128, 64, 8, 2, 2), pa.PrefillConfig(128, 64, 8, 3, 1),
                 pa.PrefillConfig(128, 128, 8, 2, 1), pa.PrefillConfig(64, 64, 4, 3, 3),
                 pa.PrefillConfig(128, 32, 4, 3, 2), pa.PrefillConfig(64, 128, 4, 2, 2),
                 pa.PrefillConfig(128, 64, 4, 2, 2)]


def cfg_name(c):
    name = "/".join(str(x) for x in (c.block_m if hasattr(c, "block_m") else None, c.block_n, c.num_warps,
                                     c.num_stages, c.programs_per_sm) if x is not None)
    return name + (" v16" if getattr(c, "fp8_v_fp16_tile", False) else "")


def over_budget(args):
    return time.time() - T0 > args.budget_s


def decode_rows(streams, full, args, best=None):
    """Headline rows: both shapes at the full GPU, 64 and 32 SMs; default config (+ best if swept)."""
    from nfsearch.runtime.kernels.decode_attention import decode_attention
    from nfsearch.runtime.kernels.decode_tma import decode_attention_tma
    for B, ctx in ((300, 1280), (1024, 1024)):
        dec = Decode(B, ctx)
        sdpa, k, v = dec.contiguous()
        dec.run(full)()
        log(f"decode {B}x{ctx}: paged vs SDPA rel err {rel(dec.out, sdpa().reshape(dec.B, HQ, D)):.2e}")
        for sms in (full, 64, 32):
            t_def = timed(dec.run(sms), streams[sms])
            t_sdpa = timed(sdpa, streams[sms])
            ROWS.append(dict(kind="decode", shape=f"{B}x{ctx}", sms=sms, paged_tbps=dec.tbps(t_def),
                             sdpa_tbps=dec.tbps(t_sdpa), paged_ms=t_def, sdpa_ms=t_sdpa))
            log(ROWS[-1])
        for name, fn in (("contiguous triton", decode_attention), ("contiguous tma", decode_attention_tma)):
            try:
                ms = timed(lambda: fn(dec.q, k, v, dec.cl, dec.out, full, scale=SCALE), None)
                log(f"  {name} (project kernel, same data) at {full} SMs: {dec.tbps(ms):.3f} TB/s")
            except Exception as exc:  # noqa: BLE001
                log(f"  {name} failed: {exc!r}")
        del k, v
        fp8 = dec.fp8()
        fp8.run(full)()
        dec.run(full)()                  # dec.out again (the contiguous kernels above wrote into it)
        ref = pa.paged_decode_attention_torch(fp8.q, fp8.kc, fp8.vc, fp8.pt, fp8.cl, torch.empty_like(fp8.q), SCALE,
                                              **fp8.scales) if DRY or B * ctx <= 300 * 1280 else None
        log(f"decode {B}x{ctx} fp8 cache: vs the bf16 cache rel err {rel(fp8.out, dec.out):.2e}"
            + (f", vs torch fp8 reference {rel(fp8.out, ref):.2e}" if ref is not None else ""))
        for sms in (full, 64, 32):
            t_bf16 = timed(dec.run(sms), streams[sms])
            t_fp8 = timed(fp8.run(sms), streams[sms])
            ROWS.append(dict(kind="decode_fp8", shape=f"{B}x{ctx}", sms=sms, bf16_tbps=dec.tbps(t_bf16),
                             fp8_tbps=fp8.tbps(t_fp8), bf16_ms=t_bf16, fp8_ms=t_fp8, speedup=t_bf16 / t_fp8,
                             bf16_bytes=dec.bytes, fp8_bytes=fp8.bytes))
            log(ROWS[-1])
        del dec, fp8
        if not DRY:
            torch.cuda.empty_cache()


def decode_sweep(streams, full, args):
    dec = Decode(300, 1280)
    for sms in (full, 64, 32):
        res = []
        for c in DECODE_SWEEP:
            if over_budget(args):
                return
            res.append((dec.tbps(timed(dec.run(sms, c), streams[sms])), c))
            log(f"  sweep 300x1280 {sms} SMs cfg {cfg_name(c)}: {res[-1][0]:.3f} TB/s")
        BEST[("decode", sms)] = max(res, key=lambda r: r[0])
    for ns in (2, 4):
        log(f"  300x1280 {full} SMs num_splits {ns}: {dec.tbps(timed(dec.run(full, num_splits=ns))):.3f} TB/s")
    c = BEST[("decode", full)][1]
    dec2 = Decode(1024, 1024)
    log(f"  1024x1024 {full} SMs best cfg {cfg_name(c)}: {dec2.tbps(timed(dec2.run(full, c))):.3f} TB/s")
    del dec, dec2
    torch.cuda.empty_cache()
    for ps in (32, 64):
        dec = Decode(300, 1280, ps)
        log(f"decode 300x1280 page {ps} at {full} SMs: {dec.tbps(timed(dec.run(full))):.3f} TB/s")
        del dec
        torch.cuda.empty_cache()


def decode_fp8_sweep(streams, full, args):
    """The decode configs on an fp8 cache at E1's FP8-KV top bucket (576 requests x 1536) and 300x1280,
    at the full GPU, beside the bf16 cache's default config on the same requests."""
    for B, ctx in ((576, 1536), (300, 1280)):
        dec = Decode(B, ctx)
        t_bf16 = timed(dec.run(full))
        fp8 = dec.fp8()
        del dec
        res = []
        for c in [dataclasses.replace(c, fp8_v_fp16_tile=v16) for c in DECODE_SWEEP for v16 in (False, True)]:
            if over_budget(args):
                return
            t = timed(fp8.run(full, c))
            res.append((fp8.tbps(t), c))
            ROWS.append(dict(kind="decode_fp8_sweep", shape=f"{B}x{ctx}", sms=full, cfg=cfg_name(c), fp8_ms=t,
                             fp8_tbps=fp8.tbps(t), bf16_default_ms=t_bf16))
            log(ROWS[-1])
        BEST[("decode_fp8", f"{B}x{ctx}")] = max(res, key=lambda r: r[0])
        del fp8
        if not DRY:
            torch.cuda.empty_cache()


BEST = {}


class Prefill:
    def __init__(self, prefix, n=600, ps=16, num_rows=None, num_segments=1):
        if DRY:
            prefix, n, num_rows = min(prefix, 40), 24, num_rows and 48
        self.prefix, self.n = prefix, n
        kv = prefix + n
        npages = -(-kv // ps)
        self.kc = torch.randn(npages, ps, HKV, D, device=DEV, dtype=DT)
        self.vc = torch.randn_like(self.kc)
        self.pt = torch.zeros(num_segments, npages, dtype=torch.int32, device=DEV)
        self.pt[0] = torch.randperm(npages, device=DEV).to(torch.int32)
        rows = num_rows or n
        self.q = torch.randn(rows, HQ, D, device=DEV, dtype=DT)
        self.out = torch.empty_like(self.q)
        z = [0] * (num_segments - 1)
        self.starts = torch.tensor([0] + z, dtype=torch.int32, device=DEV)
        self.lens = torch.tensor([n] + z, dtype=torch.int32, device=DEV)
        self.prefixes = torch.tensor([prefix] + z, dtype=torch.int32, device=DEV)
        self.flops = 4 * D * HQ * sum(prefix + i + 1 for i in range(n))
        self.scales = {}
        self.k = self.kc[self.pt[0].long()].reshape(-1, HKV, D)[:kv].contiguous()
        self.v = self.vc[self.pt[0].long()].reshape(-1, HKV, D)[:kv].contiguous()
        self.cu_q = torch.tensor([0, n], dtype=torch.int32, device=DEV)
        self.cu_k = torch.tensor([0, kv], dtype=torch.int32, device=DEV)

    def run(self, num_sms, cfg=None):
        return lambda: pa.paged_prefill_attention(self.q, self.kc, self.vc, self.pt, self.starts, self.lens,
                                                  self.prefixes, self.out, SCALE, num_sms=num_sms, config=cfg,
                                                  **self.scales)

    def fp8(self):
        """The same chunk over an fp8 copy of the cache."""
        twin = copy.copy(self)
        twin.kc, twin.vc, twin.scales = to_fp8_cache(self.kc, self.vc)
        twin.out = torch.empty_like(self.out)
        return twin

    def flash(self):
        if DRY:
            ref = torch.empty_like(self.out)
            return pa.paged_prefill_attention_torch(self.q, self.kc, self.vc, self.pt, self.starts, self.lens,
                                                    self.prefixes, ref, SCALE)[:self.n]
        kv = self.prefix + self.n
        return torch.ops.aten._flash_attention_forward(self.q[:self.n], self.k, self.v, self.cu_q, self.cu_k, self.n, kv,
                                                       0.0, True, False, scale=SCALE)[0]

    def tflops(self, ms):
        return self.flops / ms / 1e9


def prefill_rows(streams, full, args):
    for prefix in (0, 1024):
        pre = Prefill(prefix)
        pre.run(full)()
        log(f"prefill 600 over {prefix}: paged vs flash rel err {rel(pre.out, pre.flash()):.2e}")
        for sms in (full, 64, 32):
            t_def = timed(pre.run(sms), streams[sms])
            t_fl = timed(pre.flash, streams[sms])
            ROWS.append(dict(kind="prefill", shape=f"600 over {prefix}", sms=sms, paged_tflops=pre.tflops(t_def),
                             flash_tflops=pre.tflops(t_fl), paged_ms=t_def, flash_ms=t_fl))
            log(ROWS[-1])
        fp8 = pre.fp8()
        fp8.run(full)()
        t_bf16, t_fp8 = timed(pre.run(full)), timed(fp8.run(full))
        ROWS.append(dict(kind="prefill_fp8", shape=f"600 over {prefix}", sms=full, bf16_ms=t_bf16, fp8_ms=t_fp8,
                         fp8_tflops=fp8.tflops(t_fp8), fp8_vs_bf16_rel_err=rel(fp8.out[:pre.n], pre.out[:pre.n])))
        log(ROWS[-1])
    eng = Prefill(1024, num_rows=2048, num_segments=8)     # an engine bucket: 2048 rows, 8 segments, 1 used
    log(f"prefill 600 over 1024 in a 2048-row 8-segment bucket at {full} SMs: "
        f"{eng.tflops(timed(eng.run(full))):.1f} TFLOP/s")


def prefill_sweep(streams, full, args):
    for prefix in (1024, 0):
        pre = Prefill(prefix)
        res = []
        for c in PREFILL_SWEEP:
            if over_budget(args):
                return
            res.append((pre.tflops(timed(pre.run(full, c))), c))
            log(f"  sweep prefill 600 over {prefix} {full} SMs cfg {cfg_name(c)}: {res[-1][0]:.1f} TFLOP/s")
        BEST[("prefill", prefix)] = max(res, key=lambda r: r[0])


SECTIONS = {f.__name__: f for f in (decode_rows, prefill_rows, decode_sweep, prefill_sweep, decode_fp8_sweep)}


def print_tables(name):
    print(f"\n{name}: decode TB/s (K+V bytes / median time), default config; SM shares in green contexts")
    print("| shape | SMs | paged | SDPA contiguous | paged ms | SDPA ms |")
    print("|---|---|---|---|---|---|")
    for r in ROWS:
        if r["kind"] == "decode":
            print(f"| {r['shape']} | {r['sms']} | {r['paged_tbps']:.2f} | {r['sdpa_tbps']:.2f} | {r['paged_ms']:.3f} "
                  f"| {r['sdpa_ms']:.3f} |")
    print(f"\n{name}: decode bf16 vs fp8 KV cache (TB/s at the bytes each reads: fp8 = 1-byte K/V + 4-byte "
          "scale per token and kv head)")
    print("| shape | SMs | bf16 TB/s | fp8 TB/s | bf16 ms | fp8 ms | bf16/fp8 time |")
    print("|---|---|---|---|---|---|---|")
    for r in ROWS:
        if r["kind"] == "decode_fp8":
            print(f"| {r['shape']} | {r['sms']} | {r['bf16_tbps']:.2f} | {r['fp8_tbps']:.2f} | {r['bf16_ms']:.3f} "
                  f"| {r['fp8_ms']:.3f} | {r['speedup']:.2f}x |")
    for r in ROWS:
        if r["kind"] == "decode_fp8_sweep":
            print(f"fp8 decode {r['shape']} at {r['sms']} SMs cfg {r['cfg']}: {r['fp8_ms']:.3f} ms "
                  f"({r['fp8_tbps']:.2f} TB/s); bf16 cache, default cfg: {r['bf16_default_ms']:.3f} ms")
    for r in ROWS:
        if r["kind"] == "prefill_fp8":
            print(f"prefill {r['shape']} at {r['sms']} SMs: bf16 {r['bf16_ms']:.3f} ms, fp8 cache {r['fp8_ms']:.3f} ms "
                  f"({r['fp8_tflops']:.1f} TFLOP/s), fp8 vs bf16 rel err {r['fp8_vs_bf16_rel_err']:.2e}")
    print(f"\n{name}: prefill TFLOP/s (causal flops / median time), one 600-token chunk, default config")
    print("| chunk | SMs | paged | flash contiguous | paged ms | flash ms |")
    print("|---|---|---|---|---|---|")
    for r in ROWS:
        if r["kind"] == "prefill":
            print(f"| {r['shape']} | {r['sms']} | {r['paged_tflops']:.1f} | {r['flash_tflops']:.1f} "
                  f"| {r['paged_ms']:.3f} | {r['flash_ms']:.3f} |")
    for key, (val, c) in BEST.items():
        print(f"best in sweep {key}: {val:.3f} with {cfg_name(c)}")


class _Props:
    name, multi_processor_count = "dry run (CPU)", 6


class _Parts:
    def stream(self, n):
        return None

    def sm_count(self, s):
        return 0

    def close(self):
        pass


def run_dry(args):
    main_body(args, _Props(), _Parts())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=120.0, help="start no sweep step after this")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--sections", default="decode_rows,prefill_rows,decode_sweep,prefill_sweep",
                    help=f"comma-separated, in order, of: {', '.join(SECTIONS)}")
    args = ap.parse_args()
    if args.dry:
        global DEV, DT, DRY
        DEV, DT, DRY = "cpu", torch.float32, True
        run_dry(args)
        return
    from nfsearch.runtime.partitions import SmPartitions

    main_body(args, torch.cuda.get_device_properties(0), SmPartitions(mode="green"))


def main_body(args, props, parts):
    full = props.multi_processor_count
    streams = {full: None, 64: parts.stream(64), 32: parts.stream(32)}
    log(f"GPU {props.name}, {full} SMs, torch {torch.__version__}; green streams: "
        f"{ {n: parts.sm_count(s) for n, s in streams.items() if s is not None} }")
    log(f"copy ceiling (read+write): {copy_ceiling():.3f} TB/s")
    import signal
    import sys
    import traceback
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))   # a timeout still prints the tables
    try:
        for name in args.sections.split(","):
            section = SECTIONS[name]
            if name.endswith("sweep") and over_budget(args):
                log(f"budget spent: {section.__name__} skipped")
                continue
            try:
                section(streams, full, args)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
    finally:
        print_tables(props.name)
        if args.out:
            with open(f"{args.out}/paged_bench.json", "w") as f:
                json.dump(dict(gpu=props.name, rows=ROWS, best={str(k): [v, cfg_name(c)] for k, (v, c) in BEST.items()}),
                          f, indent=1)
        parts.close()


if __name__ == "__main__":
    main()
