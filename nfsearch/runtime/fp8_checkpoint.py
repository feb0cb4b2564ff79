"""FP8 checkpoints people already have: what config.json's quantization_config says, and one Linear read
as an Fp8Weight.

Formats read (public docs of compressed-tensors, AutoFP8 and transformers' quantizers):
* "compressed-tensors", format "float-quantized" or "naive-quantized" (RedHatAI / neuralmagic "-FP8"
  models): config_groups whose weights are 8-bit floats, strategy "tensor" or "channel" (also "block"
  with a block_structure); `<linear>.weight` float8_e4m3fn [N, K], `<linear>.weight_scale` [] / [1]
  (tensor) or [N, 1] (channel), optional `<linear>.input_scale` (static activations); modules in
  "ignore" (the LM head) are stored unquantized.
* "fp8": AutoFP8 (`weight_scale` per tensor, activation_scheme "static" with `input_scale`, or
  "dynamic") and transformers' FineGrainedFP8 (weight_block_size [bn, bk]: `weight_scale_inv`
  [ceil(N / bn), ceil(K / bk)], the factor that dequantizes each block).
* "fbgemm_fp8": `weight_scale` [N, 1] per channel, activations dynamic per row.

What the engine runs is always W8A8 with per-channel weight scales and dynamic per-token activation
scales (runtime.fp8). Per-tensor and per-channel weights are kept exactly (a per-tensor scale becomes
the same scale on every column); block-wise weights are dequantized and requantized per channel (one
more rounding). Static input scales are not used: activations get their per-token scale on the fly,
which is never coarser than the checkpoint's one scale per tensor. Format.describe() says which applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nfsearch.errors import NfsearchError
from nfsearch.files import shown
from nfsearch.runtime import fp8


@dataclass(frozen=True)
class Fp8Format:
    quant_method: str                       # "compressed-tensors" | "fp8" | "fbgemm_fp8"
    weight_strategy: str                    # "tensor" | "channel" | "block"
    activations: str                        # "dynamic" | "static" | "none" (weight-only checkpoint)
    block_size: tuple[int, int] | None = None

    def describe(self) -> str:
        how = {"tensor": "per-tensor weight scales kept", "channel": "per-channel weight scales kept",
               "block": f"{self.block_size[0]}x{self.block_size[1]} block scales requantized per channel"
               if self.block_size else "block scales requantized per channel"}[self.weight_strategy]
        act = {"dynamic": "dynamic activations", "static": "static input scales replaced by dynamic per-token",
               "none": "weight-only checkpoint run with dynamic per-token activations"}[self.activations]
        return f"FP8 checkpoint ({self.quant_method}: {how}; {act})"


def checkpoint_format(folder: Path) -> Fp8Format | None:
    """The folder's FP8 format from config.json's quantization_config; None when it has none.
    NfsearchError (one line) for a quantization this engine does not read."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None                       # model_config reports an unreadable config.json
    qc = config.get("quantization_config") or config.get("compression_config")
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "compressed-tensors":
        return _compressed_tensors(qc, path)
    if method == "fp8":
        block = qc.get("weight_block_size")
        act = "static" if qc.get("activation_scheme") == "static" else "dynamic"
        if block:
            return Fp8Format("fp8", "block", act, (int(block[0]), int(block[1])))
        return Fp8Format("fp8", "tensor", act)
    if method == "fbgemm_fp8":
        return Fp8Format("fbgemm_fp8", "channel", "dynamic")
    raise NfsearchError(f"{shown(path)}: quantization {method!r} is not supported (FP8 checkpoints: "
                        "compressed-tensors float-quantized, fp8, fbgemm_fp8)")


def _compressed_tensors(qc: dict, path: Path) -> Fp8Format:
    groups = list((qc.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    if not groups or any(w.get("num_bits") != 8 or w.get("type") != "float" for w in weights):
        raise NfsearchError(f"{shown(path)}: compressed-tensors checkpoint whose weights are not 8-bit floats "
                            f"(format {qc.get('format')!r}); only FP8 (float-quantized) is supported")
    strategies = {w.get("strategy", "tensor") for w in weights}
    if len(strategies) != 1 or not strategies <= {"tensor", "channel", "block"}:
        raise NfsearchError(f"{shown(path)}: FP8 weight strategy {sorted(strategies)} is not supported "
                            "(tensor, channel or block)")
    strategy = strategies.pop()
    block = None
    if strategy == "block":
        structure = weights[0].get("block_structure") or [128, 128]
        block = (int(structure[0]), int(structure[1]))
    acts = [g.get("input_activations") for g in groups]
    kind = "none" if all(a is None for a in acts) else (
        "dynamic" if all(a is None or a.get("dynamic") for a in acts) else "static")
    return Fp8Format("compressed-tensors", strategy, kind, block)


def read_linear(read, name: str, shape_nk: tuple[int, int], fmt: Fp8Format) -> fp8.Fp8Weight:
    """`name` (e.g. model.layers.0.self_attn.q_proj) as an Fp8Weight. read(tensor_name, shape or None,
    is_optional) -> the raw tensor (None when optional and missing). A Linear the checkpoint left
    unquantized is quantized per channel here."""
    w = read(name + ".weight", shape_nk, False)
    if w.dtype != fp8.FP8_DTYPE:
        return fp8.quantize_weight_nk(w.float())
    if fmt.weight_strategy == "block":
        scale = read(name + ".weight_scale_inv", None, True)
        if scale is None:
            scale = read(name + ".weight_scale", None, False)
        return fp8.quantize_weight_nk(dequantize_blocks(w, scale, fmt.block_size))
    scale = read(name + ".weight_scale", None, False)
    try:
        return fp8.fp8_weight_from_checkpoint(w, scale)
    except ValueError as exc:
        raise NfsearchError(f"tensor {name}.weight_scale: {exc}") from None


def dequantize_blocks(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """[N, K] float32 from e4m3 blocks: block (i, j) of bn x bk entries times scale[i, j]."""
    N, K = w.shape
    if block is None:                     # infer the block from the scale grid
        block = (-(-N // scale.shape[0]), -(-K // scale.shape[1]))
    bn, bk = block
    if tuple(scale.shape) != (-(-N // bn), -(-K // bk)):
        raise NfsearchError(f"block scale of shape {tuple(scale.shape)} for a weight {N}x{K} in "
                            f"{bn}x{bk} blocks")
    full = scale.float().repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
    return w.float() * full


def dequantize_tensor(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A non-GEMM tensor stored in e4m3 (a quantized LM head) back to float32 with its scale."""
    if scale is None:
        return w.float()
    if scale.dim() == 2 and scale.shape[1] > 1 and scale.shape != w.shape:
        return dequantize_blocks(w, scale, None)
    return w.float() * scale.float().reshape(-1, 1) if scale.numel() > 1 else w.float() * scale.float()
