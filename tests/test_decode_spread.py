"""Decode requests spread over an overlapped bucket's decode nano-batches by KV work (serving.decode_spread,
issue 25 item 3): placement balanced within one request's context and sticky; the step fields laid out
with the prefill after the last used slot and the logit order kept; the CPU engine's tokens the same with
the spreading on and off."""

from pathlib import Path

import pytest

from nfsearch.serving.decode_spread import DecodeSpread, place, range_loads, spread_fields
from tests.conftest import ENGINE_TINY

CONTEXTS = [1000, 20, 30, 900, 50, 400, 300, 10, 700, 64, 5]
RANGES = [(0, 6), (6, 32)]


def _loads(contexts, slots, ranges):
    per_slot = [0] * ranges[-1][1]
    for c, s in zip(contexts, slots):
        per_slot[s] = c
    return range_loads(per_slot, ranges)


def test_placement_balances_kv_work_within_one_requests_context():
    slots = place(CONTEXTS, RANGES, 32)
    assert len(set(slots)) == len(slots) and all(0 <= s < 32 for s in slots)
    loads = _loads(CONTEXTS, slots, RANGES)
    assert max(loads) - min(loads) <= max(CONTEXTS)
    assert max(loads) - min(loads) <= 100          # here LPT gets much closer than the bound
    by_count = _loads(CONTEXTS, list(range(len(CONTEXTS))), RANGES)   # the scheduler's rows [0, n)
    assert max(by_count) - min(by_count) > 1000
    three = [(0, 4), (4, 9), (9, 32)]
    loads = _loads(CONTEXTS, place(CONTEXTS, three, 32), three)
    assert max(loads) - min(loads) <= max(CONTEXTS)


def test_placement_is_sticky_and_moves_only_to_rebalance():
    first = place(CONTEXTS, RANGES, 32)
    grown = [c + 1 for c in CONTEXTS]                       # one decode step later
    assert place(grown, RANGES, 32, first) == first
    # a new request joins: the others keep their slots
    again = place(grown + [200], RANGES, 32, first + [None])
    assert again[:-1] == first and again[-1] not in first
    # the heaviest request leaves range 0's partner: the rest is rebalanced, moving as few as needed
    gone = [c if k != CONTEXTS.index(900) else 0 for k, c in enumerate(grown)]
    keep = [k for k, c in enumerate(gone) if c]
    moved = place([gone[k] for k in keep], RANGES, 32, [first[k] for k in keep])
    loads = _loads([gone[k] for k in keep], moved, RANGES)
    assert max(loads) - min(loads) <= max(CONTEXTS)
    assert sum(a != b for a, b in zip(moved, [first[k] for k in keep])) <= 2


def test_placement_stays_below_the_rows_prefill_leaves():
    slots = place([100] * 8, RANGES, 10)                    # 22 prefill rows of a 32-row bucket
    assert max(slots) < 10 and len(set(slots)) == 8
    with pytest.raises(ValueError, match="usable slots"):
        place([100] * 8, RANGES, 7)
    # a previous slot past the limit is given up
    assert max(place([5, 5], RANGES, 8, [20, 1])) < 8


def _fields():
    """3 decode requests (the 2nd reads the previous batch's sample 4) then a 3-token chunk sampling its last row."""
    return {"input_ids": [11, -1, 13, 20, 21, 22], "prev_rows": [-1, 4, -1, -1, -1, -1],
            "positions": [30, 7, 99, 0, 1, 2], "slot_mapping": [130, 207, 399, 500, 501, 502],
            "context_lens": [31, 8, 100], "chunk_starts": [3], "chunk_lens": [3], "prefix_lens": [0],
            "logit_rows": [0, 1, 2, 5], "temperature": [0.0] * 4, "top_p": [1.0] * 4, "top_k": [0] * 4,
            "seed": [1, 2, 3, 4], "sample_step": [5, 6, 7, 0],
            "page_tables": [[8, 9], [12], [24, 25, 26, 27, 28, 29, 30], [31]]}


def test_spread_fields_move_rows_tables_and_logit_rows_together():
    out = spread_fields(_fields(), 3, [6, 0, 7])
    assert out["input_ids"] == [-1, 0, 0, 0, 0, 0, 11, 13, 20, 21, 22]
    assert out["prev_rows"] == [4] + [-1] * 10
    assert out["positions"][:8] == [7, 0, 0, 0, 0, 0, 30, 99] and out["slot_mapping"][1:6] == [-1] * 5
    assert out["context_lens"] == [8, 0, 0, 0, 0, 0, 31, 100]
    assert out["page_tables"] == [[12], [], [], [], [], [], [8, 9], [24, 25, 26, 27, 28, 29, 30], [31]]
    assert out["chunk_starts"] == [8] and out["chunk_lens"] == [3]
    # the logit rows keep their order: sample k is still request k's (prev_rows index the samples)
    assert out["logit_rows"] == [6, 0, 7, 10] and out["seed"] == [1, 2, 3, 4]


def test_step_inputs_of_a_spread_batch():
    torch = pytest.importorskip("torch")
    from nfsearch.runtime.step_inputs import make_step_inputs
    from nfsearch.serving.batch import Bucket
    step = make_step_inputs(Bucket(16, 8, 2, 128), 16, "cpu", **spread_fields(_fields(), 3, [6, 0, 7]))
    assert step.context_lens.tolist() == [8, 0, 0, 0, 0, 0, 31, 100]
    assert step.page_tables[0, 0] == 12 and step.page_tables[6, :2].tolist() == [8, 9]
    assert step.page_tables[1].abs().sum() == 0 and step.page_tables[8, 0] == 31     # chunk 0 at row B
    assert torch.equal(step.logit_rows[:4], torch.tensor([6, 0, 7, 10], dtype=torch.int32))


def test_a_bucket_spread_keeps_slots_across_batches():
    spread = DecodeSpread(((0, 2), (2, 8)), max_tokens=16)
    seqs = ["a", "b", "c"]
    fields = _fields()
    out = spread.apply(fields, seqs, 3)
    loads = range_loads(out["context_lens"], spread.ranges)
    assert max(loads) - min(loads) <= 100 and spread.num_moves == 0
    first = dict(spread.slot_of)
    fields["context_lens"] = [c + 1 for c in fields["context_lens"]]
    spread.apply(fields, seqs, 3)
    assert spread.slot_of == first and spread.num_moves == 0 and spread.num_batches == 2


def _family_engine(path, reqs, is_spread: bool):
    from nfsearch.runtime.engine import Engine, TraceShape
    engine = Engine(ENGINE_TINY, device="cpu", dtype="fp32", trace_shape=TraceShape.of(reqs), num_pages=256,
                    plans=str(path))
    if not is_spread:
        for model in engine.runner.bucket_models.values():
            model.decode_spread = None
    return engine


def test_engine_tokens_are_the_same_with_the_spreading_on_and_off(one_torch_thread):
    """The two-bucket fixture family whose 32-token bucket splits decode attention over slots [0, 6) and
    [6, 32): spreading moves decode rows (gaps before the prefill, sampled ids read through prev_rows) and
    the greedy tokens stay those of the engine's own layout."""
    from nfsearch.serving.traces import load_trace
    folder = Path(ENGINE_TINY).parent
    reqs = load_trace("const:8:8", 24).requests
    on = _family_engine(folder / "two-buckets-split.family.json", reqs, True)
    top = max(on.buckets)
    spread = on.runner.model_for("plan", top).decode_spread
    assert spread is not None and spread.ranges == ((0, 6), (6, 32))
    assert next(k for k in on.bucket_kernels if k.bucket == top).decode_ranges == ((0, 6), (6, 32))
    layouts, fill = [], on.runner.buffers[top].fill_

    def spy(**fields):
        layouts.append(fields["context_lens"])
        return fill(**fields)

    on.runner.buffers[top].fill_ = spy
    run = on.run(reqs)
    assert spread.num_batches > 0
    assert any(0 in lens for lens in layouts), "no batch was spread over both nano-batches"
    off = _family_engine(folder / "two-buckets-split.family.json", reqs, False).run(reqs)
    assert [s.output_ids for s in run.sequences] == [s.output_ids for s in off.sequences]
    assert all(len(s.output_ids) == 8 for s in run.sequences)
