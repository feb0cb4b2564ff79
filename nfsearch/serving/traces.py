"""Request traces: the engine workloads E1-E4, constant lengths, synthetic samplers, JSONL files.

The named distributions (splitwise, lmsys, sharegpt) are synthetic: lognormal lengths whose sample
means are scaled to the published means (NanoFlow's Table 4), so a run says it did not replay the real
trace. Lengths are never dropped for being too long here: the scheduler refuses such a request with a
reason, so the user sees it.
"""

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from nfsearch.errors import NfsearchError


@dataclass(frozen=True)
class Request:
    request_id: int
    prompt_len: int                               # tokens
    output_len: int                               # max_tokens for this request
    arrival_s: float = 0.0
    prompt_ids: tuple[int, ...] | None = None     # None: random ids drawn from the seed (prompt_ids_for)
    ignore_eos: bool = True


@dataclass
class Trace:
    name: str
    requests: list[Request]
    is_synthetic: bool
    description: str

    @property
    def mean_prompt_len(self) -> float:
        return sum(r.prompt_len for r in self.requests) / max(len(self.requests), 1)

    @property
    def mean_output_len(self) -> float:
        return sum(r.output_len for r in self.requests) / max(len(self.requests), 1)


@dataclass(frozen=True)
class LengthDist:
    """Published mean lengths and the lognormal spread (sigma of log length) assumed for each."""
    mean_prompt_len: float
    mean_output_len: float
    prompt_sigma: float
    output_sigma: float
    source: str


# Sigmas are assumptions giving heavy right tails like the public traces, not fitted values.
DISTRIBUTIONS = {
    "splitwise": LengthDist(1155, 211, 0.8, 1.0, "Splitwise"),
    "lmsys": LengthDist(102, 222, 1.2, 0.9, "LMSYS-Chat-1M"),
    "sharegpt": LengthDist(246, 322, 1.1, 0.9, "ShareGPT"),
}
# The engine workloads of docs/workloads.md: (trace spec, name)
WORKLOADS = {"E1": ("const:1024:512", "E1 const1024x512"), "E2": ("const:512:512", "E2 const512x512"),
             "E3": ("splitwise", "E3 splitwise"), "E4": ("sharegpt", "E4 sharegpt")}


def load_trace(spec: str, num_requests: int | None, seed: int = 0, max_context: int | None = None) -> Trace:
    """A trace by name (E1-E4, splitwise, lmsys, sharegpt), `const:IN:OUT`, or a `.jsonl` path.

    Every request of E1-E4 and of the named and constant traces arrives at t=0 with ignore_eos (the
    trace fixes output lengths). num_requests None takes a whole JSONL file; a named trace needs it.
    """
    if spec.upper() in WORKLOADS:
        inner, name = WORKLOADS[spec.upper()]
        trace = load_trace(inner, num_requests, seed, max_context)
        trace.name = name
        return trace
    if spec.endswith(".jsonl") or Path(spec).is_file():
        return _load_jsonl(Path(spec), num_requests)
    if num_requests is None or num_requests < 1:
        raise NfsearchError(f"trace {spec!r} needs a number of requests >= 1")
    if spec.startswith("const:"):
        prompt_len, output_len = _parse_const(spec)
        requests = [Request(i, prompt_len, output_len) for i in range(num_requests)]
        return Trace(spec, requests, False, f"{num_requests} requests, input {prompt_len}, output "
                     f"{output_len} tokens, all at t=0, ignore EOS")
    if spec.lower() in DISTRIBUTIONS:
        return _synthetic(spec.lower(), num_requests, seed, max_context)
    raise NfsearchError(f"unknown trace {spec!r}: use E1-E4, const:IN:OUT, "
                        f"{', '.join(DISTRIBUTIONS)} or a .jsonl file")


def _parse_const(spec: str) -> tuple[int, int]:
    parts = spec.split(":")
    try:
        prompt_len, output_len = int(parts[1]), int(parts[2])
        if len(parts) != 3 or prompt_len < 1 or output_len < 1:
            raise ValueError
    except (ValueError, IndexError):
        raise NfsearchError(f"trace {spec!r}: expected const:IN:OUT with IN, OUT >= 1") from None
    return prompt_len, output_len


def _synthetic(name: str, num_requests: int, seed: int, max_context: int | None) -> Trace:
    dist = DISTRIBUTIONS[name]
    rng = random.Random(f"{name}:{seed}")
    max_len = max_context if max_context is not None else 1 << 20
    if max_len < 2:
        raise NfsearchError(f"trace {name}: max_context {max_context} leaves no room for a prompt and output")
    raw_prompts = [rng.lognormvariate(0.0, dist.prompt_sigma) for _ in range(num_requests)]
    raw_outputs = [rng.lognormvariate(0.0, dist.output_sigma) for _ in range(num_requests)]
    prompts = _scaled_lengths(raw_prompts, dist.mean_prompt_len, [max_len - 1] * num_requests)
    outputs = _scaled_lengths(raw_outputs, dist.mean_output_len, [max_len - p for p in prompts])
    requests = [Request(i, p, o) for i, (p, o) in enumerate(zip(prompts, outputs))]
    description = (f"synthetic, lengths drawn to match published means ({dist.source}: input "
                   f"{dist.mean_prompt_len:g}, output {dist.mean_output_len:g}; lognormal sigma "
                   f"{dist.prompt_sigma}/{dist.output_sigma}, seed {seed}); all at t=0, ignore EOS")
    return Trace(name, requests, True, description)


def _scaled_lengths(raw: list[float], target_mean: float, caps: list[int]) -> list[int]:
    """Round raw * scale into [1, cap] with the scale chosen so the sample mean hits target_mean.

    Rescaling (rather than trusting the lognormal's expected mean) keeps small traces on the published
    means; clipping to the caps can make the target unreachable, then the closest scale is kept.
    """
    scale = target_mean * len(raw) / sum(raw)
    lengths = []
    for _ in range(20):
        lengths = [min(cap, max(1, round(x * scale))) for x, cap in zip(raw, caps)]
        mean = sum(lengths) / len(lengths)
        if abs(mean - target_mean) <= 0.001 * target_mean:
            break
        scale *= target_mean / mean
    return lengths


def _load_jsonl(path: Path, num_requests: int | None) -> Trace:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise NfsearchError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    requests = []
    for line_no, line in enumerate(lines, start=1):
        if num_requests is not None and len(requests) >= num_requests:
            break
        if line.strip():
            requests.append(_parse_line(path, line_no, line, len(requests)))
    if not requests:
        raise NfsearchError(f"trace {path} holds no requests")
    has_arrivals = any(r.arrival_s for r in requests)
    requests.sort(key=lambda r: r.arrival_s)
    short = (f" (fewer than the {num_requests} asked)"
             if num_requests is not None and len(requests) < num_requests else "")
    description = (f"{len(requests)} requests from {path}{short}, "
                   f"{'arrivals from the file' if has_arrivals else 'all at t=0'}")
    return Trace(path.name, requests, False, description)


def _parse_line(path: Path, line_no: int, line: str, request_id: int) -> Request:
    def bad(why: str) -> NfsearchError:
        return NfsearchError(f"trace {path} line {line_no}: {why}")

    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise bad(f"not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise bad("expected a JSON object")
    prompt_ids = obj.get("prompt_ids")
    if prompt_ids is not None:
        if not isinstance(prompt_ids, list) or not prompt_ids or not all(_is_int(t) and t >= 0 for t in prompt_ids):
            raise bad("prompt_ids must be a non-empty list of token ids >= 0")
        prompt_ids = tuple(prompt_ids)
    prompt_len = obj.get("prompt_len", obj.get("input_len", len(prompt_ids) if prompt_ids else None))
    output_len = obj.get("output_len")
    for key, value in (("prompt_len (or input_len)", prompt_len), ("output_len", output_len)):
        if not _is_int(value) or value < 1:
            raise bad(f"{key} must be an integer >= 1, got {value!r}")
    if prompt_ids is not None and len(prompt_ids) != prompt_len:
        raise bad(f"prompt_len {prompt_len} but {len(prompt_ids)} prompt_ids")
    arrival_s = obj.get("arrival_s", 0.0)
    if isinstance(arrival_s, bool) or not isinstance(arrival_s, (int, float)) or not math.isfinite(arrival_s) \
            or arrival_s < 0:
        raise bad(f"arrival_s must be a number >= 0, got {arrival_s!r}")
    ignore_eos = obj.get("ignore_eos", True)
    if not isinstance(ignore_eos, bool):
        raise bad(f"ignore_eos must be true or false, got {ignore_eos!r}")
    return Request(request_id, prompt_len, output_len, float(arrival_s), prompt_ids, ignore_eos)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def prompt_ids_for(request: Request, vocab_size: int, seed: int = 0) -> list[int]:
    """The request's prompt ids: its own (checked against the vocabulary), else random ids that
    depend only on (seed, request_id)."""
    if request.prompt_ids is not None:
        if max(request.prompt_ids) >= vocab_size:
            raise NfsearchError(f"request {request.request_id}: prompt id {max(request.prompt_ids)} is "
                                f"outside the model's vocabulary of {vocab_size}")
        return list(request.prompt_ids)
    rng = random.Random(seed * 1_000_003 + request.request_id)
    return [rng.randrange(vocab_size) for _ in range(request.prompt_len)]
