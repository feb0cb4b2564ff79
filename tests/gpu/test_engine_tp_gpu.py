"""GPU, two or more: the engine across TP=2 ranks (NCCL, one GPU each, CUDA graphs with the all-reduces
and the sampled-ids broadcast captured): teacher-forced logits within bf16 tolerance of a one-process
engine on the same random weights, the ranks agree on every token, every request finishes.
Skipped with fewer than 2 GPUs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]

from conftest import ENGINE_TINY as TINY

from nfsearch.runtime import engine_tp
from nfsearch.runtime.engine import Engine, TraceShape
from nfsearch.runtime.tp import spawn_ranks
from nfsearch.serving.traces import Request


def _kwargs(reqs) -> dict:
    return {"dtype": "bf16", "gpu_memory_utilization": 0.25, "dense_batch": 128, "max_decode": 32,
            "num_pages": 256, "trace_shape": TraceShape.of(reqs)}


def test_tp2_nccl_matches_one_gpu(tmp_path):
    reqs = [Request(i, 5 + (7 * i) % 57, 3 + (5 * i) % 23) for i in range(32)]
    ref = Engine(TINY, device="cuda", **_kwargs(reqs))
    ref_logits = engine_tp.teacher_forced_logits(ref)
    del ref
    torch.cuda.empty_cache()
    pattern = str(tmp_path / "rank{rank}.pt")
    spawn_ranks(engine_tp.rank_main, 2, "nccl",
                (TINY, _kwargs(reqs) | {"is_debug": True}, reqs, None, pattern, True))
    parts = [torch.load(pattern.format(rank=r)) for r in range(2)]
    assert parts[0]["tokens"] == parts[1]["tokens"]
    assert all(len(parts[0]["tokens"][r.request_id]) == r.output_len for r in reqs)
    for part in parts:
        for mine, want in zip(part["logits"], ref_logits):
            scale = want.abs().max().item()
            torch.testing.assert_close(mine, want, rtol=0.05, atol=0.02 * scale)
