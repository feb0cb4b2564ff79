"""Scheduler: batch shapes worked out by hand, chunked prefill, admission, preemption, refusal, async.

A fake device (no torch) runs each batch: it resolves input ids -1 from the previous batch's sampled
ids, writes every row's (request, position, token) into a dict standing for the paged KV cache, reads
back each request's whole context through its page table (so a page shared or reused too early shows
up as a wrong entry), and samples token f(request, position), so every request's right output is known.
"""

import random

import pytest

from nfsearch.errors import NfsearchError
from nfsearch.serving.pages import PageManager
from nfsearch.serving.scheduler import (
    Bucket,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    Sequence,
    default_buckets,
)

EOS = 0


def fake_token(seq_id: int, position: int, vocab: int = 50) -> int:
    return random.Random(seq_id * 100_003 + position).randrange(vocab)


def expected_token(seq: Sequence, position: int) -> int:
    return seq.prompt_ids[position] if position < seq.prompt_len else fake_token(seq.seq_id, position)


class FakeDevice:
    def __init__(self, page_size: int):
        self.page_size = page_size
        self.cache: dict[int, tuple[int, int, int]] = {}   # slot -> (seq_id, position, token)
        self.prev_sampled: list[int] = []

    def run(self, batch) -> list[int]:
        ids = [self.prev_sampled[r] if i == -1 else i for i, r in zip(batch.input_ids, batch.prev_rows)]
        row_seqs = [s for s in batch.seqs[:batch.num_decode]]
        for seq, n in zip(batch.seqs[batch.num_decode:], batch.chunk_lens):
            row_seqs += [seq] * n
        for seq, pos, token, slot in zip(row_seqs, batch.positions, ids, batch.slot_mapping):
            assert token == expected_token(seq, pos), (seq.seq_id, pos)
            self.cache[slot] = (seq.seq_id, pos, token)
        contexts = batch.context_lens + [p + n for p, n in zip(batch.prefix_lens, batch.chunk_lens)]
        for seq, table, ctx in zip(batch.seqs, batch.page_tables, contexts):
            for pos in range(ctx):
                slot = table[pos // self.page_size] * self.page_size + pos % self.page_size
                assert self.cache[slot] == (seq.seq_id, pos, expected_token(seq, pos)), (seq.seq_id, pos)
        self.prev_sampled = [fake_token(s.seq_id, batch.positions[r] + 1)
                             for s, r in zip(batch.sample_seqs, batch.logit_rows)]
        return self.prev_sampled


def drive(sched: Scheduler, is_async: bool, device: FakeDevice | None = None, max_iterations: int = 20_000) -> list:
    """Run the scheduler to the end; async: schedule(i+1) and launch before postprocess(i)."""
    device = device or FakeDevice(sched.pages.page_size)
    in_flight, batches, now = None, [], 0.0
    for _ in range(max_iterations):
        if not (sched.has_work() or in_flight):
            return batches
        now += 1.0
        batch = sched.schedule(now_s=now)
        sched.pages.check_no_leaks(list(sched.running) + list(sched.waiting))
        sampled = device.run(batch) if batch else None
        if batch:
            batches.append(batch)
        if is_async:
            if in_flight:
                sched.postprocess(in_flight[0], in_flight[1], now)
            in_flight = (batch, sampled) if batch else None
        elif batch:
            sched.postprocess(batch, sampled, now)
    raise AssertionError("requests did not finish")


def make_seq(seq_id, prompt_len, max_tokens, ignore_eos=True, min_tokens=0):
    prompt = [100 + 10 * seq_id + i for i in range(prompt_len)]
    return Sequence(seq_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos,
                                                   min_tokens=min_tokens))


def small_scheduler(num_pages=16, page_size=4, dense_batch=8, max_decode=4, **kw):
    cfg = SchedulerConfig(dense_batch, max_decode, page_size=page_size, max_model_len=kw.pop("max_model_len", 64),
                          eos_token_ids=(EOS,), **kw)
    return Scheduler(cfg, PageManager(num_pages, page_size))


def test_two_requests_by_hand_async():
    sched = small_scheduler()
    a, b = make_seq(0, 5, 3), make_seq(1, 6, 2)
    sched.add(a), sched.add(b)
    b0 = sched.schedule(0.0)   # A's whole prompt (pages 0, 1), then 3 of B's 6 (page 2): budget 8
    assert (b0.num_decode, b0.input_ids) == (0, [100, 101, 102, 103, 104, 110, 111, 112])
    assert b0.positions == [0, 1, 2, 3, 4, 0, 1, 2]
    assert b0.slot_mapping == [0, 1, 2, 3, 4, 8, 9, 10]
    assert (b0.chunk_starts, b0.chunk_lens, b0.prefix_lens) == ([0, 5], [5, 3], [0, 0])
    assert (b0.page_tables, b0.logit_rows, b0.sample_seqs) == ([[0, 1], [2]], [4], [a])
    b1 = sched.schedule(1.0)   # before b0's postprocess: A decodes from b0's sample 0, B's prompt ends
    assert (b1.num_decode, b1.input_ids, b1.prev_rows) == (1, [-1, 113, 114, 115], [0, -1, -1, -1])
    assert (b1.positions, b1.slot_mapping, b1.context_lens) == ([5, 3, 4, 5], [5, 11, 12, 13], [6])
    assert (b1.chunk_starts, b1.chunk_lens, b1.prefix_lens) == ([1], [3], [3])
    assert (b1.page_tables, b1.logit_rows, b1.sample_seqs) == ([[0, 1], [2, 3]], [0, 3], [a, b])
    assert b1.sample_steps == [1, 0]
    assert sched.postprocess(b0, [7], 2.0) == [] and a.output_ids == [7] and a.first_token_s == 2.0
    b2 = sched.schedule(2.0)   # both decode on b1's samples; B's first token was sampled at row 3 -> index 1
    assert (b2.num_decode, b2.input_ids, b2.prev_rows) == (2, [-1, -1], [0, 1])
    assert (b2.positions, b2.slot_mapping, b2.context_lens) == ([6, 6], [6, 14], [7, 7])
    assert b2.chunk_lens == [] and b2.sample_steps == [2, 1] and b2.bucket == Bucket(8, 4, 8, 16)
    sched.postprocess(b1, [8, 9, 99], 3.0)              # padding after the 2 logit rows is ignored
    assert sched.schedule(3.0) is None                   # A has 3 of 3 tokens, B 2 of 2: wait for b2
    assert sched.postprocess(b2, [5, 6], 4.0) == [a, b]
    assert (a.output_ids, b.output_ids, a.finish_reason) == ([7, 8, 5], [9, 6], "length")
    assert a.token_times == [2.0, 3.0, 4.0] and not sched.has_work()
    sched.pages.check_no_leaks()


def test_sync_decode_rows_carry_known_ids():
    sched = small_scheduler()
    a = make_seq(0, 3, 3)
    sched.add(a)
    b0 = sched.schedule()
    sched.postprocess(b0, [42], 1.0)
    b1 = sched.schedule()
    assert (b1.input_ids, b1.prev_rows, b1.positions, b1.slot_mapping) == ([42], [-1], [3], [3])


def test_chunked_prefill_across_iterations():
    sched = small_scheduler(dense_batch=8)
    a = make_seq(0, 20, 2)
    sched.add(a)
    shapes = []
    for _ in range(3):
        b = sched.schedule()
        shapes.append((b.chunk_starts, b.chunk_lens, b.prefix_lens, b.logit_rows, b.positions[0]))
        if b.logit_rows:
            sched.postprocess(b, [1], 1.0)
        else:
            sched.postprocess(b, [], 1.0)
    assert shapes == [([0], [8], [0], [], 0), ([0], [8], [8], [], 8), ([0], [4], [16], [3], 16)]
    assert a.output_ids == [1] and a.page_table == [0, 1, 2, 3, 4]


def test_admission_stops_at_predicted_peak_kv():
    # each request: 8 + 8 tokens at its peak = 4 pages of 4; 10 pages hold two such peaks, not three
    sched = small_scheduler(num_pages=10, dense_batch=64)
    seqs = [make_seq(i, 8, 8) for i in range(3)]
    for s in seqs:
        sched.add(s)
    b0 = sched.schedule(0.0)
    assert b0.seqs == seqs[:2] and list(sched.waiting) == [seqs[2]]
    assert sched.pages.num_free_pages == 6        # room for the third prompt, but not for its peak
    device = FakeDevice(4)
    sched.postprocess(b0, device.run(b0), 0.0)
    batches = drive(sched, is_async=False, device=device)
    assert seqs[2].admitted_s >= min(seqs[0].finish_s, seqs[1].finish_s) and sched.num_preemptions == 0
    assert all(len(s.output_ids) == 8 for s in seqs)
    assert max(len(b.seqs) for b in batches) == 2


def test_admission_with_predicted_output_len_overcommits():
    sched = small_scheduler(num_pages=10, dense_batch=64, predicted_output_len=1)   # peak 9 tokens: 3 pages
    for i in range(4):
        sched.add(make_seq(i, 8, 8))
    assert len(sched.schedule().seqs) == 3


def test_preemption_by_hand_newest_goes_back_to_the_front():
    # 4 pages of 4 tokens; admission assumes 1 output token, so A and B (4 + 8 each) are both admitted
    sched = small_scheduler(num_pages=4, dense_batch=16, predicted_output_len=1)
    a, b, c = make_seq(0, 4, 8), make_seq(1, 4, 8), make_seq(2, 4, 1)
    for s in (a, b, c):
        sched.add(s)
    device = FakeDevice(4)
    for i in range(5):          # prompts on pages 0 and 1, then positions 4-7 on pages 2 and 3
        batch = sched.schedule(float(i))
        assert batch.seqs == [a, b] and list(sched.waiting) == [c]
        sched.postprocess(batch, device.run(batch), float(i))
    assert (a.page_table, b.page_table, sched.pages.num_free_pages) == ([0, 2], [1, 3], 0)
    batch = sched.schedule(5.0)  # A's position 8 needs a page: B, the newest, is preempted
    assert batch.seqs == [a] and (batch.positions, batch.slot_mapping) == ([8], [4])
    assert list(sched.waiting) == [b, c] and b.page_table == [] and b.num_computed == 0
    assert (sched.num_preemptions, b.num_preemptions, len(b.output_ids)) == (1, 1, 5)
    sched.postprocess(batch, device.run(batch), 5.0)
    batches = drive(sched, is_async=False, device=device)
    redo = next(x for x in batches if b in x.seqs)   # B recomputes its prompt and its 5 outputs, then samples
    assert (redo.chunk_lens, redo.prefix_lens, redo.sample_steps) == ([9], [0], [5])
    for s in (a, b, c):
        assert s.output_ids == [fake_token(s.seq_id, s.prompt_len + k) for k in range(s.sampling.max_tokens)]
    sched.pages.check_no_leaks()


def random_trace(num, seed, max_prompt=30, max_out=30, **kw):
    rng = random.Random(seed)
    return [make_seq(i, rng.randint(1, max_prompt), rng.randint(1, max_out), **kw) for i in range(num)]


@pytest.mark.parametrize("is_async", [False, True])
def test_every_request_finishes_with_a_cache_10x_too_small(is_async):
    seqs = random_trace(40, seed=3)
    pages_needed = sum(-(-(s.prompt_len + s.sampling.max_tokens) // 4) for s in seqs)
    num_pages = max(pages_needed // 10, max(-(-(s.prompt_len + s.sampling.max_tokens) // 4) for s in seqs))
    sched = small_scheduler(num_pages=num_pages, dense_batch=32, max_decode=16, predicted_output_len=1)
    for s in seqs:
        assert sched.add(s)
    drive(sched, is_async)
    assert sched.num_preemptions > 0
    for s in seqs:
        assert s.is_finished and s.output_ids == [fake_token(s.seq_id, s.prompt_len + k)
                                                  for k in range(s.sampling.max_tokens)]
    sched.pages.check_no_leaks()


def test_conservative_admission_never_preempts():
    seqs = random_trace(30, seed=4)
    sched = small_scheduler(num_pages=20, dense_batch=32, max_decode=16)
    for s in seqs:
        sched.add(s)
    drive(sched, is_async=True)
    assert sched.num_preemptions == 0 and all(len(s.output_ids) == s.sampling.max_tokens for s in seqs)


def test_over_long_request_refused_with_reason_rest_run():
    sched = small_scheduler(num_pages=8, max_model_len=32)
    ok1, too_long, ok2 = make_seq(0, 5, 4), make_seq(1, 30, 8), make_seq(2, 20, 12)
    assert sched.add(ok1) and not sched.add(too_long) and sched.add(ok2)
    assert too_long.error == "prompt of 30 tokens + max_tokens 8 exceeds the model's context 32"
    assert too_long.finish_reason == "error" and too_long.is_finished and sched.refused == [too_long]
    drive(sched, is_async=True)
    assert (len(ok1.output_ids), len(ok2.output_ids), too_long.output_ids) == (4, 12, [])
    assert ok1.error is None and ok2.error is None


def test_request_needing_more_pages_than_the_cache_is_refused():
    sched = small_scheduler(num_pages=4, max_model_len=64)
    big = make_seq(0, 10, 10)          # 20 tokens = 5 pages of 4
    assert not sched.add(big)
    assert big.error == "prompt of 10 tokens + max_tokens 10 needs 5 KV pages; the cache holds 4"
    assert sched.refused == [big] and not sched.has_work()


@pytest.mark.parametrize("predicted", [None, 2])
def test_async_and_sync_give_the_same_tokens(predicted):
    outputs = {}
    for is_async in (False, True):
        seqs = random_trace(30, seed=5, ignore_eos=False, min_tokens=2)
        sched = small_scheduler(num_pages=24, dense_batch=16, max_decode=8, predicted_output_len=predicted)
        for s in seqs:
            sched.add(s)
        drive(sched, is_async)
        outputs[is_async] = {s.seq_id: s.output_ids for s in seqs}
        assert any(s.finish_reason == "stop" for s in seqs)
        assert sched.num_discarded_tokens == 0 if not is_async else sched.num_discarded_tokens > 0
        sched.pages.check_no_leaks()
    assert outputs[False] == outputs[True]
    for tokens in outputs[True].values():   # EOS ends a request only after min_tokens outputs
        assert EOS not in tokens[2:-1]


def test_default_buckets_and_smallest_covering_bucket():
    buckets = default_buckets(1000, 256, 8192, 16)
    assert sorted({b.max_tokens for b in buckets}) == [128, 256, 512, 1000]
    assert {b.max_context for b in buckets} == {2048, 8192}
    assert Bucket(1000, 256, 8, 8192) in buckets and Bucket(128, 128, 8, 2048) in buckets
    sched = Scheduler(SchedulerConfig(1000, 256, max_model_len=8192), PageManager(1000, 16))
    sched.add(make_seq(0, 100, 4))
    assert sched.schedule().bucket == Bucket(128, 128, 8, 2048)


def test_batch_limited_by_the_largest_bucket():
    cfg = SchedulerConfig(100, 8, buckets=[Bucket(8, 4, 2, 64), Bucket(4, 2, 1, 32)], page_size=4,
                          max_model_len=64)
    sched = Scheduler(cfg, PageManager(32, 4))
    for i in range(3):
        sched.add(make_seq(i, 6, 2))
    b = sched.schedule()
    assert b.num_tokens == 8 and b.chunk_lens == [6, 2] and b.bucket == Bucket(8, 4, 2, 64)


def test_buckets_without_a_covering_one_are_refused():
    with pytest.raises(NfsearchError, match="covers all the others"):
        SchedulerConfig(64, 8, buckets=[Bucket(64, 4, 8, 64), Bucket(32, 8, 8, 64)])


def test_postprocess_out_of_order_is_an_error():
    sched = small_scheduler()
    sched.add(make_seq(0, 3, 4)), sched.add(make_seq(1, 3, 4))
    b0 = sched.schedule()
    b1 = sched.schedule()
    with pytest.raises(RuntimeError, match="schedule order"):
        sched.postprocess(b1, [1, 1], 0.0)
    with pytest.raises(RuntimeError, match="two batches in flight"):
        sched.schedule()
    assert sched.postprocess(b0, [1, 1], 0.0) == []
