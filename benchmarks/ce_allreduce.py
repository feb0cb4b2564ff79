"""Copy-engine all-reduce + fused RMSNorm against NCCL, alone and beside a GEMM.

    python benchmarks/ce_allreduce.py --out "$OUT"            # every visible GPU, one process each

One process per GPU (runtime.tp.spawn_ranks, NCCL, NVLink multicast off). For each message of
[tokens, hidden] bf16 (llama-3-70b: hidden 8192; tokens 512, 1024, 2048) and each GEMM impl, rank 0
records (median of --iters samples, with min and max; each sample one CUDA-graph replay, or one eager
issue where a capture fails on any rank, column "how"):

  solo, whole GPU    gemm          [tokens, hidden] @ [hidden, intermediate / N] (the UG shard of GPU_FACTS)
                     nccl          dist.all_reduce
                     nccl_norm     dist.all_reduce, then RMSNorm (Triton, small_ops.rmsnorm)
                     ce            copy-engine all-reduce, sum only (runtime.ce_collectives)
                     ce_norm       copy-engine all-reduce with the sum fused into the RMSNorm
  on a share of S SMs (green contexts, S in --shares; NCCL with a CTA limit of S):
                     gemm_rest_S   the GEMM on the other SMs, alone
                     nccl_norm_S   all-reduce + RMSNorm on the S SMs, alone
                     pair_nccl_S   both at once
  pairs on the whole GPU (two plain streams):
                     pair_ce       GEMM beside ce_norm (the copies take no SM; the fused norm does)
                     pair_nccl     GEMM beside nccl_norm, no partition (they contend for SMs)

Each pair is reported against running the same two back to back on the whole GPU (gemm + nccl_norm:
sequential TP) and against its own two parts back to back. Before timing, the copy-engine all-reduce
is checked against dist.all_reduce + torch's RMSNorm on every rank. JSON to --out (GPU names, date,
NCCL and torch versions, command), a short table printed last. A rank that runs past --deadline-s
exits (a hung wait must not hold the GPUs); rank 0 rewrites the JSON after every message size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _worker(tp, out_path: str, cfg: dict) -> None:
    import torch
    import torch.distributed as dist

    from nfsearch.runtime import ce_collectives as ce_mod
    from nfsearch.runtime import tp as tp_mod
    from nfsearch.runtime.kernels import IMPLS, rmsnorm
    from nfsearch.runtime.partitions import SmPartitions, capture_graph, issue_across
    from nfsearch.specs import load_model

    started = time.time()

    def give_up():                      # a wait that never ends (a lost flag) must not hold the GPUs
        print(f"rank {tp.rank}: past the {cfg['deadline_s']} s deadline, exiting", flush=True)
        os._exit(3)

    watchdog = threading.Timer(cfg["deadline_s"], give_up)
    watchdog.daemon = True
    watchdog.start()
    say = (lambda m: print(f"[{time.time() - started:6.1f}s] {m}", flush=True)) if tp.is_first else (lambda m: None)
    dev, N = tp.device, tp.world_size
    model = load_model(cfg["model"])
    H, inter = model.hidden_size, model.intermediate_size
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    tokens = sorted(cfg["tokens"])
    T_max = tokens[-1]
    notes: list[str] = []

    def agree(ok: bool) -> bool:
        return ce_mod._all_ranks_agree(dist.group.WORLD, ok, dev)

    # ---- the copy-engine all-reduce, checked against NCCL + torch's RMSNorm first
    ce = ce_mod.CeAllReduce(None, T_max, H, torch.bfloat16, dev, num_slots=2, sync=cfg["sync"])
    notes += ce.notes
    check = ce_mod.check_against_all_reduce(ce, [(0, T_max // 2), (T_max // 2, T_max)], seed=1)
    checks = [None] * N
    dist.all_gather_object(checks, check)
    say(f"ce sync={ce.sync}: max rel error sum {max(c['rel_error_sum'] for c in checks):.2e}, norm "
        f"{max(c['rel_error_norm'] for c in checks):.2e}, same on all ranks {check['is_same_on_all_ranks']}")

    # ---- partitions (every rank must agree, or none uses them) and CTA-limited communicators
    shares = [s for s in cfg["shares"] if 0 < s < num_sms]
    parts, split = None, {}
    try:
        parts = SmPartitions(dev.index, "green")
        for s in shares:
            (net_sms, net_stream), (rest_sms, rest_stream) = parts.split((s, num_sms - s))
            split[s] = (net_sms, net_stream, rest_sms, rest_stream)
        ok = True
    except Exception as exc:  # noqa: BLE001 - no green contexts here: the share rows are skipped, noted
        notes.append(f"green contexts unavailable ({type(exc).__name__}: {str(exc)[:120]}); no share rows")
        ok = False
    if not agree(ok):
        split = {}
    tp.coll.prepare([v[0] for v in split.values()])
    notes += tp.coll.notes

    # ---- buffers: zeros, so repeated in-place all-reduces stay finite
    x = torch.zeros((T_max, H), device=dev, dtype=torch.bfloat16)
    normed = torch.empty_like(x)
    weight = torch.ones(H, device=dev, dtype=torch.bfloat16)
    a = torch.randn((T_max, H), device=dev, dtype=torch.bfloat16)
    w = torch.randn((H, inter // N), device=dev, dtype=torch.bfloat16) * 0.02
    c = torch.empty((T_max, inter // N), device=dev, dtype=torch.bfloat16)
    s_op, s_gemm = torch.cuda.Stream(dev), torch.cuda.Stream(dev)

    def measure(work) -> dict:
        """Median/min/max ms of `work` ([(stream, fn), ...] at once), one graph replay per sample."""
        def issue():
            issue_across(work)

        issue()
        torch.cuda.synchronize(dev)
        graph, ok, why = None, False, None
        if cfg["graphs"]:
            try:
                graph = capture_graph(work)
                ok = True
            except Exception as exc:  # noqa: BLE001 - capture failed: eager on every rank, noted
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            torch.cuda.synchronize(dev)
        ok = agree(ok)
        fn = graph.replay if ok else issue
        times = []
        for i in range(cfg["iters"] + 2):
            torch.cuda.synchronize(dev)
            dist.barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            if i >= 2:
                times.append(start.elapsed_time(end))
        out = {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": len(times),
               "how": "cuda-graph" if ok else "eager"}
        if why:
            out["capture_error"] = why
        del graph
        return out

    def measure_size(T: int) -> dict:
        """Every row of one message size (all ranks run the same calls in the same order)."""
        xs, ns, as_, cs = x[:T], normed[:T], a[:T], c[:T]
        nccl = lambda g=None: dist.all_reduce(xs, group=g)

        def nccl_norm(g=None, sms=num_sms):
            dist.all_reduce(xs, group=g)
            rmsnorm(xs, weight, ns, sms)

        ce_sum = lambda: ce.all_reduce_norm(xs, 0, T)
        ce_norm = lambda: ce.all_reduce_norm(xs, 0, T, norm_out=ns, weight=weight)
        r = {"num_tokens": T, "message_bytes": T * H * 2, "ce_bytes_sent_per_rank": ce.bytes_sent_per_rank(T)}
        rows.append(r)                  # saved as it fills: a hang later keeps what was measured
        for name, fn in (("nccl", nccl), ("nccl_norm", nccl_norm), ("ce", ce_sum), ("ce_norm", ce_norm)):
            r[name] = measure([(s_op, fn)])
            save(T)
        r["gemm"] = {}
        for impl in cfg["gemm_impls"]:
            gemm = lambda sms=num_sms, impl=impl: IMPLS["ug"][impl](as_, w, cs, sms)
            g = {}
            try:
                gemm()
                torch.cuda.synchronize(dev)
                ok = True
            except Exception as exc:  # noqa: BLE001 - an impl that does not run here is skipped, noted
                notes.append(f"gemm impl {impl} failed at {T} tokens: {type(exc).__name__}: {str(exc)[:120]}")
                ok = False
            if not agree(ok):
                continue
            g["whole"] = measure([(s_gemm, gemm)])
            seq = g["whole"]["ms"] + r["nccl_norm"]["ms"]        # sequential TP: GEMM, then all-reduce + norm
            for s, (net_sms, net_stream, rest_sms, rest_stream) in split.items():
                group = tp.coll.group_for(net_sms, num_sms)
                g_rest = lambda sms=rest_sms, gemm=gemm: gemm(sms)
                op = lambda group=group, sms=net_sms: nccl_norm(group, sms)
                e = {"net_sms": net_sms, "gemm_sms": rest_sms,
                     "is_cta_limited": group is not tp.coll.group}
                e["gemm_rest"] = measure([(rest_stream, g_rest)])
                e["nccl_norm_share"] = measure([(net_stream, op)])
                e["pair"] = measure([(rest_stream, g_rest), (net_stream, op)])
                e["speedup_vs_seq"] = seq / e["pair"]["ms"]
                e["speedup_vs_own_parts"] = (e["gemm_rest"]["ms"] + e["nccl_norm_share"]["ms"]) / e["pair"]["ms"]
                g[f"share_{s}"] = e
            for name, op, solo in (("pair_ce", ce_norm, r["ce_norm"]), ("pair_nccl", nccl_norm, r["nccl_norm"])):
                e = {"pair": measure([(s_gemm, gemm), (s_op, op)])}
                e["speedup_vs_seq"] = seq / e["pair"]["ms"]
                e["speedup_vs_own_parts"] = (g["whole"]["ms"] + solo["ms"]) / e["pair"]["ms"]
                g[name] = e
            g["seq_ms"] = seq
            r["gemm"][impl] = g
            save(T)
        return r

    def save(T: int, is_complete: bool = False) -> None:
        if tp.is_first:
            report = {"benchmark": "ce_allreduce", "world_size": N, "model": model.name, "hidden_size": H,
                      "intermediate_size": inter, "gemm_shape": f"[T, {H}] @ [{H}, {inter // N}]",
                      "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                      "num_sms": num_sms, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                      "nccl": tp_mod._nccl_version(), "torch": torch.__version__, "command": cfg["command"],
                      "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                             "NVSHMEM_DISABLE_NVLS")},
                      "ce": ce.describe(), "ce_check": checks, "notes": notes, "rows": rows,
                      "is_complete": is_complete, "elapsed_s": time.time() - started}
            with open(out_path, "w") as f:
                json.dump(report, f, indent=1)

    rows: list[dict] = []
    for T in tokens:
        r = measure_size(T)
        say(f"{T} tokens: nccl {r['nccl']['ms']:.3f} nccl+norm {r['nccl_norm']['ms']:.3f} ce {r['ce']['ms']:.3f} "
            f"ce+norm {r['ce_norm']['ms']:.3f} ms ({r['ce_norm']['how']})")
    save(tokens[-1], is_complete=True)
    dist.barrier()
    torch.cuda.synchronize(dev)
    watchdog.cancel()
    if parts is not None:
        parts.close()
    sys.stdout.flush()
    # the JSON is written: leave without tearing down symmetric memory and the communicators, whose
    # teardown order is none of this benchmark's business (a crash there would read as a failed run)
    os._exit(0)


def format_table(report: dict) -> str:
    """The short table: one line per message size and GEMM impl (rows cut short by a failure show '-')."""
    ms = lambda d: f"{d['ms']:.3f}" if d else "-"
    checks = report.get("ce_check", [])
    lines = [(f"ce_allreduce: {report['world_size']}x {report['gpus'][0]}, NCCL {report['nccl']}, ce sync "
              f"{report['ce']['sync']}, check max rel err sum {max(c['rel_error_sum'] for c in checks):.1e} norm "
              f"{max(c['rel_error_norm'] for c in checks):.1e}, same bits on all ranks "
              f"{all(c['is_same_on_all_ranks'] for c in checks)}"),
             "tokens | nccl | nccl+norm | ce | ce+norm (how) | gemm impl: whole | pair ms x(seq / pair): "
             + " | ".join(f"share {s}" for s in report.get("shares", [])) + " | ce | nccl-unsplit"]
    for r in report["rows"]:
        cen = r.get("ce_norm")
        head = (f"{r['num_tokens']:6d} | {ms(r.get('nccl'))} | {ms(r.get('nccl_norm'))} | {ms(r.get('ce'))} | "
                f"{ms(cen)} ({cen['how'] if cen else '-'})")
        if not r.get("gemm"):
            lines.append(head)
        for impl, g in r.get("gemm", {}).items():
            keys = [f"share_{s}" for s in report.get("shares", [])] + ["pair_ce", "pair_nccl"]
            pairs = [f"{g[k]['pair']['ms']:.3f} x{g[k]['speedup_vs_seq']:.2f}" if k in g else "-" for k in keys]
            lines.append(f"{head} | {impl}: {g['whole']['ms']:.3f} | " + " | ".join(pairs))
    lines.append("x = (gemm + nccl+norm back to back on the whole GPU) / pair time: > 1 beats sequential TP")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for ce_allreduce.json")
    p.add_argument("--tp", type=int, default=0, help="processes/GPUs (0: every visible GPU)")
    p.add_argument("--model", default="llama-3-70b")
    p.add_argument("--tokens", default="512,1024,2048")
    p.add_argument("--shares", default="16,32", help="SM counts of the NCCL share (green contexts)")
    p.add_argument("--gemm-impls", default="torch,tma", help="IMPLS['ug'] impls for the GEMM beside")
    p.add_argument("--sync", default="memop", choices=("memop", "barrier"))
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--no-graphs", action="store_true", help="time eager issue only")
    p.add_argument("--deadline-s", type=float, default=150.0, help="a rank past this exits")
    args = p.parse_args(argv)
    import torch

    from nfsearch.runtime import tp as tp_mod
    n = args.tp or torch.cuda.device_count()
    if n < 2 or torch.cuda.device_count() < n:
        print(f"ce_allreduce: needs >= 2 GPUs, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    if args.iters < 10:
        print("ce_allreduce: --iters must be >= 10", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "ce_allreduce.json"
    cfg = {"model": args.model, "tokens": [int(t) for t in args.tokens.split(",")],
           "shares": [int(s) for s in args.shares.split(",") if s], "gemm_impls": args.gemm_impls.split(","),
           "sync": args.sync, "iters": args.iters, "graphs": not args.no_graphs, "deadline_s": args.deadline_s,
           "command": " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv)}
    error = None
    try:
        tp_mod.spawn_ranks(_worker, n, "nccl", (str(out), cfg))
    except Exception as exc:  # noqa: BLE001 - keep what rank 0 wrote; say why it stopped
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    report = json.loads(out.read_text()) if out.exists() else {}
    if error:
        report["error"] = error
        out.write_text(json.dumps(report, indent=1))
        print(f"ce_allreduce: a rank failed: {error}", file=sys.stderr)
    if report.get("rows"):
        report["shares"] = cfg["shares"]
        print(format_table(report))
    return 0 if not error and report.get("is_complete") else 1


if __name__ == "__main__":
    sys.exit(main())
