"""FP8 e4m3 quantizers: weights per output channel (or per tensor), activations per token on the device.

Format: torch.float8_e4m3fn (4 exponent bits, 3 mantissa bits, no infinities, largest finite 448). A
value x with scale s is stored as q = saturate(x / s) and read back as q * s. Scales are float32 and
chosen from the absolute maximum (amax / 448), so the largest entry maps to 448 and nothing overflows;
saturate() clamps to +-448 anyway, because a static scale (a checkpoint's) can see larger values and
the cast of an out-of-range float to e4m3fn gives NaN on some paths.

Relative rounding error of one value: at most 2^-4 (3 mantissa bits, round to nearest) for normal fp8
values (|q| >= 2^-6); values far below the row's amax fall into fp8's subnormals and lose more.

Layouts follow torch._scaled_mm: the activation [M, K] row-major with scale [M, 1]; the weight is
mat2 = [K, N] column-major, i.e. stored [N, K] row-major (HuggingFace's Linear layout) and passed as
`.t()`, with scale [1, N]. Per-token quantization is a few device ops with shapes fixed by the input
(no host sync), so a forward that uses it can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)        # 448
# amax floor: an all-zero row (padding) gets a tiny scale instead of a division by zero
MIN_AMAX = 1e-12
SCHEMES = ("channel", "tensor")


@dataclass
class Fp8Weight:
    """A GEMM weight W [K, N] (x @ W) in e4m3: W ~= data.t() * scale."""
    data: torch.Tensor               # [N, K] float8_e4m3fn, contiguous: data.t() is mat2 for _scaled_mm
    scale: torch.Tensor              # [1, N] float32 (a per-tensor scale is stored expanded to N columns)
    scheme: str = "channel"          # how the scale was chosen: "channel" (per output column) or "tensor"

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N): the shape of the bf16 weight it stands for."""
        return (self.data.shape[1], self.data.shape[0])

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def mat2(self) -> torch.Tensor:
        """[K, N] column-major view: the second operand of torch._scaled_mm."""
        return self.data.t()

    @property
    def num_bytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """[K, N] in `dtype` (computed in float32)."""
        return (self.data.t().float() * self.scale).to(dtype)


def saturate(x: torch.Tensor) -> torch.Tensor:
    """x clamped to e4m3's finite range, in place (x is a float32 temporary)."""
    return x.clamp_(-FP8_MAX, FP8_MAX)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """saturate(x / scale) in e4m3; `scale` broadcasts against x (float32)."""
    return saturate(x.float() / scale).to(FP8_DTYPE)


def scale_of(amax: torch.Tensor) -> torch.Tensor:
    """float32 scale that maps amax to 448: an IEEE-rounded division on every device (a Python-number
    divisor would be a multiplication by its rounded reciprocal on a GPU; the kernels divide)."""
    amax = amax.float().clamp_min(MIN_AMAX)
    return amax / amax.new_full((), FP8_MAX)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row) dynamic quantization of x [M, K]: (q [M, K] e4m3, scale [M, 1] float32).
    All on x's device, no host sync (one amax reduction, one scaled cast)."""
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = scale_of(amax)
    return to_fp8(x, scale), scale


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor quantization: (q e4m3 of x's shape, scale [] float32)."""
    scale = scale_of(x.detach().abs().amax())
    return to_fp8(x, scale), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """q * scale in `dtype` (computed in float32); scale broadcasts against q."""
    return (q.float() * scale).to(dtype)


def quantize_weight(w: torch.Tensor, scheme: str = "channel") -> Fp8Weight:
    """W [K, N] (the engine's x @ W layout) -> Fp8Weight, one scale per output column N ("channel")
    or one for the whole matrix ("tensor")."""
    return quantize_weight_nk(w.t(), scheme)


def quantize_weight_nk(w_nk: torch.Tensor, scheme: str = "channel") -> Fp8Weight:
    """W stored [N, K] (HuggingFace's Linear.weight) -> Fp8Weight."""
    if scheme not in SCHEMES:
        raise ValueError(f"fp8 weight scheme must be one of {SCHEMES}, not {scheme!r}")
    w_nk = w_nk.detach()
    if scheme == "channel":
        amax = torch.linalg.vector_norm(w_nk, float("inf"), dim=1, keepdim=True, dtype=torch.float32)  # [N, 1]
    else:
        amax = w_nk.abs().amax().float().expand(w_nk.shape[0], 1)
    scale = scale_of(amax)                                                                         # [N, 1]
    data = to_fp8(w_nk, scale).contiguous()
    return Fp8Weight(data, scale.t().contiguous(), scheme)


def fp8_weight_from_checkpoint(data_nk: torch.Tensor, scale: torch.Tensor) -> Fp8Weight:
    """A checkpoint's e4m3 weight [N, K] with its per-tensor ([] or [1]) or per-channel ([N] or [N, 1])
    float scale, kept exactly (no requantization)."""
    N = data_nk.shape[0]
    scale = scale.float().reshape(-1)
    if scale.numel() == 1:
        return Fp8Weight(data_nk.contiguous(), scale.expand(N).reshape(1, N).contiguous(), "tensor")
    if scale.numel() != N:
        raise ValueError(f"weight scale of {scale.numel()} values for a weight of {N} output channels")
    return Fp8Weight(data_nk.contiguous(), scale.reshape(1, N).contiguous(), "channel")


def concat_out(weights: list[Fp8Weight]) -> Fp8Weight:
    """Weights of one input fused along the output dimension (q|k|v, gate|up): data and scales
    concatenated, exact (each column keeps its own scale)."""
    schemes = {w.scheme for w in weights}
    return Fp8Weight(torch.cat([w.data for w in weights]).contiguous(),
                     torch.cat([w.scale for w in weights], dim=1).contiguous(),
                     schemes.pop() if len(schemes) == 1 else "channel")


def quantize_layer(w):
    """runtime.model.LayerWeights with its four GEMM weights quantized per channel (norms, bias kept);
    a layer already in FP8 is returned as it is."""
    return _replace_gemms(w, torch.Tensor, quantize_weight)


def dequantize_layer(w, dtype):
    """runtime.model.LayerWeights with its FP8 GEMM weights dequantized to `dtype` (a GPU without FP8
    tensor cores runs an FP8 checkpoint this way)."""
    return _replace_gemms(w, Fp8Weight, lambda f: f.dequantize(dtype))


def _replace_gemms(w, kind: type, fn):
    """w with fn(weight) for each of its GEMM weights that is a `kind`; every other field kept."""
    return replace(w, **{name: fn(getattr(w, name)) for name in GEMM_WEIGHTS if isinstance(getattr(w, name), kind)})


GEMM_WEIGHTS = ("wqkv", "wo", "wug", "wd")
