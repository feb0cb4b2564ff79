"""Model, workload and GPU specs: bundled names, YAML, HuggingFace config.json, flags, errors;
and the file readers every input goes through (each bad input is one NfsearchError line)."""

import json
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, TINY_MODEL
from nfsearch import files
from nfsearch.errors import NfsearchError
from nfsearch.graph import build_layer, layer_ops
from nfsearch.roofline import roofline
from nfsearch.specs import (GpuSpec, ModelSpec, Workload, bundled_names, check_fits, gpu_by_name, load_gpu,
                            load_model, load_workload, model_from_hf_config, parse_lengths, spec_from_dict,
                            workload_from_flags)

LLAMA_HF = FIXTURES / "hf" / "Meta-Llama-3-8B" / "config.json"
MIXTRAL_HF = FIXTURES / "hf" / "Mixtral-8x7B-v0.1" / "config.json"
MISTRAL_HF = FIXTURES / "hf" / "Mistral-7B-v0.1" / "config.json"
TINY_YAML = (FIXTURES / "tiny-model.yaml").read_text()


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
    with pytest.raises(NfsearchError, match="hidden_size should be a valid integer"):
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
     "num_layers: 1\nvocab_size: 1\n", "hidden_size should be greater than or equal to 1"),
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
    ("name: w\nnum_decode: 4\ndecode_context: 10\nprefill_lengths: [0]\n", r"prefill_lengths\[0\] should be"),
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


# ---- inputs that must not crash it: one NfsearchError line, quickly ----------------------------------

def _fails(call, match=None, seconds=5.0) -> str:
    """Run `call`, expect an NfsearchError of one printable line within `seconds`; its message."""
    start = time.perf_counter()
    with pytest.raises(NfsearchError) as err:
        call()
    assert time.perf_counter() - start < seconds
    message = str(err.value)
    assert "\n" not in message and message.isprintable() and len(message) < 600, message
    if match:
        assert match in message, message
    return message


def _write(tmp_path, name, content):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("depth", [200, 100_000])
def test_deep_nesting_is_refused(tmp_path, suffix, depth):
    text = '{"a": ' + "[" * depth + "]" * depth + "}"       # JSON is also YAML
    path = _write(tmp_path, "m" + suffix, text)
    message = _fails(lambda: load_model(path))
    # our depth check, or (PyYAML >= 6.0.4) the scanner's own flow-level limit: one line either way
    assert "nested deeper" in message or "flow level" in message, message


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_huge_integer_is_refused(tmp_path, suffix):
    cfg = LLAMA_HF.read_text().replace('"hidden_size": 4096', '"hidden_size": ' + "7" * 5000)
    path = _write(tmp_path, "m" + suffix, cfg)
    _fails(lambda: load_model(path), "bad value")


def test_huge_integer_in_a_field_is_named():
    with pytest.raises(NfsearchError, match="hidden_size should be less than") as err:
        model_from_hf_config({**json.loads(LLAMA_HF.read_text()), "hidden_size": 10**4000}, "x")
    assert "digits" in str(err.value)


@pytest.mark.parametrize("text", ['{"model_type": "llama", "_name_or_path": "bad\\ud800name"}',
                                  '{"model_type": "llama", "x": ["\\udfff"]}'])
def test_lone_surrogates_in_json_are_refused(tmp_path, text):
    path = _write(tmp_path, "s.config.json", text)
    _fails(lambda: load_model(path), "not valid unicode")


def test_unprintable_names_are_refused(tmp_path):
    _fails(lambda: load_model(_write(tmp_path, "m.yaml", TINY_YAML.replace("name: tiny", 'name: "a\\x07b"'))),
           "name must be printable")
    _fails(lambda: load_model(_write(tmp_path, "n.yaml", TINY_YAML.replace("name: tiny", 'name: ""'))),
           "name should have at least 1 character")
    _fails(lambda: ModelSpec("x\ud800", 256, 4, 2, 64, 512, 4, 1000), "name should be a valid string")
    _fails(lambda: load_workload(_write(tmp_path, "w.yaml", "name: 'w\u200b\u0000'\nnum_decode: 1\n"
                                        "decode_context: 1\n")))


@pytest.mark.parametrize("content,match", [
    ("[1, 2]", "top level"), ("7", "top level"), ("", "top level"), ("null", "top level"),
    (b"\xff\xfe\x00garbage\x80", "not UTF-8"), (os.urandom(0) + bytes(range(256)) * 4, "not UTF-8"),
    ("a: 1\na: 2\n", "duplicate key"),
])
def test_bad_yaml_files(tmp_path, content, match):
    path = _write(tmp_path, "m.yaml", content)
    _fails(lambda: load_model(path), match)
    _fails(lambda: load_workload(path), match)


@pytest.mark.parametrize("content,match", [
    ("[1, 2]", "JSON object"), ("NaN", "bad value"), ('{"hidden_size": NaN}', "NaN is not a JSON number"),
    ('{"hidden_size": Infinity}', "bad value"), ('{"hidden_size": 1e400}', "out of range"),
    ('{"a": 1, "a": 2}', "duplicate key"), (b"\x00\x01\x02\xff", "not UTF-8"),
])
def test_bad_json_files(tmp_path, content, match):
    _fails(lambda: load_model(_write(tmp_path, "m.json", content)), match)


def test_directories_devices_and_huge_files_are_refused(tmp_path):
    (tmp_path / "d.yaml").mkdir()
    _fails(lambda: load_model(str(tmp_path / "d.yaml")), "is a directory")
    (tmp_path / "config.json").mkdir()
    _fails(lambda: load_model(str(tmp_path / "config.json")), "is a directory")
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:                     # sparse: no disk used
        f.truncate(files.MAX_INPUT_BYTES + 1)
    _fails(lambda: load_model(str(big)), "larger than 64 MiB")
    if hasattr(os, "mkfifo"):                      # opening a FIFO would block forever
        os.mkfifo(tmp_path / "fifo.yaml")
        _fails(lambda: load_workload(str(tmp_path / "fifo.yaml")), "not a regular file")


def test_yaml_aliases_are_walked_once(tmp_path):
    lines = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = _write(tmp_path, "laughs.yaml", "\n".join(lines) + "\n")
    _fails(lambda: load_model(path), "unknown field a0", seconds=2.0)


# ---- models -------------------------------------------------------------------------------------

def _model_yaml(tmp_path, **changes):
    lines = [ln for ln in TINY_YAML.splitlines() if ln and not ln.startswith("#")]
    data = dict(ln.split(": ", 1) for ln in lines)
    data.update({k: v for k, v in changes.items() if v is not None})
    for k in [k for k, v in changes.items() if v is None]:
        del data[k]
    return _write(tmp_path, "m.yaml", "".join(f"{k}: {v}\n" for k, v in data.items()))


@pytest.mark.parametrize("changes,match", [
    ({"num_heads": "0"}, "num_heads should be greater than or equal to 1"),
    ({"hidden_size": "1.0e+400"}, "hidden_size should be a valid integer (got inf)"),
    ({"hidden_size": "1e400"}, "hidden_size should be a valid integer (got '1e400')"),
    ({"hidden_size": ".inf"}, "hidden_size should be a valid integer"),
    ({"hidden_size": ".nan"}, "hidden_size should be a valid integer"),
    ({"hidden_size": "1.5"}, "hidden_size should be a valid integer (got 1.5)"),
    ({"hidden_size": "256.0"}, "hidden_size should be a valid integer"),
    ({"hidden_size": "true"}, "hidden_size should be a valid integer (got True)"),
    ({"hidden_size": "'256'"}, "hidden_size should be a valid integer (got '256')"),
    ({"hidden_size": "-256"}, "hidden_size should be greater than or equal to 1"),
    ({"hidden_size": str(2**21)}, "hidden_size should be less than or equal to 1048576"),
    ({"num_layers": str(10**9)}, "num_layers should be less than or equal to 10000"),
    ({"num_heads": "8192", "num_kv_heads": "8192"}, "num_heads should be less than or equal to 4096"),
    ({"num_kv_heads": "3"}, "num_heads (4) must be a multiple of num_kv_heads (3)"),
    ({"num_experts": "4"}, "need 1 <= num_experts_per_token (0) <= num_experts (4)"),
    ({"num_experts_per_token": "2"}, "num_experts_per_token is set but num_experts is 0"),
    ({"has_qkv_bias": "1"}, "has_qkv_bias should be a valid boolean"),
    ({"name": "[a, b]"}, "name should be a valid string"),
    ({"vocab_size": None}, "missing field vocab_size"),
    ({"rope_theta": "10000"}, "unknown field rope_theta"),
])
def test_bad_model_values_are_one_line(tmp_path, changes, match):
    path = _model_yaml(tmp_path, **changes)
    message = _fails(lambda: load_model(path), match)
    assert message.startswith(f"model file {path}: ")


def test_direct_construction_is_checked_too():
    _fails(lambda: ModelSpec("x", True, 4, 2, 64, 512, 4, 1000), "hidden_size should be a valid integer")
    _fails(lambda: ModelSpec("x", 256, 4, 2, 64, 512, 4.0, 1000), "num_layers should be a valid integer")
    _fails(lambda: ModelSpec("x", 256, 0, 2, 64, 512, 4, 1000), "model x: num_heads")
    _fails(lambda: Workload("w", 4, 10, "512"), "prefill_lengths should be a valid tuple")
    assert Workload("w", 4, 10, [5, 6]).prefill_lengths == (5, 6)          # a list is taken as a tuple
    _fails(lambda: GpuSpec("g", "G", 132, 8, float("inf"), 1.0, 1.0), "peak_tflops should be a finite number")


def _hf(**changes):
    cfg = json.loads(LLAMA_HF.read_text())
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("changes,match", [
    ({"num_attention_heads": 0}, "num_attention_heads should be greater than or equal to 1"),
    ({"hidden_size": 4096.7}, "hidden_size should be a valid integer (got 4096.7)"),
    ({"hidden_size": 4096.0}, "hidden_size should be a valid integer"),
    ({"hidden_size": True}, "hidden_size should be a valid integer"),
    ({"hidden_size": "4096"}, "hidden_size should be a valid integer"),
    ({"num_hidden_layers": -1}, "num_hidden_layers should be greater than or equal to 1"),
    ({"num_attention_heads": 33}, "hidden_size 4096 is not a multiple of num_attention_heads 33"),
    ({"num_key_value_heads": 7}, "num_heads (32) must be a multiple of num_kv_heads (7)"),
    ({"_name_or_path": 5}, "_name_or_path should be a valid string"),
    ({"_name_or_path": "a\nb"}, "_name_or_path (or the file's name) must be printable"),
    ({"model_type": ["llama"]}, "model_type '['llama']' is not supported"),
    ({"attention_bias": "yes"}, "attention_bias should be a valid boolean"),
])
def test_bad_hf_values(changes, match):
    _fails(lambda: model_from_hf_config(_hf(**changes), "x"), match)


def test_hf_config_names(tmp_path, monkeypatch):
    text = LLAMA_HF.read_text()
    (tmp_path / "My-Model").mkdir()
    assert load_model(_write(tmp_path / "My-Model", "config.json", text)).name == "My-Model"
    # a flat foo.config.json is named foo, never after its folder
    assert load_model(_write(tmp_path / "My-Model", "foo.config.json", text)).name == "foo"
    assert load_model(_write(tmp_path, "bar.json", text)).name == "bar"
    # ./config.json: the path names no folder, so the model is named after its family
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "config.json", text)
    assert load_model("config.json").name == "llama"
    assert load_model("./config.json").name == "llama"
    assert load_model(_write(tmp_path, "x.json", json.dumps(_hf(_name_or_path="org/m")))).name == "org/m"


def test_sliding_window_is_read_and_refused_past_the_window():
    mistral = load_model(str(MISTRAL_HF))
    assert mistral.name == "Mistral-7B-v0.1" and mistral.sliding_window == 4096
    assert mistral.to_dict()["sliding_window"] == 4096
    assert "sliding_window" not in load_model("llama-3-8b").to_dict()       # plans of others unchanged
    w2 = load_workload("W2")                                    # context 1024, prompts of 512: inside
    build_layer(mistral, w2)
    long = workload_from_flags(64, 8192, (), 1, "bf16")
    for call in (lambda: build_layer(mistral, long), lambda: roofline(mistral, long, load_gpu("h100-sxm")),
                 lambda: check_fits(mistral, long)):
        _fails(call, "sliding window of 4096 tokens; decode context 8192 is longer")
    assert roofline(mistral, workload_from_flags(64, 4096, (), 1, "bf16"), load_gpu("h100-sxm")).bound_ms > 0
    _fails(lambda: layer_ops(mistral, workload_from_flags(0, 1, (5000,), 1, "bf16")), "a prompt of 5000 tokens")
    # a window as long as the model's context changes nothing; Qwen2 windows only count when used
    assert model_from_hf_config(_hf(model_type="mistral", sliding_window=8192), "m").sliding_window == 0
    assert model_from_hf_config(_hf(model_type="mistral", sliding_window=None), "m").sliding_window == 0
    assert model_from_hf_config(_hf(model_type="qwen2", sliding_window=2048), "q").sliding_window == 0
    assert model_from_hf_config(_hf(model_type="qwen2", sliding_window=2048, use_sliding_window=True),
                                "q").sliding_window == 2048


# ---- workloads ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,match", [
    ("model: 123\n", "model should be a valid string (got 123)"),
    ("prefill_lengths: '512'\n", "prefill_lengths should be a valid tuple (got '512')"),
    ("prefill_lengths: 512\n", "prefill_lengths should be a valid tuple"),
    ("prefill_lengths: {512: 1}\n", "prefill_lengths should be a valid tuple"),
    ("prefill_lengths: [512, true]\n", "prefill_lengths[1] should be a valid integer"),
    ("prefill_lengths: [512.0]\n", "prefill_lengths[0] should be a valid integer"),
    ("prefill_lengths: [-5]\n", "prefill_lengths[0] should be greater than or equal to 1"),
    ("num_decode: -4\n", "num_decode should be greater than or equal to 0"),
    ("num_decode: 1000000000\n", "num_decode should be less than or equal to 1048576"),
    ("decode_context: 1000000000\n", "decode_context should be less than or equal to 4194304"),
    ("num_decode: 1048576\nprefill_lengths: [64]\n", "the batch has 1048640 tokens, more than 1048576"),
    ("tp_degree: 0\n", "tp_degree should be greater than or equal to 1"),
    ("tp_degree: 2.0\n", "tp_degree should be a valid integer"),
    ("dtype: fp8\n", "dtype should be 'bf16', 'fp16' or 'fp32' (got 'fp8')"),
    ("dtype: 16\n", "dtype should be 'bf16', 'fp16' or 'fp32'"),
    ("tokens: 5\n", "unknown field tokens"),
])
def test_bad_workload_values_are_one_line(tmp_path, text, match):
    base = {"name": "w", "num_decode": "4", "decode_context": "64"}
    for line in text.splitlines():
        key, value = line.split(": ", 1)
        base[key] = value
    path = _write(tmp_path, "w.yaml", "".join(f"{k}: {v}\n" for k, v in base.items()))
    message = _fails(lambda: load_workload(path), match)
    assert message.startswith(f"workload file {path}: ")


def test_many_prompts_are_refused_quickly(tmp_path):
    path = _write(tmp_path, "w.yaml", "name: w\nnum_decode: 0\ndecode_context: 0\nprefill_lengths: ["
                  + ", ".join(["1"] * 50_000) + "]\n")
    load_workload(path)                                           # 50k one-token prompts: allowed
    _fails(lambda: workload_from_flags(0, 1, (1,) * (2**20 + 1), 1, "bf16"), "--prefill should have at most")


@pytest.mark.parametrize("tp,match", [(3, "32 attention heads are not divisible by TP=3"),
                                      (16, "8 key/value heads are not divisible by TP=16")])
def test_tp_must_divide_heads(tp, match):
    model, w = load_model("llama-3-8b"), workload_from_flags(64, 1024, (), tp, "bf16")
    for call in (lambda: check_fits(model, w), lambda: build_layer(model, w),
                 lambda: roofline(model, w, load_gpu("h100-sxm"))):
        _fails(call, match)
    build_layer(model, workload_from_flags(64, 1024, (), 8, "bf16"))


def test_flag_errors_name_the_flag():
    _fails(lambda: workload_from_flags(-1, 1024, (), 1, "bf16"), "--decode should be greater than or equal to 0")
    _fails(lambda: workload_from_flags(4, 2**30, (), 1, "bf16"), "--context should be less than")
    _fails(lambda: workload_from_flags(4, 1024, (0,), 1, "bf16"), "--prefill[0] should be greater")
    _fails(lambda: workload_from_flags(4, 1024, (), 0, "bf16"), "--tp should be greater than or equal to 1")
    _fails(lambda: workload_from_flags(4, 1024, (), 1, "int3"), "--dtype should be")
    _fails(lambda: workload_from_flags(4, 1024, "512", 1, "bf16"), "--prefill should be a valid tuple")


@pytest.mark.parametrize("text,lengths", [("", ()), ("  ", ()), ("512", (512,)), ("512, 256 ,1", (512, 256, 1))])
def test_parse_lengths(text, lengths):
    assert parse_lengths(text) == lengths


@pytest.mark.parametrize("text", ["512,,x", "512,", ",512", "x", "1_000", "\u0665", "+5", "-5", "5.0",
                                  "0", "1,0", "123456789", "5 5", "1e3", "\ud800"])
def test_parse_lengths_refuses(text):
    _fails(lambda: parse_lengths(text), "--prefill")


# ---- GPUs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("row,match", [
    ({"bogus": 1}, "unknown field bogus"),
    ({"num_sms": 0}, "num_sms should be greater than or equal to 1"),
    ({"num_sms": 132.0}, "num_sms should be a valid integer"),
    ({"sm_granularity": True}, "sm_granularity should be a valid integer"),
    ({"sm_granularity": 200}, "sm_granularity (200) exceeds num_sms (132)"),
    ({"peak_tflops": float("nan")}, "peak_tflops should be a finite number"),
    ({"mem_bandwidth_tbps": -1.0}, "mem_bandwidth_tbps should be greater than 0"),
    ({"net_bandwidth_gbps": "fast"}, "net_bandwidth_gbps should be a valid number"),
])
def test_bad_gpu_rows_are_one_line(monkeypatch, row, match):
    from nfsearch import specs
    table = {"g": {"name": "G", "num_sms": 132, "sm_granularity": 8, "peak_tflops": 1.0,
                   "mem_bandwidth_tbps": 1.0, "net_bandwidth_gbps": 1.0, **row}, "h": 5}
    monkeypatch.setattr(specs, "_gpu_table", lambda: table)
    assert _fails(lambda: load_gpu("g"), match).startswith("gpu g: ")
    _fails(lambda: load_gpu("h"), "gpu h: expected a mapping")


def test_small_models_still_build():
    assert build_layer(TINY_MODEL, Workload("w", 8, 64, (8,))).number_of_nodes() > 0


def test_sliding_window_models_round_trip_through_plans():
    from nfsearch import plan
    from nfsearch.cost import make_problem
    from nfsearch.roofline import analytic_profile
    from nfsearch.search.baselines import sequential_plan
    mistral, w2 = load_model(str(MISTRAL_HF)), load_workload("W2")
    problem = make_problem(mistral, w2, analytic_profile(mistral, w2, load_gpu("h100-sxm")), num_layers=1)
    back = plan.from_dict(json.loads(plan.to_json(sequential_plan(problem))))
    assert back.model == mistral and back.model.sliding_window == 4096


# ---- fuzz: any value in any field gives a spec or one NfsearchError line ------------------------------

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.sampled_from([0, 1, -1, 2**20, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.sampled_from(["512", "bf16", "\ud800"]),
    st.lists(st.integers(min_value=-5, max_value=5000), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                     max_size=2))


FUZZ_BASES = {"model": load_model("mixtral-8x7b").to_dict(), "workload": load_workload("W2").to_dict(),
              "hf": json.loads(MISTRAL_HF.read_text()),
              "gpu": {k: v for k, v in vars(load_gpu("h100-sxm")).items() if k != "key"}}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["model", "workload", "hf", "gpu"]), key=st.integers(min_value=0, max_value=20),
       value=ODD_VALUES, drop=st.booleans())
def test_fuzz_spec_fields(kind, key, value, drop):
    base = FUZZ_BASES[kind]
    keys = sorted(base) + ["bogus"]
    name = keys[key % len(keys)]
    data = dict(base)
    if drop and name in data:
        del data[name]
    else:
        data[name] = value
    build = {"model": lambda: spec_from_dict(ModelSpec, data, "fuzz"), "workload": lambda: spec_from_dict(Workload, data, "fuzz"),
             "hf": lambda: model_from_hf_config(data, "fuzz"),
             "gpu": lambda: spec_from_dict(GpuSpec, {"key": "g", **data}, "fuzz")}[kind]
    try:
        spec = build()
    except NfsearchError as exc:
        message = str(exc)
        assert "\n" not in message and message.isprintable()
        return
    if isinstance(spec, ModelSpec):
        assert 1 <= spec.num_layers <= 10**4 and spec.num_heads % spec.num_kv_heads == 0
        assert all(type(v) in (int, bool, str) for v in spec.to_dict().values())
    if isinstance(spec, Workload):
        assert 0 < spec.num_tokens <= 2**20 and all(type(n) is int and n > 0 for n in spec.prefill_lengths)
