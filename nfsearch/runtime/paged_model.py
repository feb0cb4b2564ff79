"""The whole model over a paged KV cache: embedding -> layers -> final norm -> LM head -> sampling.

One forward is one iteration of the engine: decode rows [0, B) (one token per running request),
then prefill chunks, all in one dense batch of the bucket's T rows (StepInputs). Every shape comes
from the bucket and every value from the device buffers, so forward() issues no host sync and no
Python branch on device values: the engine captures it once per bucket in a CUDA graph. (With
attn_impl "torch" the attention references read lengths on the host: that path is the CPU path
and the GPU reference, not captured.)

Layer (residual adds fused into the O and D GEMMs, two residual buffers used in turn):
    h    = rmsnorm(x) * norm1;  qkv = h @ wqkv (+ bqkv)
    q, k = rope(qkv at positions);  v          k/v -> cache at slot_mapping   (one fused kernel
                                                                         with the Triton attention)
    attn = decode attention (rows [0, B), page tables, context lens)
           then prefill attention (chunk rows, causal over prefix + chunk)
    mid  = attn @ wo + x;  h = rmsnorm(mid) * norm2;  ug = h @ wug;  act = silu(gate) * up
    x    = act @ wd + mid
With FP8 weights (and fuse_fp8_quant, the default) the four GEMMs take e4m3 activations made by the
op before them (kernels/quant_fp8.py), and the residual adds move into the next RMSNorm:
    qh   = quant(rmsnorm(x (+ mid of the layer before)));  qkv = qh @ wqkv (+ bqkv)
    ...  attention as above ...
    mid  = quant(attn) @ wo;  qh = quant(rmsnorm(mid += x));  ug = qh @ wug
    x    = quant(silu(gate) * up) @ wd      (+ mid: in the next layer's norm, or at the last layer's end)
so each quantization costs no kernel of its own (the attention output's is one pass) and each residual
add is a second input of the norm kernel, not a pass of its own.
One set of activation buffers serves every layer (sized by max_tokens); the KV cache is one
allocation, viewed per layer as k_cache, v_cache [num_pages, page_size, Hkv, D]. With kv_dtype
float8_e4m3fn the cache holds fp8 and a second allocation holds one float32 scale per (token, kv
head) for K and V, viewed per layer as [num_pages, page_size, Hkv] (kernels/paged_attention_torch.py).
"""

from __future__ import annotations

import copy
import math

import torch

from nfsearch.runtime.kernels import IMPLS, quant_fp8, rope_append_torch
from nfsearch.runtime.kernels.paged_attention_torch import new_kv_scales
from nfsearch.runtime.sampling import sample
from nfsearch.runtime.step_inputs import StepBuffers, StepInputs, make_step_inputs  # noqa: F401 (re-exported)
from nfsearch.runtime.weights import ModelWeights
from nfsearch.serving.model_config import ModelConfig

DENSE_OPS = ("norm1", "kqv", "o", "norm2", "ug", "act", "d")
FP8_GEMM_OPS = ("kqv", "o", "ug", "d")


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[D / 2] float64 inverse frequencies, with LLaMA-3.1's scaling when the config has it: wavelengths
    longer than original_len / low_freq_factor slowed by `factor`, shorter than original_len /
    high_freq_factor kept, a linear blend in original_len / wavelength between."""
    D = cfg.spec.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    wavelen = 2 * math.pi / inv
    old_len = rs.original_max_position_embeddings
    blend = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    blend = blend.clamp(0, 1)
    return (1 - blend) * inv / rs.factor + blend * inv


def rope_tables(cfg: ModelConfig, max_pos: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_pos, D / 2] float32 (angles in float64), the rotate-half convention."""
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * rope_inv_freq(cfg)[None, :]
    return ang.cos().float().to(device), ang.sin().float().to(device)


def _attention_ops(attn_impl: str):
    """(decode attention, prefill attention, KV write, fused RoPE + KV write or None: RoPE by torch ops
    into the q, k, v buffers, then the KV write)."""
    from nfsearch.runtime.kernels import paged_attention as pa
    from nfsearch.runtime.kernels.rope_paged import rope_write_kv
    if attn_impl == "torch":
        return pa.paged_decode_attention_torch, pa.paged_prefill_attention_torch, pa.write_kv_torch, None
    if attn_impl == "triton":
        return pa.paged_decode_attention, pa.paged_prefill_attention, pa.write_kv, rope_write_kv
    raise ValueError(f"attn_impl must be 'torch' or 'triton', not {attn_impl!r}")


class PagedModel:
    fuse_fp8_quant = True           # FP8 weights: quantize inside the norm / SiLU kernels (False: in the GEMM)

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, num_pages: int, page_size: int, device="cpu",
                 dtype=torch.bfloat16, attn_impl: str = "torch", *, max_tokens: int = 2048,
                 max_logit_rows: int = 512, op_impls: dict[str, str] | None = None,
                 num_sms: int | None = None, kv_dtype: torch.dtype | None = None):
        m = cfg.spec
        if m.is_moe:
            raise ValueError(f"model {m.name}: MoE layers are not supported by the engine")
        self.cfg, self.w, self.device, self.dtype = cfg, weights, torch.device(device), dtype
        self.num_pages, self.page_size = num_pages, page_size
        self.max_tokens, self.max_logit_rows = max_tokens, max_logit_rows
        self.hq, self.hkv, self.d = m.num_heads, m.num_kv_heads, m.head_dim
        self.scale = self.d ** -0.5
        self.num_sms = num_sms or (torch.cuda.get_device_properties(self.device).multi_processor_count
                                   if self.device.type == "cuda" else 1)
        self.ops = self.dense_ops(op_impls)
        self.decode_attn, self.prefill_attn, self.write_kv, self.rope_write_kv = _attention_ops(attn_impl)
        self.cos, self.sin = rope_tables(cfg, cfg.max_position_embeddings, self.device)

        # KV cache: [layers, 2, pages, page_size, Hkv, D], zeroed (a masked key must not be NaN)
        self.kv_dtype = kv_dtype or dtype
        if self.kv_dtype not in (dtype, torch.float8_e4m3fn):
            raise ValueError(f"kv_dtype must be the model's dtype or torch.float8_e4m3fn, not {self.kv_dtype}")
        self.kv = torch.zeros((m.num_layers, 2, num_pages, page_size, self.hkv, self.d), device=self.device,
                              dtype=self.kv_dtype)
        self.k_caches = [self.kv[i, 0] for i in range(m.num_layers)]
        self.v_caches = [self.kv[i, 1] for i in range(m.num_layers)]
        # fp8: scales [layers, 2, pages, page_size, Hkv] float32 (ones: a zeroed row dequantizes to 0)
        self.kv_scales = (new_kv_scales(num_pages, page_size, self.hkv, lead=(m.num_layers, 2), device=self.device)
                          if self.is_fp8_kv else None)
        self.kv_scale_kwargs = [{} if self.kv_scales is None else
                                {"k_scales": self.kv_scales[i, 0], "v_scales": self.kv_scales[i, 1]}
                                for i in range(m.num_layers)]
        self._alloc_buffers(max_tokens, max_logit_rows)

    def dense_ops(self, op_impls: dict[str, str] | None) -> dict:
        """{op: kernel} for the dense ops ("torch" where op_impls names none); with FP8 weights the
        four GEMMs run the "fp8" impl whatever op_impls says (no other impl reads an Fp8Weight)."""
        impls = {op: "torch" for op in DENSE_OPS} | (op_impls or {})
        if self.w.is_fp8:
            impls |= {op: "fp8" for op in FP8_GEMM_OPS}
        return {op: IMPLS[op][impls[op]] for op in DENSE_OPS}

    def with_ops(self, op_impls: dict[str, str] | None) -> PagedModel:
        """A model sharing this one's weights, KV cache, buffers and sampled ids, running the dense ops
        `op_impls` names (dense_ops)."""
        twin = copy.copy(self)
        twin.ops = self.dense_ops(op_impls)
        return twin

    def _alloc_buffers(self, T: int, L: int) -> None:
        m, dev, dt = self.cfg.spec, self.device, self.dtype
        H, I = m.hidden_size, m.intermediate_size
        shapes = {"x": (T, H), "mid": (T, H), "h": (T, H), "qkv": (T, m.q_size + 2 * m.kv_size),
                  "q": (T, self.hq, self.d), "k": (T, self.hkv, self.d), "v": (T, self.hkv, self.d),
                  "attn": (T, self.hq, self.d), "ug": (T, 2 * I), "act": (T, I),
                  "last": (L, H), "last_norm": (L, H)}
        self.buf = {name: torch.zeros(shape, device=dev, dtype=dt) for name, shape in shapes.items()}
        self.logits_buf = torch.zeros((L, m.vocab_size), device=dev, dtype=torch.float32)
        # the previous forward's sampled ids: the next decode rows read their input ids here (prev_rows)
        self.sampled = torch.zeros(L, device=dev, dtype=torch.int64)
        self._alloc_fp8_buffers(T)

    @property
    def is_fp8_kv(self) -> bool:
        return self.kv_dtype == torch.float8_e4m3fn

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer, fp8 scales included."""
        scale_bytes = 4 if self.is_fp8_kv else 0
        return 2 * self.cfg.spec.num_layers * self.hkv * (self.d * self.kv.element_size() + scale_bytes)

    @property
    def kv_num_bytes(self) -> int:
        """The cache's device bytes: K/V and (fp8) their scales."""
        scales = 0 if self.kv_scales is None else self.kv_scales.numel() * 4
        return self.kv.numel() * self.kv.element_size() + scales

    # ------------------------------------------------------------------------------ forward
    def forward(self, step: StepInputs) -> torch.Tensor:
        """Sampled token ids [L] int64 (a view of the model's buffer, which the next forward reads
        through prev_rows and then overwrites)."""
        logits = self._logits(step)
        L = logits.shape[0]
        self.sampled[:L].copy_(sample(logits, step.sampling, step.is_all_greedy))
        return self.sampled[:L]

    def logits(self, step: StepInputs) -> torch.Tensor:
        """For tests: [num_logit_rows, vocab] float32 (a copy)."""
        return self._logits(step)[:step.num_logit_rows].clone()

    def _logits(self, step: StepInputs) -> torch.Tensor:
        T, L = step.max_tokens, step.logit_rows.shape[0]
        if T > self.max_tokens or L > self.max_logit_rows:
            raise ValueError(f"bucket of {T} tokens / {L} logit rows exceeds the model's buffers "
                             f"({self.max_tokens} / {self.max_logit_rows})")
        x = self._embed(step, T)
        self._layers(x, step, T)
        return self._lm_head(x, step, L)

    def _layers(self, x: torch.Tensor, step: StepInputs, T: int) -> None:
        """Every layer over the T rows of x in place (runtime.engine_overlap overrides it)."""
        for i, w in enumerate(self.w.layers):
            self._layer(i, w, x, step, T)

    def _lm_head(self, x: torch.Tensor, step: StepInputs, L: int) -> torch.Tensor:
        rows = step.logit_rows.long()
        last, last_norm = self.buf["last"][:L], self.buf["last_norm"][:L]
        torch.index_select(x, 0, rows, out=last)
        self.ops["norm2"](last, self.w.final_norm, last_norm, self.num_sms, eps=self.cfg.rms_norm_eps)
        logits = self.logits_buf[:L]
        logits.copy_(torch.matmul(last_norm, self.w.lm_head))
        return logits

    def _embed(self, step: StepInputs, T: int) -> torch.Tensor:
        prev = step.prev_rows.long()
        ids = torch.where(prev >= 0, self.sampled[prev.clamp_min(0)], step.input_ids.long())
        ids = ids.clamp_(0, self.cfg.spec.vocab_size - 1)      # padding ids stay in range
        x = self.buf["x"][:T]
        torch.index_select(self.w.embed, 0, ids, out=x)
        return x

    def _layer(self, i: int, w, x: torch.Tensor, step: StepInputs, T: int) -> None:
        b = {k: t[:T] for k, t in self.buf.items()}
        ops, n, eps = self.ops, self.num_sms, self.cfg.rms_norm_eps
        if self.is_fp8_fused:
            self._fp8_qkv(i, w, x, b, T)
        else:
            ops["norm1"](x, w.norm1, b["h"], n, eps=eps)
            bias = None if w.bqkv is None else w.bqkv.expand(T, w.bqkv.shape[0])
            ops["kqv"](b["h"], w.wqkv, b["qkv"], n, residual=bias)
        self.rope_and_write_kv(i, b, step, 0, T, n)
        kc, vc, kv_scales = self.k_caches[i], self.v_caches[i], self.kv_scale_kwargs[i]
        B = step.max_decode
        if B:
            self.decode_attn(b["q"][:B], kc, vc, step.page_tables[:B], step.context_lens, b["attn"][:B],
                             self.scale, num_sms=n, **kv_scales)
        if step.chunk_lens.shape[0]:
            self.prefill_attn(b["q"], kc, vc, step.page_tables[B:], step.chunk_starts, step.chunk_lens,
                              step.prefix_lens, b["attn"], self.scale, num_sms=n, **kv_scales)
        if self.is_fp8_fused:
            self._fp8_mlp(i, w, x, b, T)
            return
        ops["o"](b["attn"].view(T, -1), w.wo, b["mid"], n, residual=x)
        ops["norm2"](b["mid"], w.norm2, b["h"], n, eps=eps)
        ops["ug"](b["h"], w.wug, b["ug"], n)
        ops["act"](b["ug"], b["act"], n)
        ops["d"](b["act"], w.wd, x, n, residual=b["mid"])

    def rope_and_write_kv(self, i: int, b: dict, step: StepInputs, a: int, e: int, num_sms: int) -> None:
        """Rows [a, e): q = rope(qkv) into b["q"], rope(k) and v into layer i's cache at slot_mapping. The
        Triton attention path runs one fused kernel (kernels/rope_paged.py: no k, v buffers written);
        the torch path rotates into b["q"], b["k"], b["v"] by torch ops, then writes the cache."""
        kc, vc, kv_scales = self.k_caches[i], self.v_caches[i], self.kv_scale_kwargs[i]
        qkv, positions, slots = b["qkv"][a:e], step.positions[a:e], step.slot_mapping[a:e]
        if self.rope_write_kv is not None:
            self.rope_write_kv(qkv, positions, self.cos, self.sin, b["q"][a:e], kc, vc, slots, num_sms,
                               **kv_scales)
            return
        rope_append_torch(qkv, positions, self.cos, self.sin, b["q"][a:e], None, None, None,
                          k_out=b["k"][a:e], v_out=b["v"][a:e])
        self.write_kv(b["k"][a:e], b["v"][a:e], kc, vc, slots, **kv_scales)

    # ------------------------------------------------------------------------------ FP8 dense ops
    @property
    def is_fp8_fused(self) -> bool:
        """FP8 weights with the quantization fused into the ops before each GEMM."""
        return self.fuse_fp8_quant and self.w.is_fp8

    def _alloc_fp8_buffers(self, T: int) -> None:
        """FP8 weights: one e4m3 buffer for whichever activation the next GEMM reads (each is consumed
        before the next is made), flat so that every [T, K] view of it is contiguous, and its per-token
        scales [T, 1]."""
        if not self.w.is_fp8:
            self.fp8_buf = self.fp8_scales = None
            return
        m = self.cfg.spec
        width = max(m.hidden_size, self.hq * self.d, m.intermediate_size)
        self.fp8_buf = torch.zeros(T * width, device=self.device, dtype=torch.float8_e4m3fn)
        self.fp8_scales = torch.ones((T, 1), device=self.device, dtype=torch.float32)

    def _fp8_out(self, T: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(e4m3 [T, K], scales [T, 1]): static views for a quantized activation."""
        return self.fp8_buf[:T * K].view(T, K), self.fp8_scales[:T]

    def _fp8_qkv(self, i: int, w, x: torch.Tensor, b: dict, T: int) -> None:
        """qkv = quant(rmsnorm(x)) @ wqkv (+ bqkv). Past layer 0, x holds the last layer's D GEMM output
        and mid its residual: the norm kernel adds them and writes the sum back to x."""
        n, eps, H = self.num_sms, self.cfg.rms_norm_eps, x.shape[1]
        res = {} if i == 0 else {"residual": b["mid"], "residual_out": x}
        a = quant_fp8.rmsnorm_quant(x, w.norm1, *self._fp8_out(T, H), n, eps, **res)
        bias = None if w.bqkv is None else w.bqkv.expand(T, w.bqkv.shape[0])
        self.ops["kqv"](a, w.wqkv, b["qkv"], n, residual=bias)

    def _fp8_mlp(self, i: int, w, x: torch.Tensor, b: dict, T: int) -> None:
        """O GEMM, norm2, up/gate GEMM, SiLU, D GEMM with e4m3 activations; leaves x = the D GEMM output,
        whose residual (mid) the next layer's norm adds (the last layer adds it here)."""
        ops, n, eps = self.ops, self.num_sms, self.cfg.rms_norm_eps
        attn = b["attn"].view(T, -1)
        ops["o"](quant_fp8.quantize_rows_into(attn, *self._fp8_out(T, attn.shape[1]), n), w.wo, b["mid"], n)
        a = quant_fp8.rmsnorm_quant(b["mid"], w.norm2, *self._fp8_out(T, x.shape[1]), n, eps, residual=x,
                                    residual_out=b["mid"])
        ops["ug"](a, w.wug, b["ug"], n)
        ops["d"](quant_fp8.silu_mul_quant(b["ug"], *self._fp8_out(T, b["act"].shape[1]), n), w.wd, x, n)
        if i == len(self.w.layers) - 1:
            x.add_(b["mid"])
