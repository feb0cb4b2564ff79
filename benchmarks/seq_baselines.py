"""Are the baselines honest? On one GPU, in one process, timing rounds rotating the candidates:

* seq-torch (runtime.baselines.torch_forward) against the straightforward layer of docs/workloads.md
  written out here on its own (fused QKV and gate/up weights, F.rms_norm, rotate-half RoPE and the KV
  append in bf16, SDPA, ``x + attn @ Wo``, one CUDA graph): target seq-torch <= 1.03 x plain;
* the sequential plan (search.baselines.sequential_plan, issued as the executor issues a plan) against
  seq-same with the same impls: target plan <= 1.01 x seq-same.

    PYTHONPATH=. python benchmarks/seq_baselines.py [--only W1,W2,W3] [--iters 20] [--repeats 6] [--out DIR]

Prints one line per workload and writes DIR/seq_baselines_<gpu>.json. `--cpu`: a dry run on a tiny
model (host clock, no graphs), which also checks that the plain layer computes what seq-torch does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def plain_forward(m):
    """The straightforward layer stack, written as a user would, from the ModelInstance's weights."""
    import torch
    import torch.nn.functional as F

    T, R, hq, hkv, d, H = m.num_tokens, m.num_decode, m.hq, m.hkv, m.d, m.model.hidden_size
    slots, pos = m.slot_mapping[:R].long(), m.positions[:R].long()

    def rope(t, cos, sin):                          # rotate-half, in bf16
        t1, t2 = t[..., :d // 2], t[..., d // 2:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    def layer(x, w, kc, vc, cos, sin):
        qkv = F.rms_norm(x, (H,), w.norm1, 1e-5) @ w.wqkv
        if w.bqkv is not None:
            qkv = qkv + w.bqkv
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = rope(q.view(T, hq, d), cos, sin), rope(k.view(T, hkv, d), cos, sin), v.view(T, hkv, d)
        outs = []
        if R:
            kc[slots, pos] = k[:R]
            vc[slots, pos] = v[:R]
            o = F.scaled_dot_product_attention(q[:R].view(R, hkv, hq // hkv, d), kc.transpose(1, 2),
                                               vc.transpose(1, 2))
            outs.append(o.reshape(R, hq * d))
        for s, e in m.prompts:
            o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                               is_causal=True, enable_gqa=True)
            outs.append(o.transpose(0, 1).reshape(e - s, hq * d))
        mid = x + torch.cat(outs) @ w.wo
        g, u = (F.rms_norm(mid, (H,), w.norm2, 1e-5) @ w.wug).chunk(2, dim=-1)
        return mid + (F.silu(g) * u) @ w.wd

    def forward(x):
        cos = m.cos[m.positions.long()].to(x.dtype)[:, None, :]
        sin = m.sin[m.positions.long()].to(x.dtype)[:, None, :]
        for w, (kc, vc) in zip(m.layers, m.kv_cache):
            x = layer(x, w, kc, vc, cos, sin)
        return x

    return forward


def sequential(model, workload, device: str, num_layers: int = 2):
    """search.baselines.sequential_plan on the bundled profile (the analytic one on the CPU); the
    search package imports ortools."""
    from nfsearch.cost import default_profile, make_problem
    from nfsearch.search.baselines import sequential_plan

    if device == "cuda":
        profile = default_profile(model, workload)
    else:
        from nfsearch.roofline import analytic_profile
        from nfsearch.specs import load_gpu
        profile = analytic_profile(model, workload, load_gpu("h100-sxm"))
    return sequential_plan(make_problem(model, workload, profile, num_layers, allow_extrapolation=device != "cuda"))


def one_workload(name: str, s, device: str, iters: int, repeats: int) -> dict:
    """Time seq-torch, the plain layer, seq-same and the sequential plan `s` of one workload."""
    from nfsearch.runtime import baselines, executor
    from nfsearch.runtime.model import ModelInstance, rel_error

    if len({o.stream for o in s.nano_ops}) != 1 or any(o.index for o in s.nano_ops):
        raise SystemExit(f"{name}: not a sequential plan (one stream, whole ops)")
    model, workload, num_layers = s.model, s.workload, s.num_layers
    with executor.ExecContext(device, "grid") as ctx:
        m = ModelInstance(model, workload, num_layers, device=ctx.device, seed=0)
        ll = executor.build_launch_list(ctx, s)
        same = baselines.seq_same(s, ctx.num_sms, baselines.plan_impls(ll))
        m.prepare(ll.launches)
        m.prepare(same.launches)
        bufs = m.new_buffers()
        x0 = bufs[0]["x"]
        seq_torch, plain = baselines.torch_forward(m), plain_forward(m)
        err = rel_error(seq_torch(x0), plain(x0))
        variants = [executor._Variant("plain", lambda: plain(x0), {}),
                    executor._Variant("seq-torch", lambda: seq_torch(x0), {}),
                    executor._Variant("seq-same", lambda: executor.issue(ctx, m, bufs, same), {}),
                    executor._Variant("sequential-plan", lambda: executor.issue(ctx, m, bufs, ll), {})]
        for v in variants:
            v.prepare(ctx, ctx.is_cuda)
        executor.time_variants(ctx, variants, iters, repeats)
        t = {v.label: v.timing(iters, num_layers, ctx.is_cuda) for v in variants}
    row = {"workload": name, "rel_error_seq_torch_vs_plain": err,
           "layer_ms": {k: x.layer_ms for k, x in t.items()},
           "repeat_layer_ms": {k: list(x.repeat_layer_ms) for k, x in t.items()},
           "seq_torch_over_plain": t["seq-torch"].layer_ms / t["plain"].layer_ms,
           "plan_over_seq_same": t["sequential-plan"].layer_ms / t["seq-same"].layer_ms}
    print(f"{name}: plain {t['plain'].layer_ms:.4f}  seq-torch {t['seq-torch'].layer_ms:.4f} "
          f"({row['seq_torch_over_plain']:.3f}x, target <= 1.03)  seq-same {t['seq-same'].layer_ms:.4f}  "
          f"sequential plan {t['sequential-plan'].layer_ms:.4f} ({row['plan_over_seq_same']:.3f}x, target <= 1.01)  "
          f"ms/layer; seq-torch vs plain rel error {err:.2g}", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="W1,W2,W3")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--out", default="out")
    ap.add_argument("--plans", help="folder of sequential plans <W>.json (else solved here: needs ortools); "
                                    "--write-plans DIR writes them")
    ap.add_argument("--write-plans", help="write W1-W3's sequential plans (llama-3-8b, bundled profile) and exit")
    ap.add_argument("--cpu", action="store_true", help="dry run on a tiny model (host clock, no graphs)")
    a = ap.parse_args(argv)
    from nfsearch import plan
    from nfsearch.specs import ModelSpec, Workload, load_model, load_workload
    names = a.only.split(",")
    if a.write_plans:
        Path(a.write_plans).mkdir(parents=True, exist_ok=True)
        for w in names:
            plan.write(sequential(load_model("llama-3-8b"), load_workload(w), "cuda"), Path(a.write_plans) / f"{w}.json")
        print(f"wrote {', '.join(names)} to {a.write_plans}")
        return 0
    if a.cpu:
        cases = [("tiny", sequential(ModelSpec("tiny", 256, 4, 2, 64, 512, 2, 1000), Workload("tiny", 6, 40, (16, 16, 9)),
                                     "cpu"))]
    elif a.plans:
        cases = [(w, plan.read(Path(a.plans) / f"{w}.json")) for w in names]
    else:
        cases = [(w, sequential(load_model("llama-3-8b"), load_workload(w), "cuda")) for w in names]
    rows = [one_workload(n, s, "cpu" if a.cpu else "cuda", a.iters, a.repeats) for n, s in cases]
    gpu = "cpu"
    if not a.cpu:
        import torch
        gpu = torch.cuda.get_device_name().replace(" ", "_")
    out = Path(a.out) / f"seq_baselines_{gpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": gpu, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
