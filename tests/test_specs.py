"""Model, workload and GPU specs: bundled names, YAML, HuggingFace config.json, flags, errors."""

import json

import pytest

from conftest import FIXTURES
from nfsearch.errors import NfsearchError
from nfsearch.specs import (bundled_names, gpu_by_name, load_gpu, load_model, load_workload,
                            model_from_hf_config, workload_from_flags)

LLAMA_HF = FIXTURES / "hf" / "Meta-Llama-3-8B" / "config.json"
MIXTRAL_HF = FIXTURES / "hf" / "Mixtral-8x7B-v0.1" / "config.json"


@pytest.mark.parametrize("name", bundled_names("models"))
def test_bundled_models_load(name):
    model = load_model(name)
    assert model.name == name
    assert model.num_heads % model.num_kv_heads == 0
    assert model.to_dict()["hidden_size"] == model.hidden_size


def test_bundled_names_cover_expected_models():
    assert {"llama-3-8b", "llama-3-70b", "llama-2-70b", "mixtral-8x7b"} <= set(bundled_names("models"))


def test_llama3_8b_dims():
    m = load_model("llama-3-8b")
    assert (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size, m.num_layers) == \
        (4096, 32, 8, 128, 14336, 32)
    assert not m.is_moe and m.q_size == 4096 and m.kv_size == 1024


def test_model_from_yaml():
    m = load_model(str(FIXTURES / "tiny-model.yaml"))
    assert (m.name, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim) == ("tiny", 256, 4, 2, 64)
    assert m.num_experts == 0


def test_hf_llama_config():
    m = load_model(str(LLAMA_HF))
    assert m.name == "Meta-Llama-3-8B"
    assert (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size, m.num_layers,
            m.vocab_size) == (4096, 32, 8, 128, 14336, 32, 128256)
    assert not m.is_moe and not m.has_qkv_bias
    # same dims as the bundled spec
    bundled = load_model("llama-3-8b")
    assert {k: v for k, v in m.to_dict().items() if k != "name"} == \
        {k: v for k, v in bundled.to_dict().items() if k != "name"}


def test_hf_mixtral_config():
    m = load_model(str(MIXTRAL_HF))
    assert m.name == "Mixtral-8x7B-v0.1"
    assert m.is_moe and (m.num_experts, m.num_experts_per_token) == (8, 2)
    assert (m.hidden_size, m.num_heads, m.num_kv_heads, m.intermediate_size, m.vocab_size) == \
        (4096, 32, 8, 14336, 32000)


def test_hf_config_name_or_path_and_head_dim():
    cfg = json.loads(LLAMA_HF.read_text())
    cfg.update({"_name_or_path": "org/custom", "head_dim": 256, "num_attention_heads": 16})
    m = model_from_hf_config(cfg, "dir")
    assert m.name == "org/custom" and m.head_dim == 256
    cfg.update({"head_dim": None})
    assert model_from_hf_config(cfg, "dir").head_dim == 4096 // 16


def test_hf_config_unsupported_and_missing_field():
    cfg = json.loads(LLAMA_HF.read_text())
    with pytest.raises(NfsearchError, match="model_type 'gpt2'"):
        model_from_hf_config({**cfg, "model_type": "gpt2"}, "x")
    del cfg["intermediate_size"]
    with pytest.raises(NfsearchError, match="intermediate_size"):
        model_from_hf_config(cfg, "x")
    with pytest.raises(NfsearchError, match="bad value"):
        model_from_hf_config({**json.loads(LLAMA_HF.read_text()), "hidden_size": "wide"}, "x")


@pytest.mark.parametrize("loader,ref", [(load_model, "gpt-17"), (load_workload, "W9"), (load_gpu, "tpu-v9")])
def test_unknown_names_are_named(loader, ref):
    with pytest.raises(NfsearchError, match=ref):
        loader(ref)


def test_missing_files():
    with pytest.raises(NfsearchError, match="no such file"):
        load_model("/nonexistent/model.yaml")
    with pytest.raises(NfsearchError, match="no such file"):
        load_model("/nonexistent/config.json")
    with pytest.raises(NfsearchError, match="no such file"):
        load_workload("/nonexistent/w.yaml")


def test_malformed_yaml_and_json():
    with pytest.raises(NfsearchError, match="malformed YAML"):
        load_model(str(FIXTURES / "malformed.yaml"))
    with pytest.raises(NfsearchError, match="malformed YAML"):
        load_workload(str(FIXTURES / "malformed.yaml"))
    with pytest.raises(NfsearchError, match="malformed JSON"):
        load_model(str(FIXTURES / "malformed.json"))


@pytest.mark.parametrize("text,match", [
    ("- a\n- b\n", "mapping"),
    ("name: x\nhidden_size: 4096\n", "missing"),
    ("name: x\nhidden_size: 4096\nnum_heads: 32\nnum_kv_heads: 8\nhead_dim: 128\nintermediate_size: 1\n"
     "num_layers: 1\nvocab_size: 1\nbogus: 3\n", "unknown field"),
    ("name: x\nhidden_size: 0\nnum_heads: 32\nnum_kv_heads: 8\nhead_dim: 128\nintermediate_size: 1\n"
     "num_layers: 1\nvocab_size: 1\n", "hidden_size must be positive"),
    ("name: x\nhidden_size: 64\nnum_heads: 32\nnum_kv_heads: 5\nhead_dim: 128\nintermediate_size: 1\n"
     "num_layers: 1\nvocab_size: 1\n", "multiple"),
    ("name: x\nhidden_size: wide\nnum_heads: 32\nnum_kv_heads: 8\nhead_dim: 128\nintermediate_size: 1\n"
     "num_layers: 1\nvocab_size: 1\n", "model file"),
])
def test_bad_model_yaml(tmp_path, text, match):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(NfsearchError, match=match):
        load_model(str(path))


@pytest.mark.parametrize("text,match", [
    ("name: w\nnum_decode: -1\ndecode_context: 10\n", "num_decode"),
    ("name: w\nnum_decode: 0\ndecode_context: 10\nprefill_lengths: []\n", "no tokens"),
    ("name: w\nnum_decode: 4\ndecode_context: 10\nprefill_lengths: [0]\n", "positive"),
    ("name: w\nnum_decode: 4\ndecode_context: 10\nprefill_lengths: [abc]\n", "workload file"),
    ("name: w\nnum_decode: 4\ndecode_context: 10\nprefill_lengths: 7\n", "workload file"),
    ("name: w\nnum_decode: 4\ndecode_context: 10\ndtype: int3\n", "dtype"),
    ("name: w\nnum_decode: 4\ndecode_context: 10\ntp_degree: 0\n", "tp_degree"),
    ("name: w\nnum_decode: 4\n", "decode_context"),
])
def test_bad_workload_yaml(tmp_path, text, match):
    path = tmp_path / "w.yaml"
    path.write_text(text)
    with pytest.raises(NfsearchError, match=match):
        load_workload(str(path))


def test_workload_yaml():
    w = load_workload(str(FIXTURES / "tiny-workload.yaml"))
    assert (w.num_decode, w.num_prefill_tokens, w.num_tokens) == (128, 128, 256)
    assert w.prompt_ranges() == [(128, 256)]


def test_workload_from_flags():
    w = workload_from_flags(64, 2048, (100, 28), 2, "fp16")
    assert (w.num_decode, w.decode_context, w.prefill_lengths, w.tp_degree, w.dtype_bytes) == \
        (64, 2048, (100, 28), 2, 2)
    assert w.num_tokens == 192 and w.prompt_ranges() == [(64, 164), (164, 192)]
    assert w.model is None and "d64" in w.name
    with pytest.raises(NfsearchError):
        workload_from_flags(0, 1024, (), 1, "bf16")
    with pytest.raises(NfsearchError, match="dtype"):
        workload_from_flags(4, 1024, (), 1, "fp8")


@pytest.mark.parametrize("wid,tokens,decode,prefill,tp,model", [
    ("W1", 512, 512, 0, 1, "llama-3-8b"),
    ("W2", 2048, 512, 1536, 1, "llama-3-8b"),
    ("W3", 4096, 256, 3840, 1, "llama-3-8b"),
    ("W4", 2048, 1280, 768, 2, "llama-3-70b"),
    ("W5", 2048, 1280, 768, 8, "llama-2-70b"),
])
def test_standard_workloads(wid, tokens, decode, prefill, tp, model):
    w = load_workload(wid)
    assert (w.num_tokens, w.num_decode, w.num_prefill_tokens, w.tp_degree, w.model) == \
        (tokens, decode, prefill, tp, model)
    assert load_workload(wid.lower()) == w
    load_model(w.model)


def test_standard_workload_shapes():
    assert load_workload("W2").prefill_lengths == (512, 512, 512)
    assert load_workload("W3").prefill_lengths == (256,) * 15
    assert load_workload("W1").decode_context == 1024 and load_workload("W3").decode_context == 2048


def test_gpus():
    h100 = load_gpu("h100-sxm")
    assert h100.num_sms == 132 and h100.sm_granularity == 8
    grid = h100.sm_grid()
    assert grid[0] == 8 and grid[-1] == 132 and all(s % 8 == 0 for s in grid[:-1])
    assert gpu_by_name("NVIDIA H100 80GB HBM3") == h100
    assert gpu_by_name("NVIDIA GeForce 256") is None
    for key in ("h200", "a100-sxm"):
        assert load_gpu(key).key == key
