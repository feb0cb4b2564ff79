"""The engine's GPU kernels in the engine loop, on the CPU: the tiny engine with attention "triton" (paged
decode and prefill, fused RoPE + K/V write, fp8 K/V quantization, the fused fp8 activation quantizers, in
Triton's interpreter) gives the tokens of the torch path, through the same scheduler, pages and runner,
for each numerics setting, and an overlapped plan family's nano-batches on their SM shares against the
sequential family on the torch path (tests/engine_interp.py; about two minutes, so slow)."""

import pytest
from conftest import run_interpreted

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted("engine_interp.py", timeout_s=600)


@pytest.mark.parametrize("setting", ["fp32", "fp8kv", "fp8", "fp8+fp8kv", "overlapped family"])
def test_triton_path_gives_the_torch_paths_tokens(interpreted, setting):
    got = interpreted[setting]
    assert got["all_finished"] and got["num_tokens"] >= 40
    # fp32 on both paths, different summation orders: greedy ids agree (a near-tie may flip one)
    assert got["token_agreement"] >= 0.95, got
