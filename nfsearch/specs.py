"""Model, workload and GPU specs: frozen dataclasses validated on construction, and their loaders.

A model comes from a bundled name, a YAML file or a HuggingFace config.json; a workload from a
standard id (W1-W5), a YAML file or flags; a GPU from a bundled name.
"""

from dataclasses import dataclass, field, fields, asdict
from importlib import resources
from pathlib import Path

from nfsearch.errors import NfsearchError
from nfsearch.files import read_json, read_yaml

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    num_experts: int = 0
    num_experts_per_token: int = 0
    has_qkv_bias: bool = False

    def __post_init__(self):
        for f in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "num_layers", "vocab_size"):
            _require(getattr(self, f) > 0, f"model {self.name}: {f} must be positive")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"model {self.name}: num_heads must be a multiple of num_kv_heads")
        _require(self.num_experts >= 0 and 0 <= self.num_experts_per_token <= self.num_experts,
                 f"model {self.name}: need 0 <= num_experts_per_token <= num_experts")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    """One dense batch: decode requests (one token each) followed by prefill prompts."""
    name: str
    num_decode: int
    decode_context: int
    prefill_lengths: tuple[int, ...] = ()
    tp_degree: int = 1
    dtype: str = "bf16"
    model: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "prefill_lengths", tuple(int(n) for n in self.prefill_lengths))
        _require(self.num_decode >= 0, f"workload {self.name}: num_decode must be >= 0")
        _require(self.num_decode == 0 or self.decode_context > 0,
                 f"workload {self.name}: decode_context must be positive")
        _require(all(n > 0 for n in self.prefill_lengths),
                 f"workload {self.name}: prompt lengths must be positive")
        _require(self.num_tokens > 0, f"workload {self.name}: the batch has no tokens")
        _require(self.tp_degree >= 1, f"workload {self.name}: tp_degree must be >= 1")
        _require(self.dtype in DTYPE_BYTES,
                 f"workload {self.name}: dtype must be one of {', '.join(DTYPE_BYTES)}")

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_lengths)

    @property
    def num_tokens(self) -> int:
        return self.num_decode + self.num_prefill_tokens

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def prompt_ranges(self) -> list[tuple[int, int]]:
        """Token ranges [start, end) of each prompt in the dense batch (after the decode tokens)."""
        ranges, start = [], self.num_decode
        for n in self.prefill_lengths:
            ranges.append((start, start + n))
            start += n
        return ranges

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_lengths"] = list(self.prefill_lengths)
        return d


@dataclass(frozen=True)
class GpuSpec:
    key: str
    name: str
    num_sms: int
    sm_granularity: int
    peak_tflops: float
    mem_bandwidth_tbps: float
    net_bandwidth_gbps: float
    figures_source: str = "estimate"

    def __post_init__(self):
        _require(self.num_sms > 0 and self.sm_granularity > 0, f"gpu {self.key}: bad SM figures")
        _require(self.peak_tflops > 0 and self.mem_bandwidth_tbps > 0 and self.net_bandwidth_gbps > 0,
                 f"gpu {self.key}: rates must be positive")

    def sm_grid(self) -> list[int]:
        """SM counts a partition can have: multiples of the granularity, and the whole GPU."""
        grid = list(range(self.sm_granularity, self.num_sms, self.sm_granularity))
        return grid + [self.num_sms]


def bundled_names(kind: str) -> list[str]:
    folder = resources.files("nfsearch") / kind
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_model(ref: str) -> ModelSpec:
    """A bundled model name, a YAML path, or a HuggingFace config.json path."""
    path = Path(ref)
    if ref.endswith(".json"):
        return model_from_hf_config(read_json(path), name=path.parent.name or path.stem)
    if ref.endswith((".yaml", ".yml")):
        return _build(ModelSpec, read_yaml(path), f"model file {ref}")
    if ref in bundled_names("models"):
        data = read_yaml(resources.files("nfsearch") / "models" / f"{ref}.yaml")
        return _build(ModelSpec, data, f"model {ref}")
    raise NfsearchError(f"unknown model '{ref}' (bundled: {', '.join(bundled_names('models'))};"
                        " or give a .yaml or HuggingFace config.json path)")


HF_FAMILIES = ("llama", "mistral", "mixtral", "qwen2")


def model_from_hf_config(cfg: dict, name: str) -> ModelSpec:
    model_type = str(cfg.get("model_type", ""))
    if model_type not in HF_FAMILIES:
        raise NfsearchError(f"config.json: model_type '{model_type}' is not supported "
                            f"(supported: {', '.join(HF_FAMILIES)})")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelSpec(
            name=str(cfg.get("_name_or_path") or name),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            vocab_size=int(cfg["vocab_size"]),
            num_experts=int(cfg.get("num_local_experts", 0)),
            num_experts_per_token=int(cfg.get("num_experts_per_tok", 0)),
            has_qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        )
    except KeyError as exc:
        raise NfsearchError(f"config.json: missing field {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise NfsearchError(f"config.json: bad value ({exc})") from None


def standard_workloads() -> dict[str, dict]:
    return read_yaml(resources.files("nfsearch") / "workloads" / "standard.yaml")


def load_workload(ref: str) -> Workload:
    """A standard id (W1-W5) or a YAML path."""
    if ref.endswith((".yaml", ".yml")):
        return _build(Workload, read_yaml(ref), f"workload file {ref}")
    table = standard_workloads()
    if ref.upper() in table:
        return _build(Workload, table[ref.upper()], f"workload {ref}")
    raise NfsearchError(f"unknown workload '{ref}' (standard: {', '.join(table)}; or a .yaml path)")


def workload_from_flags(num_decode: int, decode_context: int, prefill_lengths: tuple[int, ...],
                        tp_degree: int, dtype: str) -> Workload:
    name = f"custom d{num_decode}x{decode_context}+p{sum(prefill_lengths)} tp{tp_degree}"
    return Workload(name, num_decode, decode_context, tuple(prefill_lengths), tp_degree, dtype)


def load_gpu(key: str) -> GpuSpec:
    table = read_yaml(resources.files("nfsearch") / "gpus" / "standard.yaml")
    if key not in table:
        raise NfsearchError(f"unknown GPU '{key}' (known: {', '.join(table)})")
    return _build(GpuSpec, {"key": key, **table[key]}, f"gpu {key}")


def gpu_by_name(name: str) -> GpuSpec | None:
    """The bundled GPU whose device name matches (e.g. 'NVIDIA H100 80GB HBM3'), if any."""
    table = read_yaml(resources.files("nfsearch") / "gpus" / "standard.yaml")
    for key, row in table.items():
        if row["name"] == name:
            return load_gpu(key)
    return None


def _build(cls, data: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise NfsearchError(f"{where}: unknown field(s) {', '.join(unknown)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise NfsearchError(f"{where}: {exc}") from None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise NfsearchError(message)
