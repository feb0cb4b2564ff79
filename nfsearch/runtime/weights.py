"""A whole model's weights for the engine: from a HuggingFace folder of safetensors, or random.

Layouts are those of runtime.model (GEMM weights stored [in, out], so every GEMM is `x @ w`):
q/k/v fused into wqkv [H, Q + 2KV], gate/up into wug [H, 2I]. Checkpoint tensors are read one at a
time onto the target device and fused there, so the peak is one layer beyond the model.

FP8 (runtime.fp8): the four GEMM weights of a layer may be runtime.fp8.Fp8Weight (e4m3, per-channel
scales): from an FP8 checkpoint (runtime.fp8_checkpoint reads its format), or quantized as each
layer is made (quantization="fp8"). The embedding, norms and LM head stay in `dtype`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nfsearch.errors import NfsearchError
from nfsearch.files import shown
from nfsearch.runtime import fp8
from nfsearch.runtime import fp8_checkpoint as fp8_ckpt
from nfsearch.runtime.model import LayerWeights
from nfsearch.serving.model_config import ModelConfig

RANDOM_STD = 0.02        # HuggingFace's initializer_range: activations stay O(1) over many layers


@dataclass
class ModelWeights:
    embed: torch.Tensor              # [V, H]
    layers: list[LayerWeights]
    final_norm: torch.Tensor         # [H]
    lm_head: torch.Tensor            # [H, V]; a transposed view of embed when tied
    fp8_source: str | None = None    # FP8 layers: where they came from (a checkpoint's format, or quantized)

    @property
    def num_bytes(self) -> int:
        tensors = [self.embed, self.final_norm]
        if self.lm_head.data_ptr() != self.embed.data_ptr():
            tensors.append(self.lm_head)
        for w in self.layers:
            tensors += [t for t in (w.norm1, w.wqkv, w.bqkv, w.wo, w.norm2, w.wug, w.wd) if t is not None]
        return sum(t.num_bytes if isinstance(t, fp8.Fp8Weight) else t.numel() * t.element_size() for t in tensors)

    @property
    def is_fp8(self) -> bool:
        """The GEMM weights are e4m3 (the model runs the "fp8" GEMM impl)."""
        return bool(self.layers) and isinstance(self.layers[0].wqkv, fp8.Fp8Weight)

    def quantize_(self) -> None:
        """Quantize the GEMM weights in place, per output channel, a layer at a time (each bf16 layer is
        freed as its FP8 copy is made)."""
        for i, w in enumerate(self.layers):
            self.layers[i] = fp8.quantize_layer(w)
        if self.fp8_source is None:
            self.fp8_source = "quantized on load"

    def dequantize_(self, dtype) -> None:
        """The FP8 GEMM weights back to `dtype` in place, a layer at a time; fp8_source says so."""
        for i, w in enumerate(self.layers):
            self.layers[i] = fp8.dequantize_layer(w, dtype)
        self.fp8_source = f"{self.fp8_source}, dequantized to {str(dtype).removeprefix('torch.')} on load"


def load_weights(cfg: ModelConfig, folder: str | Path | None = None, device="cpu", dtype=torch.bfloat16,
                 seed: int = 0, layer_fn=None, quantization: str | None = None) -> ModelWeights:
    """From `folder`'s *.safetensors (HuggingFace LLaMA/Mistral/Qwen2 names), or random from `seed`.
    layer_fn(index, LayerWeights) -> LayerWeights is applied to each layer as soon as it exists (a
    tensor-parallel rank keeps its shard: the peak is the shards plus one full layer).
    quantization "fp8": the GEMM weights quantized per channel as each layer is made. An FP8
    checkpoint's GEMM weights are FP8 whatever `quantization` says."""
    if quantization not in (None, "fp8"):
        raise NfsearchError(f"quantization {quantization!r}: use fp8 or none")
    if folder is not None and layer_fn is not None and fp8_ckpt.checkpoint_format(Path(folder)) is not None:
        raise NfsearchError(f"{shown(folder)}: FP8 checkpoints are not sharded across tensor-parallel ranks yet "
                            "(quantize a bf16 checkpoint on load instead: --quantization fp8)")
    keep = layer_fn
    if quantization == "fp8":
        keep = lambda i, w: fp8.quantize_layer(layer_fn(i, w) if layer_fn else w)
    if folder is None:
        weights = random_weights(cfg, device, dtype, seed, keep)
    else:
        weights = _Checkpoint(Path(folder), torch.device(device), dtype).weights(cfg, keep)
    if quantization == "fp8" and weights.fp8_source is None:
        weights.fp8_source = "quantized on load"
    return weights


def random_weights(cfg: ModelConfig, device="cpu", dtype=torch.bfloat16, seed: int = 0,
                   layer_fn=None) -> ModelWeights:
    """Normal(0, 0.02) matrices and unit norms, drawn on the device (fast for 8B), same for a seed."""
    m, device = cfg.spec, torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    H, I, n_qkv = m.hidden_size, m.intermediate_size, m.q_size + 2 * m.kv_size

    def normal(*shape):
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, RANDOM_STD, generator=gen)

    def ones():
        return torch.ones(H, device=device, dtype=dtype)

    keep = layer_fn or (lambda i, w: w)
    layers = [keep(i, LayerWeights(norm1=ones(), wqkv=normal(H, n_qkv),
                                   bqkv=normal(n_qkv) if m.has_qkv_bias else None, wo=normal(m.q_size, H),
                                   norm2=ones(), wug=normal(H, 2 * I), wd=normal(I, H)))
              for i in range(m.num_layers)]
    embed = normal(m.vocab_size, H)
    lm_head = embed.t() if cfg.tie_word_embeddings else normal(H, m.vocab_size)
    return ModelWeights(embed=embed, layers=layers, final_norm=ones(), lm_head=lm_head)


class _Checkpoint:
    """A folder's safetensors files: tensor name -> file, read on demand."""

    def __init__(self, folder: Path, device: torch.device, dtype):
        from safetensors import safe_open
        self.folder, self.device, self.dtype, self._open = folder, device, dtype, safe_open
        if not folder.is_dir():
            raise NfsearchError(f"{shown(folder)}: not a folder (expected a HuggingFace model folder)")
        self.where = {}                  # tensor name -> file
        index = folder / "model.safetensors.index.json"
        files = sorted(folder.glob("*.safetensors"))
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self.where = {name: folder / f for name, f in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                raise NfsearchError(f"{shown(index)}: malformed (expected a JSON object with a "
                                    "weight_map)") from None
        else:
            for f in files:
                for name in self._keys(f):
                    self.where[name] = f
        if not self.where:
            raise NfsearchError(f"{shown(folder)}: no *.safetensors weights")

    def _keys(self, path: Path) -> list[str]:
        try:
            with self._open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for a bad file
            raise NfsearchError(f"{shown(path)}: not a readable safetensors file "
                                f"({shown(exc, 80)})") from None

    def raw(self, name: str, shape: tuple[int, ...] | None = None, is_optional: bool = False):
        """The tensor as stored, on the device (None when optional and missing)."""
        path = self.where.get(name)
        if path is None:
            if is_optional:
                return None
            raise NfsearchError(f"{shown(self.folder)}: the checkpoint has no tensor {name}")
        try:
            with self._open(str(path), framework="pt") as f:
                t = f.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - as in _keys
            raise NfsearchError(f"{shown(path)}: cannot read tensor {name} ({shown(exc, 80)})") from None
        if shape is not None and tuple(t.shape) != shape:
            raise NfsearchError(f"{shown(self.folder)}: tensor {name} has shape {tuple(t.shape)}, "
                                f"config.json implies {shape}")
        return t.to(device=self.device)

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.raw(name, shape)
        if t.dtype == fp8.FP8_DTYPE:          # an FP8 checkpoint's quantized non-GEMM tensor (an LM head)
            base = name.removesuffix(".weight")
            scale = self.raw(base + ".weight_scale", None, True)
            t = fp8_ckpt.dequantize_tensor(t, scale if scale is not None else
                                           self.raw(base + ".weight_scale_inv", None, True))
        return t.to(dtype=self.dtype)

    def linear(self, name: str, shape_nk: tuple[int, int]):
        """An FP8 checkpoint's Linear as an Fp8Weight [N, K] (stored layout)."""
        return fp8_ckpt.read_linear(self.raw, name, shape_nk, self.fp8_format)

    def weights(self, cfg: ModelConfig, layer_fn=None) -> ModelWeights:
        self.fp8_format = fp8_ckpt.checkpoint_format(self.folder)
        m = cfg.spec
        H, I, Q, KV, V = m.hidden_size, m.intermediate_size, m.q_size, m.kv_size, m.vocab_size
        layers = []
        for i in range(m.num_layers):
            if self.fp8_format is not None:
                layers.append(self._fp8_layer(cfg, i))
                if layer_fn is not None:
                    layers[-1] = layer_fn(i, layers[-1])
                continue
            p = f"model.layers.{i}."
            q, k, v = (self.get(p + f"self_attn.{n}_proj.weight", (size, H))
                       for n, size in (("q", Q), ("k", KV), ("v", KV)))
            bqkv = None
            if m.has_qkv_bias:
                bqkv = torch.cat([self.get(p + f"self_attn.{n}_proj.bias", (size,))
                                  for n, size in (("q", Q), ("k", KV), ("v", KV))])
            gate, up = (self.get(p + f"mlp.{n}_proj.weight", (I, H)) for n in ("gate", "up"))
            layers.append(LayerWeights(
                norm1=self.get(p + "input_layernorm.weight", (H,)),
                wqkv=torch.cat([q, k, v]).t().contiguous(),
                bqkv=bqkv,
                wo=self.get(p + "self_attn.o_proj.weight", (H, Q)).t().contiguous(),
                norm2=self.get(p + "post_attention_layernorm.weight", (H,)),
                wug=torch.cat([gate, up]).t().contiguous(),
                wd=self.get(p + "mlp.down_proj.weight", (H, I)).t().contiguous()))
            del q, k, v, gate, up
            if layer_fn is not None:
                layers[-1] = layer_fn(i, layers[-1])
        embed = self.get("model.embed_tokens.weight", (V, H))
        if cfg.tie_word_embeddings:
            lm_head = embed.t()
        else:
            lm_head = self.get("lm_head.weight", (V, H)).t().contiguous()
        return ModelWeights(embed=embed, layers=layers, final_norm=self.get("model.norm.weight", (H,)),
                            lm_head=lm_head, fp8_source=self.fp8_format.describe() if self.fp8_format else None)

    def _fp8_layer(self, cfg: ModelConfig, i: int) -> LayerWeights:
        """Layer i of an FP8 checkpoint: q|k|v and gate|up fused along the output (each column keeps
        its scale), norms and biases in the model's dtype."""
        m = cfg.spec
        H, I, Q, KV = m.hidden_size, m.intermediate_size, m.q_size, m.kv_size
        p = f"model.layers.{i}."
        bqkv = None
        if m.has_qkv_bias:
            bqkv = torch.cat([self.get(p + f"self_attn.{n}_proj.bias", (size,))
                              for n, size in (("q", Q), ("k", KV), ("v", KV))])
        return LayerWeights(
            norm1=self.get(p + "input_layernorm.weight", (H,)),
            wqkv=fp8.concat_out([self.linear(p + f"self_attn.{n}_proj", (size, H))
                                 for n, size in (("q", Q), ("k", KV), ("v", KV))]),
            bqkv=bqkv,
            wo=self.linear(p + "self_attn.o_proj", (H, Q)),
            norm2=self.get(p + "post_attention_layernorm.weight", (H,)),
            wug=fp8.concat_out([self.linear(p + f"mlp.{n}_proj", (I, H)) for n in ("gate", "up")]),
            wd=self.linear(p + "mlp.down_proj", (H, I)))
