"""Metrics: whole-run and steady-window tokens/s, TTFT/TPOT percentiles, % of optimal, batch stats."""

import json
from types import SimpleNamespace

import pytest

from nfsearch.serving.batch import Bucket, SamplingParams, Sequence
from nfsearch.serving.metrics import (
    BatchStats,
    Percentiles,
    RequestRecord,
    optimal_tokens_per_s,
    percentile,
    summarize,
)


def records():
    return [RequestRecord(0, 0.0, 1.0, 3.0, 10, 3, [1.0, 2.0, 3.0], admitted_s=0.0),
            RequestRecord(1, 0.0, 2.0, 6.0, 20, 5, [2.0, 3.0, 4.0, 5.0, 6.0], admitted_s=0.0),
            RequestRecord(2, 1.0, 5.0, 7.0, 30, 2, [5.0, 7.0], admitted_s=4.0),
            RequestRecord(3, 0.0, None, None, 9000, 0, [], error="prompt too long")]


def test_summary_by_hand():
    s = summarize(records(), 0.0, 8.0, optimal_tokens_per_s=optimal_tokens_per_s(1e15, 8e9))
    assert (s.num_requests, s.num_finished, s.num_refused) == (4, 3, 1)
    assert (s.input_tokens, s.output_tokens, s.duration_s) == (60, 10, 8.0)
    assert (s.total_tokens_per_s, s.output_tokens_per_s) == (70 / 8, 10 / 8)
    # steady window: first finish (3.0) to last admission (4.0): output tokens at 3, 3, 4; no prompt ends
    assert (s.steady_start_s, s.steady_end_s, s.is_steady_window) == (3.0, 4.0, True)
    assert (s.steady_total_tokens_per_s, s.steady_output_tokens_per_s) == (3.0, 3.0)
    assert s.ttft_s == Percentiles(pytest.approx(7 / 3), 2.0, pytest.approx(3.6), pytest.approx(3.96))
    assert s.tpot_s == Percentiles(pytest.approx(4 / 3), 1.0, pytest.approx(1.8), pytest.approx(1.98))
    assert s.optimal_tokens_per_s == 62_500 and s.pct_of_optimal == pytest.approx(100 * 3 / 62_500)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["ttft_s"]["p50"] == 2.0 and d["steady_total_tokens_per_s"] == 3.0


def test_per_gpu_and_empty_window_falls_back_to_whole_run():
    recs = records()[:2]                      # both admitted at 0, before the first finish
    s = summarize(recs, 0.0, 10.0, num_gpus=2)
    assert not s.is_steady_window and (s.steady_start_s, s.steady_end_s) == (0.0, 10.0)
    assert s.steady_total_tokens_per_s == s.total_tokens_per_s == (30 + 8) / 10 / 2
    assert s.pct_of_optimal is None


def test_percentile_interpolates_and_empty_is_none():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([5.0], 99) == 5.0
    assert Percentiles.of([]) == Percentiles(None, None, None, None)


def test_record_from_sequence():
    seq = Sequence(7, [1, 2, 3], SamplingParams(max_tokens=2), arrival_s=0.5, output_ids=[4, 5],
                   admitted_s=0.6, first_token_s=1.0, finish_s=2.0, token_times=[1.0, 2.0])
    assert RequestRecord.from_sequence(seq) == RequestRecord(7, 0.5, 1.0, 2.0, 3, 2, [1.0, 2.0], 0.6, None)


def test_batch_stats():
    small, big = Bucket(8, 4, 2, 64), Bucket(16, 8, 2, 64)
    stats = BatchStats()
    for num_decode, num_tokens, bucket in [(2, 6, small), (4, 16, big), (3, 8, small)]:
        stats.add(SimpleNamespace(num_decode=num_decode, num_tokens=num_tokens, bucket=bucket))
    d = stats.to_dict()
    assert (d["num_iterations"], d["mean_decode_batch"], d["mean_dense_batch"]) == (3, 3.0, 10.0)
    assert d["padding_fraction"] == 2 / 32
    assert [(h["max_tokens"], h["num_iterations"]) for h in d["bucket_hits"]] == [(8, 2), (16, 1)]
