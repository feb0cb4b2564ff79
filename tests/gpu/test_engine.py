"""The engine on a GPU: CUDA graphs + async scheduling give exactly the tokens of eager + sync, the loop
waits on one event per iteration and nothing else syncs the host, and the KV plan keeps memory inside
the utilization budget."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from conftest import ENGINE_TINY as TINY

from nfsearch.runtime.engine import Engine, TraceShape
from nfsearch.serving.traces import Request

UTILIZATION = 0.25


@pytest.fixture(autouse=True)
def _release_engines():
    """Each test's engine (its cache and graphs) is freed before the next one sizes its own cache."""
    yield
    import gc
    gc.collect()
    torch.cuda.empty_cache()


def _requests(n: int) -> list[Request]:
    return [Request(i, 5 + (7 * i) % 57, 3 + (5 * i) % 23) for i in range(n)]


def _engine(reqs, **kw) -> Engine:
    return Engine(TINY, device="cuda", dtype="bf16", gpu_memory_utilization=UTILIZATION, dense_batch=128,
                  max_decode=32, trace_shape=TraceShape.of(reqs), **kw)


def _tokens(run):
    return {s.seq_id: list(s.output_ids) for s in run.sequences}


def test_graphs_async_equal_eager_sync_and_one_wait_per_iteration():
    reqs = _requests(48)
    eng = _engine(reqs)
    assert eng.use_cuda_graphs and eng.runner.graphs and eng.plan.is_measured
    torch.cuda.set_sync_debug_mode("error")          # any hidden host sync in the loop raises
    try:
        fast = eng.run(reqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert fast.num_host_waits == len(fast.iterations) and fast.num_eager_launches == 0
    assert all(r.gpu_ms > 0 for r in fast.iterations)
    eng.is_async, eng.runner.use_graphs = False, False
    slow = eng.run(reqs)
    assert _tokens(fast) == _tokens(slow)
    assert all(len(s.output_ids) == r.output_len for s, r in zip(fast.sequences, reqs))


def test_sampled_requests_repeat_and_compare_variants_run():
    reqs = _requests(24)
    eng = _engine(reqs, variants=("plan", "baseline"))
    sampling = {"temperature": 0.8, "top_p": 0.9, "seed": 3}
    a = eng.run(reqs, sampling=sampling, compare_every=2)
    assert {r.variant for r in a.iterations} == {"plan", "baseline"}
    assert a.num_eager_launches == len(a.iterations)      # no sampled graphs captured: eager, still correct
    eng.runner.capture(is_greedy=False)
    b = eng.run(reqs, sampling=sampling, compare_every=2)
    assert b.num_eager_launches == 0
    same = sum(x == y for s in a.sequences for x, y in zip(s.output_ids, b.sequences[s.seq_id].output_ids))
    assert same >= 0.95 * sum(r.output_len for r in reqs)   # the variants' norms may round differently


def test_gemm_choice_times_each_bucket_rows_and_its_buckets_run_the_choice():
    from nfsearch.runtime.kernels import IMPLS
    reqs = _requests(24)
    eng = _engine(reqs)
    rows = sorted({b.max_tokens for b in eng.buckets})
    choices = eng.gemm_choice["choices"]
    assert sorted({(c["num_rows"], c["op"]) for c in choices}) == sorted((r, op) for r in rows
                                                                         for op in ("kqv", "o", "ug", "d"))
    assert all(c["times_ms"]["torch"] > 0 for c in choices)
    for c in choices:
        for b in (b for b in eng.buckets if b.max_tokens == c["num_rows"]):
            assert eng.runner.model_for("plan", b).ops[c["op"]] is IMPLS[c["op"]][c["impl"]]
    run = eng.run(reqs)
    assert all(len(s.output_ids) == r.output_len for s, r in zip(run.sequences, reqs))
    off = _engine(reqs, choose_gemms=False)
    assert off.gemm_choice is None and not off.runner.bucket_models


def test_kv_plan_stays_inside_the_budget():
    reqs = _requests(8)
    eng = _engine(reqs)
    free, total = torch.cuda.mem_get_info()
    used = total - free
    assert eng.num_pages == eng.plan.num_pages > 0
    assert used <= total * UTILIZATION + (512 << 20), (used / 2**30, eng.plan.describe())
    assert "KV cache" in eng.describe() and "max concurrency" in eng.describe()
