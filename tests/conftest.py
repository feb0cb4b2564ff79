"""Shared helpers: a tiny model and workload, and clearly fake profile tables (meta source "fake").

Fake timings are simple numbers chosen so simulator results can be worked out by hand; they say
nothing about any real GPU.
"""

from pathlib import Path

import pandas as pd
import pytest

from nfsearch.graph import layer_ops, op_context
from nfsearch.profile import ProfileTable
from nfsearch.specs import ModelSpec, Workload

FIXTURES = Path(__file__).parent / "fixtures"
# the engine's tiny random model: 2 layers, hidden 64, 4 heads, 2 KV heads, FFN 128, vocab 256, ctx 512
ENGINE_TINY = str(FIXTURES / "engine-tiny" / "config.json")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny CPU ops: on shared cores, OpenMP threads waiting on each other cost far more than the work."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
FAKE_SMS = 100

TINY_MODEL = ModelSpec("tiny", hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                       intermediate_size=512, num_layers=4, vocab_size=1000)
TINY_MOE = ModelSpec("tiny-moe", hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                     intermediate_size=512, num_layers=4, vocab_size=1000, num_experts=4,
                     num_experts_per_token=2)
# 128 decode requests at context 512, then one 128-token prompt: 256 tokens.
TINY_WL = Workload("tiny mixed256", num_decode=128, decode_context=512, prefill_lengths=(128,))

# fake full-GPU time (ms) of each op over 128 tokens
FAKE_BASE_MS = {"norm1": 0.0625, "kqv": 0.25, "rope_append": 0.0625, "decode_attn": 1.0,
                "prefill_attn": 0.5, "o": 0.125, "allreduce_o": 0.25, "norm2": 0.0625, "router": 0.0625,
                "ug": 0.5, "expert_ug": 0.5, "act": 0.0625, "d": 0.25, "expert_d": 0.25,
                "allreduce_d": 0.25}
FAKE_TOKENS = (16, 64, 128, 256)
FAKE_SM_GRID = (10, 16, 30, 36, 50, 70, 96, 100)


def fake_meta(num_sms: int = FAKE_SMS, **extra) -> dict:
    return {"gpu_name": "Fake GPU", "num_sms": num_sms, "sm_granularity": 2, "source": "fake",
            "peak_tflops": 100.0, "mem_bandwidth_tbps": 1.0, "net_bandwidth_gbps": 100.0, **extra}


def fake_time(op_class: str, op: str, tokens: int, sms: int) -> float:
    """Linear in tokens; compute ops scale as 1/SMs, others are SM-insensitive (bandwidth-bound)."""
    base = FAKE_BASE_MS[op] * tokens / 128
    return base * FAKE_SMS / sms if op_class == "compute" else base


def fake_profile(model: ModelSpec = TINY_MODEL, workload: Workload = TINY_WL,
                 tokens=FAKE_TOKENS, sms=FAKE_SM_GRID, skip_ops=()) -> ProfileTable:
    rows = []
    for op in layer_ops(model, workload):
        if op.name in skip_ops:
            continue
        for t in tokens:
            for s in sms:
                rows.append((op.name, "fake", t, op_context(op, workload), s,
                             fake_time(op.op_class, op.name, t, s)))
    return ProfileTable(pd.DataFrame(rows, columns=["op", "impl", "num_tokens", "context", "sm_count",
                                                    "time_ms"]), fake_meta())


def table_from_points(points: dict, num_sms: int = FAKE_SMS) -> ProfileTable:
    """points: {(op, context): {(tokens, sms): time_ms}} -> a fake ProfileTable."""
    rows = [(op, "fake", t, ctx, s, ms) for (op, ctx), grid in points.items() for (t, s), ms in grid.items()]
    return ProfileTable(pd.DataFrame(rows, columns=["op", "impl", "num_tokens", "context", "sm_count",
                                                    "time_ms"]), fake_meta(num_sms))


@pytest.fixture
def tiny_problem():
    from nfsearch.cost import make_problem
    return make_problem(TINY_MODEL, TINY_WL, fake_profile(), num_layers=2)


@pytest.fixture
def tiny_split_plan(tiny_problem):
    from nfsearch.search.baselines import equal_split_plan
    return equal_split_plan(tiny_problem, 2)


@pytest.fixture
def nvml_device():
    """GPU 0's NVML handle (runtime/power.py), closed after the test; skips without torch, CUDA or NVML."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from nfsearch.runtime import power
    device, note = power.open_device(0)
    if device is None:
        pytest.skip(note)
    with device:
        yield device


def run_interpreted(script: str, timeout_s: float = 120) -> dict:
    """tests/<script> in a child process under Triton's interpreter (TRITON_INTERPRET must be set before
    the kernels load); its stdout is JSON. Skips where triton is not installed."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton: its interpreter runs on the CPU)")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [
        str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(root / "tests" / script)], check=False, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)
