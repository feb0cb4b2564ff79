"""A tiny FP8 PagedModel run for tests/test_quant_fp8.py and its interpreter child: two prompts
prefilled in chunks, then a step of decode rows (input ids from the sampled ids) beside a new chunk."""

from dataclasses import dataclass

import torch

PAGE_SIZE = 4


@dataclass(frozen=True)
class Bucket:
    max_tokens: int = 24
    max_decode: int = 4
    max_segments: int = 2
    max_context: int = 64


def tiny_weights(config: str, dtype, is_fp8: bool, seed: int = 3, device="cpu"):
    """Random weights with O(1) activations (the 0.02 init gives vanishing ones), FP8 if asked."""
    from nfsearch.runtime.weights import load_weights
    from nfsearch.serving.model_config import load_model_config
    cfg = load_model_config(config)
    w = load_weights(cfg, None, device=device, dtype=dtype, seed=seed)
    for layer in w.layers:
        for name in ("wqkv", "wo", "wug", "wd"):
            t = getattr(layer, name)
            t.mul_(50 / t.shape[0] ** 0.5)
        layer.norm2.add_(torch.linspace(-0.5, 0.5, layer.norm2.shape[0], dtype=dtype, device=device))
    if is_fp8:
        w.quantize_()
    return cfg, w


def tiny_model(config: str, dtype, is_fp8: bool = True, is_fused: bool = True, device="cpu"):
    from nfsearch.runtime.paged_model import PagedModel
    cfg, w = tiny_weights(config, dtype, is_fp8, device=device)
    model = PagedModel(cfg, w, num_pages=16, page_size=PAGE_SIZE, device=device, dtype=dtype,
                       attn_impl="triton" if str(device).startswith("cuda") else "torch",
                       max_tokens=Bucket.max_tokens, max_logit_rows=Bucket.max_decode + Bucket.max_segments)
    model.fuse_fp8_quant = is_fused
    return model


def steps(device="cpu"):
    """The two steps' StepInputs: two prompts in chunks; then decode rows reading the sampled ids
    beside a third prompt."""
    from nfsearch.runtime.paged_model import make_step_inputs
    b = Bucket()
    prefill = make_step_inputs(b, PAGE_SIZE, device, input_ids=list(range(3, 15)),
                               positions=list(range(7)) + list(range(5)),
                               slot_mapping=list(range(7)) + list(range(16, 21)), chunk_starts=[0, 7],
                               chunk_lens=[7, 5], prefix_lens=[0, 0], page_tables=[[0, 1], [4, 5]],
                               logit_rows=[6, 11])
    mixed = make_step_inputs(b, PAGE_SIZE, device, input_ids=[-1, -1, 0, 0] + [40, 41, 42],
                             prev_rows=[0, 1, -1, -1, -1, -1, -1], positions=[7, 5, 0, 0, 0, 1, 2],
                             slot_mapping=[7, 21, -1, -1, 32, 33, 34], context_lens=[8, 6, 0, 0],
                             page_tables=[[0, 1], [4, 5], [], [], [8]], chunk_starts=[4], chunk_lens=[3],
                             prefix_lens=[0], logit_rows=[0, 1, 6])
    return prefill, mixed


def run_steps(model, num_steps: int = 2) -> torch.Tensor:
    """Logits [rows, vocab] float32 of the first num_steps (1 or 2) steps, concatenated."""
    prefill, mixed = steps(model.device)
    first = model.logits(prefill)
    if num_steps == 1:
        return first
    model.forward(prefill)              # the sampled ids the decode rows read
    return torch.cat([first, model.logits(mixed)])


def fp8_tiny_logits(config: str, dtype, is_fused: bool, num_steps: int = 2) -> torch.Tensor:
    return run_steps(tiny_model(config, dtype, True, is_fused), num_steps)
