"""The engine's GPU path on the CPU: the tiny engine with attention "triton" (the paged decode and prefill
kernels, the fused RoPE + K/V write, fp8 K/V quantization, the fused fp8 activation quantizers, all in
Triton's interpreter) against attention "torch" (the CPU path), through the same scheduler, pages and
runner. Run by tests/test_engine_interp.py in a child process with TRITON_INTERPRET=1 (set before the
kernels are defined). Prints one JSON object {setting: {check: value}}."""

import json
import os

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch

from nfsearch.runtime.engine import Engine, TraceShape
from nfsearch.serving.traces import Request

TINY = os.path.join(os.path.dirname(__file__), "fixtures", "engine-tiny", "config.json")
SETTINGS = {"fp32": {}, "fp8kv": {"kv_cache_dtype": "fp8"}, "fp8": {"quantization": "fp8"},
            "fp8+fp8kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"}}


def requests() -> list[Request]:
    """Mixed prompt and output lengths: batches mix decode rows with chunks over cached prefixes."""
    return [Request(i, 5 + (7 * i) % 29, 2 + (5 * i) % 7) for i in range(10)]


def run(attn_impl: str, flags: dict) -> dict[int, list[int]]:
    """Each request's output ids; Engine.run checks that no page is left held."""
    reqs = requests()
    engine = Engine(TINY, device="cpu", dtype="fp32", attn_impl=attn_impl, dense_batch=32, max_decode=8,
                    trace_shape=TraceShape.of(reqs), **flags)
    return {s.seq_id: list(s.output_ids) for s in engine.run(reqs).sequences}


def family_run(attn_impl: str, name: str) -> dict[int, list[int]]:
    """The GPU tests' two-bucket family (fixtures/engine-tiny): `name` is the sequential one or the one
    whose larger bucket is split in nano-batches on three streams with SM shares."""
    from nfsearch.serving.traces import load_trace
    reqs = load_trace("const:8:8", 24).requests
    engine = Engine(TINY, device="cpu", dtype="fp32", attn_impl=attn_impl, trace_shape=TraceShape.of(reqs),
                    num_pages=256, plans=os.path.join(os.path.dirname(TINY), name))
    return {s.seq_id: list(s.output_ids) for s in engine.run(reqs).sequences}


def main() -> dict:
    torch.manual_seed(0)
    result = {}
    for name, flags in SETTINGS.items():
        ref, got = run("torch", flags), run("triton", flags)
        tokens = [(a, b) for k in ref for a, b in zip(ref[k], got.get(k, []))]
        result[name] = {"all_finished": sorted(got) == sorted(ref) and all(len(got[k]) == len(ref[k]) for k in ref),
                        "num_tokens": len(tokens),
                        "token_agreement": sum(a == b for a, b in tokens) / max(1, len(tokens))}
    ref = family_run("torch", "two-buckets.family.json")
    got = family_run("triton", "two-buckets-split.family.json")
    tokens = [(a, b) for k in ref for a, b in zip(ref[k], got.get(k, []))]
    result["overlapped family"] = {
        "all_finished": sorted(got) == sorted(ref) and all(len(got[k]) == len(ref[k]) for k in ref),
        "num_tokens": len(tokens), "token_agreement": sum(a == b for a, b in tokens) / max(1, len(tokens))}
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
