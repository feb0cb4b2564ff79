"""The engine's start-up GEMM choice (runtime/gemm_choice.py): the rule, and a choice wired into the
bucket models that the runner captures. Timing needs a GPU (tests/gpu/test_engine.py)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent))
from conftest import ENGINE_TINY as TINY

from nfsearch.runtime import gemm_choice
from nfsearch.runtime.engine import Engine, TraceShape
from nfsearch.runtime.kernels import IMPLS
from nfsearch.serving.traces import Request


def test_cublas_stays_unless_a_candidate_is_five_percent_faster():
    assert gemm_choice.choose({"torch": 1.0, "tma": 0.96}) == "torch"
    assert gemm_choice.choose({"torch": 1.0, "tma": 0.95}) == "tma"
    assert gemm_choice.choose({"torch": 0.31, "tma": 0.16, "triton": 0.15}) == "triton"
    assert gemm_choice.choose({"torch": 1.0}) == "torch"
    assert gemm_choice.choose({"torch": 1.0, "tma": 0.5}, min_gain=0.6) == "torch"


def _engine(**kw):
    reqs = [Request(i, 12, 4, 0.0) for i in range(6)]
    return Engine(TINY, device="cpu", dtype="fp32", trace_shape=TraceShape.of(reqs), **kw)


def test_the_cpu_engine_chooses_nothing_and_a_choice_gives_its_buckets_their_kernels():
    engine = _engine()
    assert engine.gemm_choice is None and not engine.runner.bucket_models
    layer = engine.weights.layers[0]
    shapes = gemm_choice.gemm_shapes(layer)
    assert shapes["ug"] == tuple(layer.wug.shape) and set(shapes) == {"kqv", "o", "ug", "d"}
    rows = engine.buckets[-1].max_tokens
    choices = [gemm_choice.GemmChoice(rows, "ug", {"torch": 0.31, "tma": 0.16}, "tma"),
               gemm_choice.GemmChoice(rows, "kqv", {"torch": 0.1, "tma": 0.12}, "torch")]
    block = gemm_choice.apply(engine, choices)
    chosen = [b for b in engine.buckets if b.max_tokens == rows]
    assert chosen and set(engine.runner.bucket_models) == {("plan", b) for b in chosen}
    twin = engine.runner.bucket_models[("plan", chosen[0])]
    assert twin.ops["ug"] is IMPLS["ug"]["tma"] and twin.ops["kqv"] is IMPLS["kqv"]["torch"]
    assert twin.ops["norm1"] is IMPLS["norm1"]["triton"]             # the engine's other kernels kept
    assert engine.model.ops["ug"] is IMPLS["ug"]["torch"]             # the engine's model untouched
    assert block["choices"][0] == {"num_rows": rows, "op": "ug", "times_ms": {"torch": 0.31, "tma": 0.16},
                                   "impl": "tma"}


def test_bench_cli_takes_no_gemm_choice(tmp_path):
    from click.testing import CliRunner

    from nfsearch.cli import main
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", "--model", TINY, "--device", "cpu", "--trace", "const:8:3",
                                    "--num-requests", "3", "--no-gemm-choice", "-o", str(out)])
    assert res.exit_code == 0, res.output
    import json
    assert json.loads(out.read_text())["engine"]["gemm_choice"] is None


def test_a_qkv_bias_keeps_cublas_for_the_qkv_gemm():
    from types import SimpleNamespace

    import torch
    w = {name: torch.empty(8, 16) for name in ("wqkv", "wo", "wug", "wd")}
    assert set(gemm_choice.gemm_shapes(SimpleNamespace(**w, bqkv=None))) == {"kqv", "o", "ug", "d"}
    assert set(gemm_choice.gemm_shapes(SimpleNamespace(**w, bqkv=torch.empty(16)))) == {"o", "ug", "d"}
