"""A LLaMA-family model instance for one dense batch, whose ops run as nano-ops over row slices.

Read top to bottom: weights -> batch inputs (positions, KV caches) -> per-layer activation buffers
-> one function per op, each over a token range [a, b) of the dense batch.

Token layout (nfsearch.graph): decode tokens are rows [0, num_decode) (decode request r is row r and
KV-cache slot r), prompt tokens follow, prompt after prompt. Every activation lives in a
preallocated per-layer buffer, so a nano-op over [a, b) is a launch on row slices and no two
nano-ops ever write the same rows. Layer l reads the residual stream from layer l-1's output buffer.

Layer (gpt-fast order, residual adds fused into the O and D GEMMs):
    h1   = rmsnorm(x) * w_norm1                     norm1
    qkv  = h1 @ Wqkv (+ bqkv)                       kqv
    q, k, v = rope(qkv); append decode k/v to cache rope_append
    attn = decode attention over the KV cache        decode_attn   (rows of decode requests)
           causal attention within each prompt       prefill_attn  (rows of prompt tokens)
    mid  = attn @ Wo + x                             o
    h2   = rmsnorm(mid) * w_norm2                    norm2
    ug   = h2 @ Wug           ([gate | up])          ug
    act  = silu(gate) * up                           act
    out  = act @ Wd + mid                            d

Every decode request has the workload's decode context: the new token is appended at position
context - 1 and attention reads context tokens. Prompt k/v stay in per-layer buffers (not the cache).

Impl names: those of nfsearch.runtime.kernels.IMPLS ("triton", "tma", "flash", "cuda" need CUDA;
"torch" works on the CPU too). The "torch" impls (kernels/torch_ops.py) are the straightforward bf16
ops of seq-torch (docs/workloads.md) and the per-op reference of the executor's correctness check. Two of
their arguments are chosen here so that the torch path never syncs the host (CUDA-graph capture
forbids it): prefill attention gets its offsets on the host, and rope_append gets no slot mapping
(the decode rows of its range then append with one index_put per cache). Decode attention's torch
impl gets no context lengths: every request attends to its whole cache, and SDPA without a mask
keeps its fastest kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from nfsearch.runtime.kernels import IMPLS, rope_cos_sin
from nfsearch.runtime.kernels.prefill_attention import BLOCK_M, block_table
from nfsearch.runtime.kernels.torch_ops import append_kv_torch
from nfsearch.specs import ModelSpec, Workload

ROPE_THETA = 500000.0
EPS = 1e-5
BUFFERS = ("h1", "qkv", "q", "k", "v", "attn", "mid", "h2", "ug", "act", "out")
# which buffer(s) each op writes: used to compare a run with the reference op by op
OP_OUTPUT = {"norm1": ("h1",), "kqv": ("qkv",), "rope_append": ("q", "k", "v"), "decode_attn": ("attn",),
             "prefill_attn": ("attn",), "o": ("mid",), "norm2": ("h2",), "ug": ("ug",), "act": ("act",),
             "d": ("out",)}


@dataclass
class LayerWeights:
    norm1: torch.Tensor      # [H]
    wqkv: torch.Tensor       # [H, Q + 2KV]
    bqkv: torch.Tensor | None
    wo: torch.Tensor         # [Q, H]
    norm2: torch.Tensor
    wug: torch.Tensor        # [H, 2I]
    wd: torch.Tensor         # [I, H]


class ModelInstance:
    def __init__(self, model: ModelSpec, workload: Workload, num_layers: int, device="cpu",
                 dtype=torch.bfloat16, seed: int = 0, weights_path: str | None = None):
        if model.is_moe:
            raise ValueError(f"model {model.name}: MoE layers are not supported by the executor")
        if workload.tp_degree != 1:
            raise ValueError("one ModelInstance is one GPU's whole layer (tp_degree 1); tensor-parallel "
                             "runs build it and shard it with nfsearch.runtime.tp.apply_tp")
        self.model, self.workload, self.num_layers = model, workload, num_layers
        self.device, self.dtype = torch.device(device), dtype
        H, D = model.hidden_size, model.head_dim
        self.hq, self.hkv, self.d = model.num_heads, model.num_kv_heads, D
        self.q_size, self.kv_size = model.q_size, model.kv_size
        self.inter = model.intermediate_size      # per GPU: runtime.tp.apply_tp shards it
        gen = torch.Generator(device=self.device).manual_seed(seed)   # on the device: fast for big caches

        # ---- weights: random (scaled so activations stay O(1) over layers) or from safetensors
        self.layers = [self._random_layer(gen) for _ in range(num_layers)]
        if weights_path:
            self._load_safetensors(weights_path)

        # ---- the batch: decode requests at their context, then prompts
        T, R, ctx = workload.num_tokens, workload.num_decode, workload.decode_context
        self.num_tokens, self.num_decode, self.context = T, R, ctx
        self.prompts = workload.prompt_ranges()
        pos = torch.zeros(T, dtype=torch.int32)
        if R:
            pos[:R] = ctx - 1
        for s, e in self.prompts:
            pos[s:e] = torch.arange(e - s, dtype=torch.int32)
        slots = torch.full((T,), -1, dtype=torch.int32)
        slots[:R] = torch.arange(R, dtype=torch.int32)
        self.positions = pos.to(self.device)
        self.slot_mapping = slots.to(self.device)
        self.context_lens = torch.full((max(R, 1),), ctx, dtype=torch.int32, device=self.device)[:R]
        max_pos = max([ctx] + [e - s for s, e in self.prompts])
        self.cos, self.sin = rope_cos_sin(max_pos, D, ROPE_THETA, device=self.device)
        # KV caches, one per layer: [R, ctx, Hkv, D], random history (the new token is written at ctx-1)
        self.kv_cache = [(self._randn(gen, (R, ctx, self.hkv, D)), self._randn(gen, (R, ctx, self.hkv, D)))
                         for _ in range(num_layers)] if R else [(None, None)] * num_layers
        self.x0 = self._randn(gen, (T, H))
        self._prefill_args: dict = {}

    # ------------------------------------------------------------------------------ construction
    def _randn(self, gen, shape, scale=1.0):
        return torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype).mul_(scale)

    def _random_layer(self, gen) -> LayerWeights:
        m = self.model
        H, I = m.hidden_size, m.intermediate_size
        n_qkv = m.q_size + 2 * m.kv_size
        return LayerWeights(
            norm1=1.0 + self._randn(gen, (H,), 0.1),
            wqkv=self._randn(gen, (H, n_qkv), 1.0 / math.sqrt(H)),
            bqkv=self._randn(gen, (n_qkv,), 0.1) if m.has_qkv_bias else None,
            wo=self._randn(gen, (m.q_size, H), 0.5 / math.sqrt(m.q_size)),
            norm2=1.0 + self._randn(gen, (H,), 0.1),
            wug=self._randn(gen, (H, 2 * I), 1.0 / math.sqrt(H)),
            wd=self._randn(gen, (I, H), 0.5 / math.sqrt(I)),
        )

    def _load_safetensors(self, path: str) -> None:
        """HuggingFace LLaMA names (model.layers.{l}.self_attn.q_proj.weight, ...) from a file or folder."""
        from safetensors.torch import load_file
        files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
        tensors = {}
        for f in files:
            tensors.update(load_file(str(f)))

        def get(name):
            return tensors[name].to(device=self.device, dtype=self.dtype)

        for l, w in enumerate(self.layers):
            p = f"model.layers.{l}."
            if p + "self_attn.q_proj.weight" not in tensors:
                raise ValueError(f"{path}: no weights for layer {l}")
            w.norm1 = get(p + "input_layernorm.weight")
            w.wqkv = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"], 0).t().contiguous()
            if self.model.has_qkv_bias:
                w.bqkv = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"], 0)
            w.wo = get(p + "self_attn.o_proj.weight").t().contiguous()
            w.norm2 = get(p + "post_attention_layernorm.weight")
            w.wug = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")], 0).t().contiguous()
            w.wd = get(p + "mlp.down_proj.weight").t().contiguous()

    def new_buffers(self, fill: float | None = None) -> list[dict]:
        """Per-layer activation buffers (optionally filled, e.g. NaN to catch unwritten rows)."""
        T, H, I = self.num_tokens, self.model.hidden_size, self.inter
        shapes = {"h1": (T, H), "qkv": (T, self.q_size + 2 * self.kv_size), "q": (T, self.hq, self.d),
                  "k": (T, self.hkv, self.d), "v": (T, self.hkv, self.d), "attn": (T, self.hq, self.d),
                  "mid": (T, H), "h2": (T, H), "ug": (T, 2 * I), "act": (T, I), "out": (T, H)}
        bufs = []
        for l in range(self.num_layers):
            b = {name: torch.empty(shape, device=self.device, dtype=self.dtype) for name, shape in shapes.items()}
            if fill is not None:
                for t in b.values():
                    t.fill_(fill)
            b["x"] = self.x0 if l == 0 else bufs[l - 1]["out"]
            bufs.append(b)
        return bufs

    # ------------------------------------------------------------------------------ ops
    def run(self, bufs: list[dict], layer: int, op: str, a: int, b: int, impl: str, num_sms: int) -> None:
        """Nano-op `op` of `layer` over token range [a, b) (decode_attn: requests [a, b))."""
        getattr(self, "op_" + op)(bufs[layer], self.layers[layer], layer, a, b, impl, num_sms)

    def op_norm1(self, buf, w, layer, a, b, impl, n):
        IMPLS["norm1"][impl](buf["x"][a:b], w.norm1, buf["h1"][a:b], n, eps=EPS)

    def op_kqv(self, buf, w, layer, a, b, impl, n):
        bias = None if w.bqkv is None else w.bqkv.expand(b - a, w.bqkv.shape[0])
        IMPLS["kqv"][impl](buf["h1"][a:b], w.wqkv, buf["qkv"][a:b], n, residual=bias)

    def op_rope_append(self, buf, w, layer, a, b, impl, n):
        kc, vc = self.kv_cache[layer]
        if kc is None:          # no decode requests: a scratch cache that no slot addresses
            kc = vc = buf["k"][:1].unsqueeze(1)
        slots = self.slot_mapping[a:b]
        if impl == "torch":
            # only decode rows append: the torch impl is told none does (it cannot tell without a host
            # sync, and would gather and rewrite cache entries for every row), and the decode rows of
            # [a, b) append here, one index_put per cache
            slots = None
        IMPLS["rope_append"][impl](buf["qkv"][a:b], self.positions[a:b], self.cos, self.sin, buf["q"][a:b], kc, vc,
                                   slots, n, k_out=buf["k"][a:b], v_out=buf["v"][a:b])
        e = min(b, self.num_decode)
        if impl == "torch" and a < e:
            append_kv_torch(kc, vc, buf["k"][a:e], buf["v"][a:e], self.slot_mapping[a:e].long(),
                            self.positions[a:e].long())

    def op_decode_attn(self, buf, w, layer, a, b, impl, n):
        kc, vc = self.kv_cache[layer]
        # every request's context is the cache length: the torch impl needs no mask (see the docstring)
        lens = None if impl == "torch" else self.context_lens[a:b]
        kw = {"max_context": self.context} if impl == "triton" else {}
        IMPLS["decode_attn"][impl](buf["q"][a:b], kc[a:b], vc[a:b], lens, buf["attn"][a:b], n, **kw)

    def op_prefill_attn(self, buf, w, layer, a, b, impl, n):
        """Causal attention of prompt tokens [a, b). A nano-op that starts inside a prompt runs over that
        prompt's prefix from its start (the kernels take no query offset) into a scratch buffer, and
        keeps rows [a, b); nano-ops that start on a prompt boundary write in place."""
        lo, cu_dev, cu_cpu, table, scratch = self._prefill_setup(layer, a, b)
        out = buf["attn"][lo:b] if scratch is None else scratch
        q, k, v = buf["q"][lo:b], buf["k"][lo:b], buf["v"][lo:b]
        if impl == "torch":
            IMPLS["prefill_attn"]["torch"](q, k, v, cu_cpu, out, n)
        elif impl == "triton":
            IMPLS["prefill_attn"]["triton"](q, k, v, cu_dev, out, n, block_table_cache=table)
        else:
            IMPLS["prefill_attn"][impl](q, k, v, cu_dev, out, n)
        if scratch is not None:
            buf["attn"][a:b].copy_(scratch[a - lo:])

    def op_o(self, buf, w, layer, a, b, impl, n):
        IMPLS["o"][impl](buf["attn"][a:b].view(b - a, self.q_size), w.wo, buf["mid"][a:b], n,
                         residual=buf["x"][a:b])

    def op_norm2(self, buf, w, layer, a, b, impl, n):
        IMPLS["norm2"][impl](buf["mid"][a:b], w.norm2, buf["h2"][a:b], n, eps=EPS)

    def op_ug(self, buf, w, layer, a, b, impl, n):
        IMPLS["ug"][impl](buf["h2"][a:b], w.wug, buf["ug"][a:b], n)

    def op_act(self, buf, w, layer, a, b, impl, n):
        IMPLS["act"][impl](buf["ug"][a:b], buf["act"][a:b], n)

    def op_d(self, buf, w, layer, a, b, impl, n):
        IMPLS["d"][impl](buf["act"][a:b], w.wd, buf["out"][a:b], n, residual=buf["mid"][a:b])

    # ------------------------------------------------------------------------------ helpers
    def prepare(self, launches) -> None:
        """Build, before any capture, the per-nano-op prefill arguments the launches will need."""
        for l in launches:
            if l.op == "prefill_attn":
                self._prefill_setup(l.layer, *l.tokens)

    def _prefill_setup(self, layer, a, b):
        key = (layer, a, b)
        if key not in self._prefill_args:
            lo = next((s for s, e in self.prompts if s <= a < e), a)
            bounds = [lo] + [s for s, e in self.prompts if lo < s < b] + [b]
            cu_cpu = torch.tensor([x - lo for x in bounds], dtype=torch.int32)
            cu_dev = cu_cpu.to(self.device)
            table = None
            if self.device.type == "cuda":
                table = block_table(cu_dev, b - lo, BLOCK_M)
            scratch = None if lo == a else torch.empty((b - lo, self.hq, self.d), device=self.device,
                                                       dtype=self.dtype)
            self._prefill_args[key] = (lo, cu_dev, cu_cpu, table, scratch)
        return self._prefill_args[key]


def rel_error(out: torch.Tensor, want: torch.Tensor) -> float:
    """||out - want|| / ||want|| in float64; inf when out has NaN/inf."""
    o, w = out.double(), want.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - w).norm() / w.norm().clamp_min(1e-30))
