"""Model, workload and GPU specs: frozen dataclasses validated on construction, and their loaders.

A model comes from a bundled name, a YAML file or a HuggingFace config.json; a workload from a
standard id (W1-W5), a YAML file or flags; a GPU from a bundled name. `Ceilings` are a GPU's measured
rates (a GEMM and a copy), the form every run report and measured profile keeps them in.

Each field's type carries its bounds (pydantic `Annotated` types); every construction validates
the values strictly against them (an int field takes no bool, float or string; a float field no
inf/nan) and `__post_init__` adds the checks that span fields. Loaders validate the raw mapping
with the same types first, so an unknown or missing key, or a bad value, is one line naming the
file and the key. The bounds keep every later loop and product finite and quick.
"""

import math
import re
from dataclasses import MISSING, asdict, dataclass, fields
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationError, create_model

from nfsearch.errors import NfsearchError
from nfsearch.files import read_json, read_yaml, shown

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Upper bounds on what a spec may say (far above any real model, GPU or batch).
MAX_HIDDEN = 2**20
MAX_HEADS = 4096
MAX_HEAD_DIM = 2**14
MAX_INTERMEDIATE = 2**22
MAX_LAYERS = 10**4
MAX_VOCAB = 2**24
MAX_EXPERTS = 4096
MAX_TOKENS = 2**20          # tokens in one dense batch (decode requests + prompt tokens)
MAX_CONTEXT = 2**22         # a decode context or a prompt length
MAX_TP = 1024
MAX_SMS = 4096
MAX_RATE = 1e9              # TFLOP/s, TB/s or GB/s
MAX_NAME_CHARS = 256
MAX_MEMORY_BYTES = 2**50    # one device's memory
MAX_TIME_MS = 1e5           # 100 s for one kernel: beyond it a time is a unit or parse error
MAX_LABEL_CHARS = 64        # op, impl and co_class names of a profile


def _check_text(text: str) -> str:
    if not text.isprintable():          # also catches lone surrogates (unicode category Cs)
        raise ValueError("must be printable unicode text")
    return text


def bounded_int(low: int, high: int):
    """An int type for pydantic: no bool, float or string, low <= value <= high."""
    return Annotated[int, Strict(), Field(ge=low, le=high)]


Name = Annotated[str, Strict(), Field(min_length=1, max_length=MAX_NAME_CHARS), AfterValidator(_check_text)]
Text = Annotated[str, Strict(), Field(max_length=4 * MAX_NAME_CHARS), AfterValidator(_check_text)]
Rate = Annotated[float, Strict(), Field(gt=0, le=MAX_RATE, allow_inf_nan=False)]
Dtype = Literal[tuple(DTYPE_BYTES)]


class SpecError(NfsearchError):
    """A spec that fails validation; `detail` is the message without the spec's label."""

    def __init__(self, label: str, detail: str):
        super().__init__(f"{label}: {detail}")
        self.detail = detail


@dataclass(frozen=True)
class ModelSpec:
    name: Name
    hidden_size: bounded_int(1, MAX_HIDDEN)
    num_heads: bounded_int(1, MAX_HEADS)
    num_kv_heads: bounded_int(1, MAX_HEADS)
    head_dim: bounded_int(1, MAX_HEAD_DIM)
    intermediate_size: bounded_int(1, MAX_INTERMEDIATE)
    num_layers: bounded_int(1, MAX_LAYERS)
    vocab_size: bounded_int(1, MAX_VOCAB)
    num_experts: bounded_int(0, MAX_EXPERTS) = 0
    num_experts_per_token: bounded_int(0, MAX_EXPERTS) = 0
    has_qkv_bias: Annotated[bool, Strict()] = False
    # Attention sees at most this many recent keys (Mistral); 0: the whole context.
    sliding_window: bounded_int(0, MAX_CONTEXT) = 0

    def __post_init__(self):
        _validate_fields(self, "model")
        label = f"model {self.name}"
        _require(self.num_heads % self.num_kv_heads == 0, label,
                 f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.num_experts:
            _require(1 <= self.num_experts_per_token <= self.num_experts, label,
                     f"need 1 <= num_experts_per_token ({self.num_experts_per_token}) <= num_experts "
                     f"({self.num_experts})")
        else:
            _require(self.num_experts_per_token == 0, label,
                     "num_experts_per_token is set but num_experts is 0")

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
        data = asdict(self)
        if not self.sliding_window:       # the plan schema's model section lists it only when set
            del data["sliding_window"]
        return data


Lengths = Annotated[tuple[bounded_int(1, MAX_CONTEXT), ...], Field(max_length=MAX_TOKENS)]
Prefixes = Annotated[tuple[bounded_int(0, MAX_CONTEXT), ...], Field(max_length=MAX_TOKENS)]


@dataclass(frozen=True)
class Workload:
    """One dense batch: decode requests (one token each) followed by prefill chunks.

    The batch an engine iteration forms: each decode request with its own context (`decode_contexts`,
    tokens attended, the new one included; empty: every request at `decode_context`), and each
    prefill chunk with its length (`prefill_lengths`) and the tokens of its request already in the KV
    cache before it (`prefill_prefix_lens`, chunked prefill; empty: none, whole prompts). With
    per-request contexts, `decode_context` is their mean rounded up (the loaders fill it in)."""
    name: Name
    num_decode: bounded_int(0, MAX_TOKENS)
    decode_context: bounded_int(0, MAX_CONTEXT)
    prefill_lengths: Lengths = ()
    tp_degree: bounded_int(1, MAX_TP) = 1
    dtype: Dtype = "bf16"
    model: Name | None = None
    decode_contexts: Lengths = ()
    prefill_prefix_lens: Prefixes = ()

    def __post_init__(self):
        _validate_fields(self, "workload")
        label = f"workload {self.name}"
        _require(self.num_decode == 0 or self.decode_context > 0, label,
                 "decode_context must be positive when there are decode requests")
        _require(self.num_tokens > 0, label, "the batch has no tokens")
        _require(self.num_tokens <= MAX_TOKENS, label,
                 f"the batch has {self.num_tokens} tokens, more than {MAX_TOKENS}")
        if self.decode_contexts:
            _require(len(self.decode_contexts) == self.num_decode, label,
                     f"decode_contexts has {len(self.decode_contexts)} contexts for {self.num_decode} decode "
                     "requests")
            mean = mean_context(self.decode_contexts)
            _require(self.decode_context == mean, label, f"decode_context ({self.decode_context}) must be the "
                     f"mean of decode_contexts rounded up ({mean}), or left out")
        if self.prefill_prefix_lens:
            _require(len(self.prefill_prefix_lens) == len(self.prefill_lengths), label,
                     f"prefill_prefix_lens has {len(self.prefill_prefix_lens)} prefixes for "
                     f"{len(self.prefill_lengths)} prefill chunks")
            longest = max(p + n for p, n in zip(self.prefill_prefix_lens, self.prefill_lengths))
            _require(longest <= MAX_CONTEXT, label,
                     f"a chunk reaches position {longest}, beyond {MAX_CONTEXT}")

    @classmethod
    def from_batch_shape(cls, context_lens, chunk_lens=(), prefix_lens=(), *, name: str | None = None,
                         tp_degree: int = 1, dtype: str = "bf16", model: str | None = None) -> "Workload":
        """The workload of one engine batch (serving.batch.Batch's context_lens, chunk_lens,
        prefix_lens): per decode request the tokens it attends, per prefill chunk its length and its
        request's cached prefix. Raises NfsearchError on a batch no workload describes."""
        contexts, chunks = tuple(context_lens), tuple(chunk_lens)
        prefixes = tuple(prefix_lens) if any(prefix_lens) else ()
        label = name or batch_name(contexts, chunks, prefixes, tp_degree)
        values = {"name": label, "num_decode": len(contexts),
                  "decode_context": mean_context(contexts) if contexts else 0, "prefill_lengths": chunks,
                  "tp_degree": tp_degree, "dtype": dtype, "model": model,
                  "decode_contexts": contexts if len(set(contexts)) > 1 else (),
                  "prefill_prefix_lens": prefixes}
        return spec_from_dict(cls, values, f"batch {label}")

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_lengths)

    @property
    def contexts(self) -> tuple[int, ...]:
        """Each decode request's context (tokens attended)."""
        return self.decode_contexts or (self.decode_context,) * self.num_decode

    @property
    def prefix_lens(self) -> tuple[int, ...]:
        """Each prefill chunk's cached prefix (0: the chunk starts its prompt)."""
        return self.prefill_prefix_lens or (0,) * len(self.prefill_lengths)

    @property
    def prefill_pairs(self) -> int:
        """(query, key) pairs of causal prefill attention over every chunk: token i of a chunk sees its
        request's cached prefix and the chunk's tokens up to itself."""
        return sum(n * p + n * (n + 1) // 2 for n, p in zip(self.prefill_lengths, self.prefix_lens))

    @property
    def prefill_context(self) -> int:
        """The prompt length that prices the chunks' attention as one launch: the length c at which
        num_prefill_tokens tokens in prompts of c tokens have the chunks' pairs (T (c + 1) / 2 = pairs),
        rounded up. Whole prompts of one length: that length; odd lengths count by their squares."""
        total = self.num_prefill_tokens
        if not total:
            return 0
        return max(1, -(-(2 * self.prefill_pairs - total) // total))

    @property
    def num_kv_tokens(self) -> int:
        """Tokens whose K/V the batch keeps in each layer's cache: each decode request's context and each
        chunk's request up to the chunk's end."""
        return sum(self.contexts) + sum(p + n for p, n in zip(self.prefix_lens, self.prefill_lengths))

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
        for key in ("decode_contexts", "prefill_prefix_lens"):      # listed only when set (older plans)
            if d[key]:
                d[key] = list(d[key])
            else:
                del d[key]
        return d


def mean_context(contexts) -> int:
    """The mean of decode contexts, rounded up."""
    return -(-sum(contexts) // len(contexts))


def batch_name(contexts: tuple[int, ...], chunks: tuple[int, ...], prefixes: tuple[int, ...],
               tp_degree: int) -> str:
    """A short name of a batch: decode requests and their context range, prefill chunks and tokens."""
    parts = []
    if contexts:
        low, high = min(contexts), max(contexts)
        parts.append(f"d{len(contexts)}x{low}" + (f"-{high}" if high != low else ""))
    if chunks:
        parts.append(f"p{len(chunks)}:{sum(chunks)}" + (f"+prefix{sum(prefixes)}" if prefixes else ""))
    return f"batch {' '.join(parts) or 'empty'} tp{tp_degree}"


@dataclass(frozen=True)
class GpuSpec:
    key: Name
    name: Name
    num_sms: bounded_int(1, MAX_SMS)
    sm_granularity: bounded_int(1, MAX_SMS)
    peak_tflops: Rate
    mem_bandwidth_tbps: Rate
    net_bandwidth_gbps: Rate
    figures_source: Text = "estimate"
    memory_bytes: bounded_int(0, MAX_MEMORY_BYTES) = 0      # device memory (gpus/standard.yaml); 0: unknown

    def __post_init__(self):
        _validate_fields(self, "gpu")
        _require(self.sm_granularity <= self.num_sms, f"gpu {self.key}",
                 f"sm_granularity ({self.sm_granularity}) exceeds num_sms ({self.num_sms})")

    def sm_grid(self) -> list[int]:
        """SM counts a partition can have: multiples of the granularity, and the whole GPU."""
        grid = list(range(self.sm_granularity, self.num_sms, self.sm_granularity))
        return grid + [self.num_sms]


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise NfsearchError(message)


@dataclass(frozen=True)
class Ceilings:
    """The device's measured ceilings: a large cuBLAS bf16 GEMM and a large device-to-device copy
    (bytes read + written). The one form of them: runtime.bench.ceilings() measures one for a run
    report (and tune, TP runs); a measured profile keeps one in its metadata under "ceilings"."""
    gemm_tflops: float
    copy_tbps: float
    gemm_shape: str = ""
    copy_bytes: int = 0

    def __post_init__(self):
        _check(all(_is_number(x) and 0 < x <= MAX_RATE for x in (self.gemm_tflops, self.copy_tbps)),
               f"ceilings must be positive rates up to {MAX_RATE:g}, not {self.gemm_tflops!r} TFLOP/s and "
               f"{self.copy_tbps!r} TB/s")
        _check(isinstance(self.gemm_shape, str) and len(self.gemm_shape) <= 200,
               "ceilings: gemm_shape must be a short text")
        _check(isinstance(self.copy_bytes, int) and not isinstance(self.copy_bytes, bool) and self.copy_bytes >= 0,
               "ceilings: copy_bytes must be an int >= 0")

    def to_dict(self) -> dict:
        return {"gemm_tflops": self.gemm_tflops, "copy_tbps": self.copy_tbps, "gemm_shape": self.gemm_shape,
                "copy_bytes": self.copy_bytes}

    @classmethod
    def from_dict(cls, d) -> "Ceilings":
        _check(isinstance(d, dict), "ceilings must be a JSON object")
        unknown = set(d) - {f.name for f in fields(cls)}
        _check(not unknown, f"ceilings: unknown keys {sorted(map(str, unknown))}")
        _check("gemm_tflops" in d and "copy_tbps" in d, "ceilings need gemm_tflops and copy_tbps")
        return cls(d["gemm_tflops"], d["copy_tbps"], d.get("gemm_shape", ""), d.get("copy_bytes", 0))


def check_fits(model: ModelSpec, workload: Workload) -> None:
    """What a model and a workload must agree on; graph.layer_ops calls it, so every caller does.

    Tensor parallelism splits attention heads (query and key/value) evenly over the GPUs. Sliding-
    window attention is refused rather than capped where the window is shorter than the context:
    the kernels and the profile attend over the whole context, so a capped cost would not be the
    cost of what runs (a decode context equal to the window costs what a longer one would)."""
    tp = workload.tp_degree
    for what, count in (("attention heads", model.num_heads), ("key/value heads", model.num_kv_heads)):
        if count % tp:
            raise NfsearchError(f"model {model.name}'s {count} {what} are not divisible by TP={tp} "
                                f"(workload {workload.name})")
    window = model.sliding_window
    if window and workload.num_decode and max(workload.contexts) > window:
        raise NfsearchError(f"model {model.name} attends at most its sliding window of {window} tokens; "
                            f"decode context {max(workload.contexts)} is longer (sliding-window attention"
                            f" is not modelled: give a context <= {window}, which costs the same)")
    reach = [p + n for p, n in zip(workload.prefix_lens, workload.prefill_lengths)]
    if window and any(r > window for r in reach):
        raise NfsearchError(f"model {model.name} attends at most its sliding window of {window} tokens; "
                            + (f"a chunk reaching position {max(reach)}" if any(workload.prefix_lens)
                               else f"a prompt of {max(reach)} tokens")
                            + " is longer (sliding-window prefill is not modelled)")


def bundled_names(kind: str) -> list[str]:
    folder = resources.files("nfsearch") / kind
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_model(ref: str) -> ModelSpec:
    """A bundled model name, a YAML path, or a HuggingFace config.json path."""
    path = Path(ref)
    if ref.endswith(".json"):
        return model_from_hf_config(read_json(path), hf_model_name(path), shown(ref))
    if ref.endswith((".yaml", ".yml")):
        return spec_from_dict(ModelSpec, read_yaml(path), f"model file {shown(ref)}")
    if ref in bundled_names("models"):
        data = read_yaml(resources.files("nfsearch") / "models" / f"{ref}.yaml")
        return spec_from_dict(ModelSpec, data, f"model {ref}")
    raise NfsearchError(f"unknown model '{shown(ref)}' (bundled: {', '.join(bundled_names('models'))};"
                        " or give a .yaml or HuggingFace config.json path)")


def hf_model_name(path: Path) -> str:
    """A HuggingFace config's model name from its path: the folder of a file named exactly
    config.json where the path names a folder ('' for './config.json' or '/config.json'), else
    the file name without .config.json or .json ('foo.config.json' is 'foo', whatever its folder)."""
    if path.name == "config.json":
        folder = path.parent.name
        return folder if folder not in ("", ".", "..") else ""
    return path.name[:-len(".config.json")] if path.name.endswith(".config.json") else path.stem


HF_FAMILIES = ("llama", "mistral", "mixtral", "qwen2")


class HfConfig(BaseModel):
    """The fields of a HuggingFace config.json that a ModelSpec needs (others are ignored)."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    model_type: Literal[HF_FAMILIES]
    hidden_size: bounded_int(1, MAX_HIDDEN)
    num_attention_heads: bounded_int(1, MAX_HEADS)
    num_key_value_heads: bounded_int(1, MAX_HEADS) | None = None
    head_dim: bounded_int(1, MAX_HEAD_DIM) | None = None
    intermediate_size: bounded_int(1, MAX_INTERMEDIATE)
    num_hidden_layers: bounded_int(1, MAX_LAYERS)
    vocab_size: bounded_int(1, MAX_VOCAB)
    num_local_experts: bounded_int(0, MAX_EXPERTS) | None = None
    num_experts_per_tok: bounded_int(0, MAX_EXPERTS) | None = None
    attention_bias: Annotated[bool, Strict()] | None = None
    sliding_window: bounded_int(0, MAX_CONTEXT) | None = None
    use_sliding_window: Annotated[bool, Strict()] | None = None
    max_position_embeddings: bounded_int(1, 2 ** 40) | None = None
    name_or_path: Annotated[str, Strict()] | None = Field(None, alias="_name_or_path")


def model_from_hf_config(cfg: dict, name: str, where: str = "config.json") -> ModelSpec:
    if not isinstance(cfg, dict):
        raise NfsearchError(f"{where}: expected a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in HF_FAMILIES:
        raise NfsearchError(f"{where}: model_type '{shown(model_type)}' is not supported "
                            f"(supported: {', '.join(HF_FAMILIES)})")
    try:
        hf = HfConfig.model_validate(cfg)
    except ValidationError as exc:
        raise NfsearchError(f"{where}: {describe(exc)}") from None
    head_dim = hf.head_dim
    if head_dim is None:
        if hf.hidden_size % hf.num_attention_heads:
            raise NfsearchError(f"{where}: hidden_size {hf.hidden_size} is not a multiple of "
                                f"num_attention_heads {hf.num_attention_heads} (and head_dim is not given)")
        head_dim = hf.hidden_size // hf.num_attention_heads
    # Qwen2 configs carry a window they do not use unless use_sliding_window is set; a window at
    # least as long as the model's longest context changes nothing.
    window = hf.sliding_window or 0
    if model_type == "qwen2" and not hf.use_sliding_window:
        window = 0
    if hf.max_position_embeddings is not None and window >= hf.max_position_embeddings:
        window = 0
    data = dict(
        name=hf.name_or_path or name or model_type,        # a name that says nothing: the family
        hidden_size=hf.hidden_size,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        vocab_size=hf.vocab_size,
        num_experts=hf.num_local_experts or 0,
        num_experts_per_token=(hf.num_experts_per_tok or 0) if hf.num_local_experts else 0,
        has_qkv_bias=model_type == "qwen2" or bool(hf.attention_bias),
        sliding_window=window,
    )
    return spec_from_dict(ModelSpec, data, where, names={"name": "_name_or_path (or the file's name)",
                                                        "num_heads": "num_attention_heads",
                                                        "num_kv_heads": "num_key_value_heads",
                                                        "num_layers": "num_hidden_layers"})


def standard_workloads() -> dict[str, dict]:
    return read_yaml(resources.files("nfsearch") / "workloads" / "standard.yaml")


def load_workload(ref: str) -> Workload:
    """A standard id (W1-W5) or a YAML path."""
    if ref.endswith((".yaml", ".yml")):
        return spec_from_dict(Workload, complete_batch(read_yaml(ref)), f"workload file {shown(ref)}")
    table = standard_workloads()
    if ref.upper() in table:
        return spec_from_dict(Workload, table[ref.upper()], f"workload {ref.upper()}")
    raise NfsearchError(f"unknown workload '{shown(ref)}' (standard: {', '.join(table)}; or a .yaml path)")


FLAG_NAMES = {"num_decode": "--decode", "decode_context": "--context", "prefill_lengths": "--prefill",
              "tp_degree": "--tp", "dtype": "--dtype", "decode_contexts": "--decode-contexts",
              "prefill_prefix_lens": "--prefill-prefix"}


def workload_from_flags(num_decode: int, decode_context: int | None, prefill_lengths: tuple[int, ...],
                        tp_degree: int, dtype: str, decode_contexts: tuple[int, ...] = (),
                        prefix_lens: tuple[int, ...] = ()) -> Workload:
    """The workload of the batch flags. With per-request contexts, --decode may be left out (0) and
    --context (None) is their mean."""
    as_tuple = lambda x: tuple(x) if isinstance(x, (list, tuple)) else x
    values = {"name": "custom", "num_decode": num_decode, "decode_context": decode_context,
              "prefill_lengths": as_tuple(prefill_lengths), "tp_degree": tp_degree, "dtype": dtype,
              "decode_contexts": as_tuple(decode_contexts), "prefill_prefix_lens": as_tuple(prefix_lens)}
    values = complete_batch(values)
    checked = _check_mapping(Workload, values, "flags", FLAG_NAMES)
    contexts = checked["decode_contexts"]
    if contexts:
        decode = f"d{len(contexts)}x{min(contexts)}-{max(contexts)}"
    else:
        decode = f"d{checked['num_decode']}x{checked['decode_context']}"
    prefix = sum(checked["prefill_prefix_lens"])
    values["name"] = (f"custom {decode}+p{sum(checked['prefill_lengths'])}"
                      + (f"+prefix{prefix}" if prefix else "") + f" tp{tp_degree}")
    return spec_from_dict(Workload, values, "flags", FLAG_NAMES)


def complete_batch(data):
    """A workload mapping with num_decode and decode_context filled in from decode_contexts where left
    out (or None), and one context for all dropped (a YAML file or flags may give either)."""
    if not isinstance(data, dict) or not isinstance(data.get("decode_contexts"), (list, tuple)):
        return data
    contexts = tuple(data["decode_contexts"])
    if not contexts or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in contexts):
        return data                 # (validation names what is wrong)
    data = dict(data)
    if data.get("num_decode") in (None, 0):
        data["num_decode"] = len(contexts)
    if data.get("decode_context") is None:
        data["decode_context"] = mean_context(contexts)
    if len(set(contexts)) == 1 and data["decode_context"] == contexts[0]:
        data["decode_contexts"] = ()
    return data


MAX_LENGTH_DIGITS = 8


def parse_lengths(text: str, flag: str = "--prefill", may_be_zero: bool = False) -> tuple[int, ...]:
    """Prompt lengths from comma-separated text ('512,512'; '' gives none). Only ASCII digits are
    taken: int() would also take '1_000', '٥' and ' +5 '. `may_be_zero`: 0 is a length too (prefixes)."""
    if not text.strip():
        return ()
    pieces = text.split(",")
    if len(pieces) > MAX_TOKENS:
        raise NfsearchError(f"{flag}: more than {MAX_TOKENS} lengths")
    lengths = []
    for piece in pieces:
        if not re.fullmatch(rf"\s*[0-9]{{1,{MAX_LENGTH_DIGITS}}}\s*", piece, flags=re.ASCII):
            raise NfsearchError(f"{flag} must be comma-separated positive integers, got '{shown(text)}' "
                                f"(bad item '{shown(piece.strip(), 20)}')")
        lengths.append(int(piece))
    if min(lengths) < (0 if may_be_zero else 1):
        raise NfsearchError(f"{flag}: lengths must be positive, got '{shown(text)}'")
    return tuple(lengths)


def load_gpu(key: str) -> GpuSpec:
    table = _gpu_table()
    if key not in table:
        raise NfsearchError(f"unknown GPU '{shown(key)}' (known: {', '.join(table)})")
    if not isinstance(table[key], dict):
        raise NfsearchError(f"gpu {key}: expected a mapping of its figures")
    return spec_from_dict(GpuSpec, {"key": key, **table[key]}, f"gpu {key}")


def gpu_by_name(name: str) -> GpuSpec | None:
    """The bundled GPU whose device name matches (e.g. 'NVIDIA H100 80GB HBM3'), if any."""
    for key, row in _gpu_table().items():
        if isinstance(row, dict) and row.get("name") == name:
            return load_gpu(key)
    return None


def _gpu_table() -> dict:
    return read_yaml(resources.files("nfsearch") / "gpus" / "standard.yaml")


# ---- validation --------------------------------------------------------------------------------

@cache
def _checker(cls) -> type[BaseModel]:
    """A pydantic model of the dataclass's fields (types, bounds, defaults); unknown keys refused."""
    spec = {}
    for f in fields(cls):
        default = f.default if f.default is not MISSING else ...
        spec[f.name] = (f.type, default)
    return create_model(f"{cls.__name__}Fields", __config__=ConfigDict(extra="forbid"), **spec)


def _validate_fields(spec, kind: str) -> None:
    """Check a spec's field values against their types and bounds, storing the validated values
    (a list of prompt lengths becomes a tuple)."""
    values = {f.name: getattr(spec, f.name) for f in fields(spec)}
    try:
        checked = _checker(type(spec)).model_validate(values)
    except ValidationError as exc:
        name = values.get("name")
        label = f"{kind} {name}" if isinstance(name, str) and name.isprintable() else kind
        raise SpecError(shown(label, 60), describe(exc)) from None
    for key in values:
        object.__setattr__(spec, key, getattr(checked, key))


def _check_mapping(cls, data, where: str, names: dict | None = None) -> dict:
    if not isinstance(data, dict):
        raise NfsearchError(f"{where}: expected a mapping of {cls.__name__} fields")
    try:
        return _checker(cls).model_validate(data).model_dump()
    except ValidationError as exc:
        raise NfsearchError(f"{where}: {describe(exc, names)}") from None


def spec_from_dict(cls, data: dict, where: str, names: dict | None = None):
    """A spec (ModelSpec, Workload, GpuSpec) from a raw mapping, a file's or the flags': one line
    naming `where` and the key on any problem; `names` renames keys in messages (flag names)."""
    checked = _check_mapping(cls, data, where, names)
    try:
        return cls(**checked)
    except SpecError as exc:
        raise NfsearchError(f"{where}: {exc.detail}") from None


def describe(exc: ValidationError, names: dict | None = None) -> str:
    """The first problem of a pydantic ValidationError on one line, keys as the user wrote them."""
    errors = exc.errors(include_url=False)
    # an unknown key first: it is often the misspelling of a key reported missing
    first = min(errors, key=lambda e: e["type"] != "extra_forbidden")
    loc = list(first["loc"])
    if loc and names and loc[0] in names:
        loc[0] = names[loc[0]]
    where = "".join(f"[{x}]" if isinstance(x, int) else f".{shown(x, 40)}" for x in loc).lstrip(".") or "value"
    kind, message = first["type"], first["msg"]
    if kind == "missing":
        text = f"missing field {where}"
    elif kind == "extra_forbidden":
        text = f"unknown field {where}"
    else:
        got_text = _shown_input(first.get("input"))
        message = re.sub(r"^(Input|String|Tuple|List|Dictionary) should ", "should ", message)
        message = re.sub(r"^Value error, ", "", message)
        text = f"{where} {message} (got {got_text})"
    more = len(errors) - 1
    return text + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def _shown_input(value) -> str:
    if isinstance(value, (dict, list, tuple, set)):
        return f"a {type(value).__name__}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"  # str() may refuse it
    return shown(repr(value), 40)


def _require(ok: bool, label: str, detail: str) -> None:
    if not ok:
        raise SpecError(label, detail)
