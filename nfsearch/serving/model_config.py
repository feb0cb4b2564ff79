"""What the engine needs to know about a model beyond its shapes: RoPE, norm eps, tied embeddings,
stop ids. From a HuggingFace folder (config.json + generation_config.json) or a bundled name
(random weights). Torch-free: the scheduler and the CLI read it too.

transformers >= 5 writes RoPE as `rope_parameters` (rope_theta and the scaling together); older
configs and most published checkpoints keep `rope_theta` and `rope_scaling` at the top level. Both
are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from nfsearch.errors import NfsearchError
from nfsearch.files import read_json, shown
from nfsearch.specs import ModelSpec, load_model, model_from_hf_config

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_ARCH_OF_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1's frequency-dependent scaling: long wavelengths slowed by `factor`, short ones kept,
    a smooth blend between (the only rope_scaling type implemented)."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclass(frozen=True)
class ModelConfig:
    spec: ModelSpec                   # shapes (nfsearch.specs)
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_scaling: RopeScaling | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"     # the checkpoint's dtype, as HuggingFace names it
    architecture: str = "LlamaForCausalLM"

    @property
    def max_model_len(self) -> int:
        """The longest context served: attention reads the whole context (no sliding window), which
        equals windowed attention only up to the window."""
        window = self.spec.sliding_window
        return min(self.max_position_embeddings, window) if window else self.max_position_embeddings


# Bundled names that run with random weights: the constants of the published checkpoints.
_BUNDLED = {
    "llama-3-8b": {"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
                       "eos_token_ids": (128001, 128009)},
    "llama-3-70b": {"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
                        "eos_token_ids": (128001, 128009)},
    "llama-2-70b": {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                        "eos_token_ids": (2,)},
    "qwen2-72b": {"rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                      "eos_token_ids": (151643, 151645), "architecture": "Qwen2ForCausalLM"},
}


def load_model_config(ref: str | Path) -> ModelConfig:
    """A HuggingFace folder (or its config.json) or a bundled name (random weights)."""
    path = Path(ref)
    if path.is_dir() or path.name == "config.json":
        return _from_folder(path if path.is_dir() else path.parent)
    if str(ref) in _BUNDLED:
        spec = load_model(str(ref))
        return ModelConfig(spec=spec, torch_dtype="bfloat16", **_BUNDLED[str(ref)])
    raise NfsearchError(f"unknown model '{shown(ref)}' (bundled for the engine: {', '.join(_BUNDLED)}; "
                        "or a HuggingFace folder with config.json)")


def _from_folder(folder: Path) -> ModelConfig:
    where = shown(folder / "config.json")
    if not (folder / "config.json").is_file():
        raise NfsearchError(f"{shown(folder)}: no config.json (expected a HuggingFace model folder)")
    raw = read_json(folder / "config.json")
    if not isinstance(raw, dict):
        raise NfsearchError(f"{where}: expected a JSON object")
    arch = _architecture(raw, where)
    if raw.get("hidden_act", "silu") != "silu":
        raise NfsearchError(f"{where}: hidden_act '{shown(raw.get('hidden_act'))}' is not supported "
                            "(silu only)")
    if raw.get("mlp_bias") or (arch != "Qwen2ForCausalLM" and raw.get("attention_bias")):
        raise NfsearchError(f"{where}: mlp_bias/attention_bias on {arch} is not supported")
    spec = model_from_hf_config(raw, folder.resolve().name, where)
    rope = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    eos = raw.get("eos_token_id")
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen = read_json(gen_path)
        if isinstance(gen, dict) and gen.get("eos_token_id") is not None:
            eos, where_eos = gen["eos_token_id"], shown(gen_path)
        else:
            where_eos = where
    else:
        where_eos = where
    return ModelConfig(
        spec=spec,
        rope_theta=_positive(theta, "rope_theta", where),
        rms_norm_eps=_positive(raw.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
        max_position_embeddings=_count(raw.get("max_position_embeddings", 4096), "max_position_embeddings",
                                       where),
        tie_word_embeddings=_flag(raw.get("tie_word_embeddings", False), "tie_word_embeddings", where),
        rope_scaling=_rope_scaling(scaling, where),
        eos_token_ids=_eos_ids(eos, where_eos),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        architecture=arch)


def _architecture(raw: dict, where: str) -> str:
    archs = raw.get("architectures")
    if isinstance(archs, list) and archs:
        arch = archs[0]
    else:
        arch = _ARCH_OF_TYPE.get(raw.get("model_type"), raw.get("model_type"))
    if arch not in ARCHITECTURES:
        raise NfsearchError(f"{where}: architecture {shown(arch)} is not supported "
                            f"(supported: {', '.join(ARCHITECTURES)})")
    return arch


def _rope_scaling(raw, where: str) -> RopeScaling | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise NfsearchError(f"{where}: rope_scaling must be an object")
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise NfsearchError(f"{where}: rope_scaling type {shown(kind)} is not supported (llama3 only)")
    low = _positive(raw.get("low_freq_factor"), "rope_scaling.low_freq_factor", where)
    high = _positive(raw.get("high_freq_factor"), "rope_scaling.high_freq_factor", where)
    if high <= low:
        raise NfsearchError(f"{where}: rope_scaling.high_freq_factor ({high}) must exceed "
                            f"low_freq_factor ({low})")
    key = "original_max_position_embeddings"
    old_len = _count(raw.get(key), f"rope_scaling.{key}", where)
    return RopeScaling(factor=_positive(raw.get("factor"), "rope_scaling.factor", where),
                       low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=old_len)


def _eos_ids(value, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise NfsearchError(f"{where}: eos_token_id must be a non-negative integer or a list of them "
                                f"(got {shown(repr(value), 40)})")
    return tuple(ids)


def _positive(value, key: str, where: str) -> float:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value <= 0:
        raise NfsearchError(f"{where}: {key} must be a positive number (got {shown(repr(value), 40)})")
    return float(value)


def _count(value, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 2**40:
        raise NfsearchError(f"{where}: {key} must be a positive integer (got {shown(repr(value), 40)})")
    return value


def _flag(value, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise NfsearchError(f"{where}: {key} must be true or false (got {shown(repr(value), 40)})")
    return value
