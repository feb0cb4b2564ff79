"""The engine loop on the CPU (eager, torch paged attention): async and sync give the same tokens, the
host reads each iteration only after launching the next, every request finishes through preemption
with no page leaked, refusals come before anything is allocated, and `nfsearch bench` end to end."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import ENGINE_TINY as TINY

from nfsearch.cli import main
from nfsearch.errors import NfsearchError
from nfsearch.runtime import engine_memory as mem
from nfsearch.runtime.engine import Engine, TraceShape
from nfsearch.serving.traces import Request, load_trace

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _requests(n: int, seed: int = 0) -> list[Request]:
    """Mixed lengths, so batches mix decode rows with prefill chunks of different prefixes."""
    return [Request(i, 5 + (7 * i + seed) % 37, 3 + (5 * i + seed) % 11) for i in range(n)]


def _engine(requests, **kw) -> Engine:
    kw.setdefault("dense_batch", 64)
    kw.setdefault("max_decode", 16)
    return Engine(TINY, device="cpu", dtype="fp32", trace_shape=TraceShape.of(requests), **kw)


def _tokens(run) -> dict[int, list[int]]:
    return {s.seq_id: list(s.output_ids) for s in run.sequences}


def test_async_and_sync_give_the_same_tokens():
    reqs = _requests(24)
    eng = _engine(reqs)
    sampling = {"temperature": 0.9, "top_k": 20, "seed": 7}     # the device-side sampler, not only argmax
    async_run = eng.run(reqs, sampling=sampling)
    eng.is_async = False
    sync_run = eng.run(reqs, sampling=sampling)
    assert _tokens(async_run) == _tokens(sync_run)
    assert all(len(s.output_ids) == r.output_len for s, r in zip(sync_run.sequences, reqs))
    assert all(s.finish_reason == "length" and not s.page_table for s in async_run.sequences)


def test_host_reads_each_iteration_after_launching_the_next():
    """Async: launch i+1 before reading i (one read per launch); sync: read right after each launch."""
    reqs = _requests(12)
    eng = _engine(reqs)
    events = []
    launch, read = eng.runner.launch, eng.runner.read
    eng.runner.launch = lambda batch, v: events.append(("L", batch.batch_id)) or launch(batch, v)
    eng.runner.read = lambda launched: events.append(("R", launched.batch.batch_id)) or read(launched)
    run = eng.run(reqs)
    n = len(run.iterations)
    assert n > 3 and len(events) == 2 * n
    assert events[:3] == [("L", 0), ("L", 1), ("R", 0)]
    for k, (kind, bid) in enumerate(events):
        if kind == "R":     # read i only once i+1 is launched (or nothing is left to launch)
            assert ("L", bid + 1) in events[:k] or bid == n - 1
    events.clear()
    eng.is_async = False
    eng.run(reqs)
    assert events[:4] == [("L", 0), ("R", 0), ("L", 1), ("R", 1)]


def test_every_request_finishes_with_a_cache_ten_times_too_small():
    reqs = [Request(i, 40, 40) for i in range(20)]          # 20 x 80 tokens = 100 pages of 16 at peak
    big = _engine(reqs).run(reqs)
    eng = _engine(reqs, num_pages=10, predicted_output_len=1)  # admits as if 1 token: runs out, preempts
    run = eng.run(reqs)
    assert run.num_preemptions > 0 and run.peak_used_pages <= 10
    assert all(s.finish_reason == "length" and len(s.output_ids) == 40 for s in run.sequences)
    assert all(not s.page_table for s in run.sequences)       # run() also checked the page manager's accounts
    assert _tokens(run) == _tokens(big)                       # recompute gives the same greedy tokens


def test_over_long_request_is_refused_and_the_rest_run():
    reqs = _requests(6) + [Request(6, 500, 40)]               # 540 > the model's 512 positions
    eng = _engine(reqs[:6])
    finished = []
    run = eng.run(reqs, on_finish=finished.append)
    refused = [s for s in run.sequences if s.error]
    assert [s.seq_id for s in refused] == [6] and "exceeds the model's context 512" in refused[0].error
    assert len(finished) == 7 and all(len(s.output_ids) == r.output_len for s, r in zip(run.sequences, reqs[:6]))


def test_dense_batch_that_cannot_fit_is_refused_before_allocation(monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("weights loaded before the refusal")
    monkeypatch.setattr("nfsearch.runtime.engine.load_weights", no_loading)
    reqs = _requests(4)
    with pytest.raises(NfsearchError, match=r"dense batch 60000 .*does not fit.*GiB"):
        _engine(reqs, dense_batch=60000, max_decode=256, memory_bytes=64 << 20)
    with pytest.raises(NfsearchError, match="utilization"):
        _engine(reqs, gpu_memory_utilization=1.5)


def test_memory_plan_numbers():
    # an E1-sized cache: about 284 requests of 1024 + 512 at once, 300 decode + 600 prefill per iteration
    dense, decode = mem.choose_batch(437_000, 1024, 512, 1536)
    assert decode == 288 and 832 <= dense <= 896
    plan = mem.plan_pages(80 << 30, 0.9, 16 << 30, 2 << 30, 1 << 29, 2 << 20, 16, 100, True, "x")
    assert plan.num_pages == (int((80 << 30) * 0.9) - (16 << 30) - (2 << 30) - (1 << 29) - mem.SAFETY_BYTES) // (2 << 20)
    with pytest.raises(NfsearchError, match="needed"):
        mem.plan_pages(20 << 30, 0.9, 16 << 30, 2 << 30, 1 << 29, 2 << 20, 16, 10_000, True, "x")


def test_bench_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "b.json"
    r = CliRunner().invoke(main, ["bench", "--model", TINY, "--trace", "const:24:8", "--num-requests", "16",
                                  "--device", "cpu", "--dense-batch", "64", "-o", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    s = report["summary"]
    assert (s["num_finished"], s["input_tokens"], s["output_tokens"]) == (16, 16 * 24, 16 * 8)
    assert s["total_tokens_per_s"] > 0 and report["num_refused"] == 0
    assert report["batches"]["plan"]["mean_dense_batch"] > 0 and "total tokens/s per GPU" in r.output


def test_a_failing_analysis_after_the_run_keeps_the_run(tmp_path, monkeypatch):
    """The per-bucket energy fit (one of the blocks computed after the run) raising: the bench still
    writes the run's numbers, the block records the error and the report says it was not computed."""
    from nfsearch.runtime import bench_engine

    def broken(*args, **kwargs):
        raise ValueError("singular fit")

    monkeypatch.setattr(bench_engine, "bucket_energy", broken)
    out = tmp_path / "b.json"
    r = CliRunner().invoke(main, ["bench", "--model", TINY, "--trace", "const:24:8", "--num-requests", "8",
                                  "--device", "cpu", "--dense-batch", "64", "-o", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["summary"]["num_finished"] == 8
    assert report["buckets_energy"] == {"error": "ValueError: singular fit"}
    assert "warning: energy per bucket failed after the run: ValueError: singular fit" in r.output
    assert "buckets_energy: not computed (ValueError: singular fit)" in r.output


def test_malformed_trace_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_len": 10, "output_len": 4}\n{"prompt_len": "ten"}\n')
    r = CliRunner().invoke(main, ["bench", "--model", TINY, "--trace", str(bad), "--device", "cpu",
                                  "-o", str(tmp_path / "b.json")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("nfsearch: error:")]
    assert len(errors) == 1 and "line 2" in errors[0] and not (tmp_path / "b.json").exists()


def test_w7_is_e1s_steady_state():
    r = CliRunner().invoke(main, ["analyze", "--workload", "W7"])
    assert r.exit_code == 0, r.output
    assert "W7 e1-steady (900 tokens, 300 decode" in r.output
    trace = load_trace("E1", 3)
    assert (trace.requests[0].prompt_len, trace.requests[0].output_len) == (1024, 512)
