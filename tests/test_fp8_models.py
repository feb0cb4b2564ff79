"""FP8 on whole models (CPU): FP8 checkpoints in the HuggingFace formats people have, written here with
safetensors from small random transformers models, and the accuracy of FP8 GEMMs against float32 on
the transformers-equivalence checkpoints of test_engine_model.

What a random-weight model can and cannot show. These models have random weights scaled for O(1)
activations and logits (test_engine_model._randomize). Their logits over the 128-token vocabulary are
spread, not peaked like a trained model's: the top two logits are often close, so a small
perturbation flips the argmax and top-1 agreement is a weak, noisy signal (it can look bad when the
error is small, and it says nothing about confident predictions). The KL divergence of the FP8
distribution from the float32 one, averaged over every teacher-forced row, measures the whole
distribution's error and is the measure here. What the test does show: the FP8 path (per-channel
weight scales, per-token activation scales, saturation, the fused q|k|v and gate|up scales, the
residual and bias adds, GQA, RoPE variants) stays close to float32 through 3 layers and >= 32
decode/prefill steps, with an error of the size e4m3 rounding predicts. What it cannot show: a real
model's accuracy. Trained weights have outlier channels and activations with heavy-tailed rows that
per-token and per-channel scales treat differently from Gaussian ones, and 32 or 80 layers compound
the error; a real model's FP8 quality needs a real checkpoint and an evaluation set (perplexity or a
benchmark), which this repository does not have offline.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_engine_model import BUCKET, PAGE_SIZE, Driver, _requests, llama, llama31, qwen2  # noqa: F401 (the transformers-equivalence checkpoints, as fixtures)

from nfsearch.errors import NfsearchError
from nfsearch.runtime import fp8
from nfsearch.runtime.paged_model import PagedModel
from nfsearch.runtime.weights import load_weights
from nfsearch.serving.model_config import load_model_config

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
BLOCK = (48, 48)                     # does not divide 64 or 96: the ragged last block is exercised
# accuracy thresholds over the 89 teacher-forced logit rows of each model, about 2x from what FP8 gave
# here (mean KL 2.7e-3 / 2.8e-3 / 5.3e-3 nats, top-1 agreement 0.88 / 0.91 / 0.99 for llama / llama31 /
# qwen2; llama with its GEMM weights rounded to bf16 instead: mean KL 5.6e-6, top-1 1.0)
MAX_MEAN_KL = 1e-2
MIN_TOP1 = 0.80


@pytest.fixture(scope="module")
def hf_llama(llama):  # noqa: F811 (the imported fixture, by pytest's naming)
    return llama


def _block_quantize(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """FineGrainedFP8's layout: e4m3 [N, K] and weight_scale_inv [ceil(N/bn), ceil(K/bk)]."""
    N, K = w.shape
    bn, bk = block
    rows, cols = -(-N // bn), -(-K // bk)
    scale = torch.zeros(rows, cols)
    for i in range(rows):
        for j in range(cols):
            scale[i, j] = fp8.scale_of(w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().amax())
    full = scale.repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
    return fp8.to_fp8(w, full), scale


def write_fp8_checkpoint(model, src, dst, kind: str):
    """An FP8 checkpoint of `model` in format `kind`: ct-channel / ct-tensor (compressed-tensors
    float-quantized, static input scales), fp8-block (transformers FineGrainedFP8), fbgemm."""
    tensors = {}
    for name, p in model.state_dict().items():
        base = name.removesuffix(".weight")
        if not any(base.endswith(x) for x in LINEARS):
            tensors[name] = p.detach().clone().contiguous()
            continue
        w = p.detach().float()
        if kind in ("ct-channel", "fbgemm"):
            q = fp8.quantize_weight_nk(w, "channel")
            tensors[name], tensors[base + ".weight_scale"] = q.data, q.scale.t().contiguous()     # [N, 1]
        elif kind == "ct-tensor":
            q = fp8.quantize_weight_nk(w, "tensor")
            tensors[name], tensors[base + ".weight_scale"] = q.data, q.scale[0, :1].clone()      # [1]
        else:
            tensors[name], tensors[base + ".weight_scale_inv"] = _block_quantize(w, BLOCK)
        if kind.startswith("ct-"):
            tensors[base + ".input_scale"] = torch.tensor([0.05])
    dst.mkdir()
    safetensors_torch.save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = _quant_config(kind)
    (dst / "config.json").write_text(json.dumps(config))
    if (src / "generation_config.json").exists():
        shutil.copy(src / "generation_config.json", dst)
    return dst


def _quant_config(kind: str) -> dict:
    if kind == "fp8-block":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
    if kind == "fbgemm":
        return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}
    strategy = kind.removeprefix("ct-")
    scheme = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme | {"strategy": strategy},
                                          "input_activations": scheme | {"strategy": "tensor"}}}}


def _model(cfg, weights):
    return PagedModel(cfg, weights, num_pages=48, page_size=PAGE_SIZE, device="cpu", dtype=torch.float32,
                      max_tokens=BUCKET.max_tokens, max_logit_rows=BUCKET.max_decode + BUCKET.max_segments)


def _teacher_forced(model) -> torch.Tensor:
    """Every logit row of the test_engine_model driver's run (>= 32 iterations), [rows, V]."""
    reqs, driver, rows = _requests(), Driver(model), []
    for it in range(200):
        if all(r.num_cached == len(r.ids) for r in reqs):
            break
        rows.append(driver.step(reqs, it)[1])
    assert it >= 32
    return torch.cat(rows)


def _hf_weight(model, layer: int, linear: str) -> torch.Tensor:
    return dict(model.named_parameters())[f"model.layers.{layer}.{linear}.weight"].detach().float()


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("kind", ["ct-channel", "fbgemm"])
def test_per_channel_checkpoint_equals_quantize_on_load(hf_llama, tmp_path, kind):
    model, src = hf_llama
    folder = write_fp8_checkpoint(model, src, tmp_path / kind, kind)
    cfg = load_model_config(folder)
    loaded = load_weights(cfg, folder, dtype=torch.float32)
    assert loaded.is_fp8 and "per-channel weight scales kept" in loaded.fp8_source
    assert loaded.lm_head.dtype == torch.float32 and not isinstance(loaded.lm_head, fp8.Fp8Weight)
    ours = load_weights(cfg, src, dtype=torch.float32, quantization="fp8")
    for a, b in zip(loaded.layers, ours.layers, strict=True):
        for name in fp8.GEMM_WEIGHTS:
            assert torch.equal(getattr(a, name).data.float(), getattr(b, name).data.float())
            assert torch.equal(getattr(a, name).scale, getattr(b, name).scale)
    assert torch.equal(_teacher_forced(_model(cfg, loaded)), _teacher_forced(_model(cfg, ours)))


def test_per_tensor_checkpoint_keeps_its_scales(hf_llama, tmp_path):
    model, src = hf_llama
    folder = write_fp8_checkpoint(model, src, tmp_path / "ct", "ct-tensor")
    loaded = load_weights(load_model_config(folder), folder, dtype=torch.float32)
    assert "per-tensor weight scales kept" in loaded.fp8_source and "static input scales" in loaded.fp8_source
    w = loaded.layers[1]
    want = torch.cat([fp8.quantize_weight_nk(_hf_weight(model, 1, f"self_attn.{n}_proj"), "tensor").dequantize()
                      for n in "qkv"], dim=1)
    assert torch.equal(w.wqkv.dequantize(), want)
    scales = w.wqkv.scale[0]                  # three per-tensor scales, each over its own columns
    assert len(set(scales[:64].tolist())) == 1 and len(set(scales.tolist())) == 3


def test_block_checkpoint_is_requantized_per_channel(hf_llama, tmp_path):
    model, src = hf_llama
    folder = write_fp8_checkpoint(model, src, tmp_path / "blk", "fp8-block")
    loaded = load_weights(load_model_config(folder), folder, dtype=torch.float32)
    assert "48x48 block scales requantized per channel" in loaded.fp8_source
    wd = _hf_weight(model, 2, "mlp.down_proj").t()                       # [K, N] = [96, 64]
    got = loaded.layers[2].wd.dequantize()
    assert got.shape == wd.shape
    # two roundings (the block's, then the channel's): each <= 2^-4 relative, plus subnormal floors
    assert bool(((got - wd).abs() <= 0.13 * wd.abs() + 2e-3 * wd.abs().max()).all())


def test_unsupported_quantization_is_one_line(hf_llama, tmp_path):
    model, src = hf_llama
    folder = write_fp8_checkpoint(model, src, tmp_path / "x", "ct-channel")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(NfsearchError, match="quantization 'gptq' is not supported"):
        load_weights(load_model_config(folder), folder)
    good = write_fp8_checkpoint(model, src, tmp_path / "y", "ct-channel")
    with pytest.raises(NfsearchError, match="tensor-parallel"):
        load_weights(load_model_config(src), good, layer_fn=lambda i, w: w)


def test_engine_runs_an_fp8_checkpoint(hf_llama, tmp_path):
    from nfsearch.runtime.engine import Engine
    from nfsearch.serving.traces import load_trace
    model, src = hf_llama
    folder = write_fp8_checkpoint(model, src, tmp_path / "e", "ct-channel")
    engine = Engine(str(folder), device="cpu", dtype="fp32", num_pages=32, dense_batch=32, max_decode=8)
    assert engine.quantization == "fp8" and "FP8 checkpoint (compressed-tensors" in engine.describe()
    run = engine.run(load_trace("const:12:5", 3).requests)
    assert [len(s.output_ids) for s in run.sequences] == [5, 5, 5]


A100 = "this NVIDIA A100-SXM4-80GB is compute capability 8.0; FP8 needs 8.9 or newer (Ada, Hopper, Blackwell)"


def test_fp8_needs_compute_capability_8_9():
    from nfsearch.runtime.device import fp8_refusal
    assert fp8_refusal("NVIDIA A100-SXM4-80GB", (8, 0)) == A100
    assert fp8_refusal("NVIDIA L40S", (8, 9)) is None and fp8_refusal("NVIDIA H100 80GB HBM3", (9, 0)) is None


@pytest.mark.parametrize("flags, said", [({"quantization": "fp8"}, "--quantization fp8: "),
                                         ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype fp8: "),
                                         ({"quantization": "fp8", "kv_cache_dtype": "fp8"},
                                          "--quantization fp8 and --kv-cache-dtype fp8: ")])
def test_engine_refuses_fp8_where_the_gpu_has_none(hf_llama, monkeypatch, flags, said):
    """Asked-for FP8 on a GPU without FP8 tensor cores is one line before any weight is loaded."""
    from nfsearch.runtime import device, engine
    from nfsearch.runtime.engine import Engine
    monkeypatch.setattr(device, "fp8_support", lambda d: A100)
    monkeypatch.setattr(engine, "load_weights", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(NfsearchError) as err:
        Engine(str(hf_llama[1]), device="cpu", dtype="fp32", num_pages=32, dense_batch=32, max_decode=8, **flags)
    assert str(err.value) == said + A100


def test_an_fp8_checkpoint_runs_dequantized_where_the_gpu_has_no_fp8(hf_llama, tmp_path, monkeypatch):
    """Its GEMMs run in the model's dtype on the dequantized weights (the reports say so), and give the
    same logits as the FP8 weights dequantized by hand."""
    from nfsearch.runtime import device
    from nfsearch.runtime.engine import Engine
    from nfsearch.serving.traces import load_trace
    model, src = hf_llama
    folder = write_fp8_checkpoint(model, src, tmp_path / "d", "ct-channel")
    monkeypatch.setattr(device, "fp8_support", lambda d: A100)
    engine = Engine(str(folder), device="cpu", dtype="fp32", num_pages=32, dense_batch=32, max_decode=8)
    assert engine.quantization is None and not engine.weights.is_fp8 and engine.gemm_numerics == "fp32"
    assert "dequantized to float32 on load" in engine.describe()
    cfg = load_model_config(folder)
    fp8_weights = load_weights(cfg, folder, dtype=torch.float32)
    by_hand = [fp8.dequantize_layer(w, torch.float32) for w in fp8_weights.layers]
    for a, b in zip(engine.weights.layers, by_hand, strict=True):
        for name in fp8.GEMM_WEIGHTS:
            assert torch.equal(getattr(a, name), getattr(b, name))
    run = engine.run(load_trace("const:12:5", 3).requests)
    assert [len(s.output_ids) for s in run.sequences] == [5, 5, 5]


# ------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("which", ["llama", "llama31", "qwen2"])
def test_fp8_logits_against_float32(which, request):
    """FP8 GEMMs (quantized on load) against the same weights in float32 (the transformers-equivalence
    checkpoints: < 1e-3 from transformers' logits), every teacher-forced row of >= 32 iterations."""
    _, folder = request.getfixturevalue(which)
    cfg = load_model_config(folder)
    ref = _teacher_forced(_model(cfg, load_weights(cfg, folder, dtype=torch.float32)))
    got = _teacher_forced(_model(cfg, load_weights(cfg, folder, dtype=torch.float32, quantization="fp8")))
    assert ref.shape == got.shape and ref.shape[0] >= 32
    logp_ref, logp = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1)                      # KL(float32 || fp8) per row
    top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    print(f"{which}: {ref.shape[0]} rows, mean KL {float(kl.mean()):.2e}, max {float(kl.max()):.2e}, "
          f"top-1 agreement {top1:.3f}")
    assert float((got - ref).abs().max()) > 1e-4                           # FP8 really ran
    assert float(kl.mean()) < MAX_MEAN_KL
    assert top1 >= MIN_TOP1
