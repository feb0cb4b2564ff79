"""Token sampling on the device, with no host sync and shapes fixed by the batch's bucket.

Greedy where temperature == 0; elsewhere the logits are divided by the temperature, filtered to the
top k (k > 0) and to the smallest prefix of the sorted distribution whose mass reaches top_p, and
a token is drawn by Gumbel-max: argmax(logit + g) with g = -log(-log(u)) is a draw from the
softmax. u comes from a counter-based hash of (seed, step, token id), so the draw for a request's
step-th token depends on nothing else (not on the batch it ran in, not on the GPU's RNG state): a
run repeats, and async and sync schedules give the same tokens.

The hash works on 32-bit values held in int64 tensors, every product kept below 2^63 (int64
overflow is not something to lean on in torch kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
_MUL_A, _MUL_B = 0x7FEB352D, 0x846CA68B      # a well-mixing 32-bit multiply-xorshift finaliser
_GOLDEN = 0x9E3779B9


@dataclass
class SamplingTensors:
    """Per logit row, on the device."""
    temperature: torch.Tensor        # [N] float32; 0: greedy
    top_p: torch.Tensor              # [N] float32; 1: no top-p filter
    top_k: torch.Tensor              # [N] int32; 0: no top-k filter
    seed: torch.Tensor               # [N] int32 (a request's seed folded to 32 bits)
    step: torch.Tensor               # [N] int32: which output token of its request this row draws


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32): the product in two 16-bit halves, each below 2^48."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective mix of 32-bit values (int64 tensor in [0, 2^32))."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL_A)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL_B)
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """u in (0, 1), float32, [N, V'] for the token ids [N, V'] of rows with seed/step [N]."""
    key = hash32(hash32(seed.long() & _MASK32) ^ (step.long() & _MASK32))           # [N]
    bits = hash32(key[:, None] ^ _mul32(token_ids.long() & _MASK32, _GOLDEN))      # [N, V']
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))                          # 24 bits: exact in fp32


def sample(logits: torch.Tensor, params: SamplingTensors, is_all_greedy: bool = False) -> torch.Tensor:
    """logits [N, V] float32 -> token ids [N] int64. `is_all_greedy` (known on the host from the
    requests' settings) skips the sort and the noise."""
    greedy = logits.argmax(dim=-1)
    if is_all_greedy:
        return greedy
    V = logits.shape[1]
    temperature = torch.where(params.temperature > 0, params.temperature, 1.0)
    vals, ids = (logits / temperature[:, None]).sort(dim=-1, descending=True)          # [N, V]
    rank = torch.arange(V, device=logits.device)[None, :]
    top_k = params.top_k.long()
    vals = vals.masked_fill((top_k[:, None] > 0) & (rank >= top_k[:, None]), float("-inf"))
    probs = vals.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs                # mass of the better tokens
    # top_p >= 1 filters nothing (the cumulative sum may round past 1 before the tail)
    cut = (mass_before >= params.top_p[:, None]) & (rank > 0) & (params.top_p < 1)[:, None]
    vals = vals.masked_fill(cut, float("-inf"))
    u = uniform_noise(params.seed, params.step, ids)
    choice = (vals - (-u.log()).log()).argmax(dim=-1, keepdim=True)
    drawn = ids.gather(-1, choice).squeeze(-1)
    return torch.where(params.temperature > 0, drawn, greedy)


def fold_seed(seed: int) -> int:
    """A request's seed (any int) as the int32 the device hash takes: high and low words xored."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    v = (s ^ (s >> 32)) & _MASK32
    return v - (1 << 32) if v >= (1 << 31) else v
