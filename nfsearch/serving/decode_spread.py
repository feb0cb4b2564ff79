"""Decode requests spread over an overlapped bucket's decode nano-batches by KV work (issue 25 item 3).

An overlapped plan that splits decode attention runs each nano-batch on a fixed range of decode slots
(runtime.overlap_program; decode slot r is row r), cut where the plan's mean batch was cut. The
scheduler lays a batch's decode requests out in rows [0, n): by request count, and a batch smaller
than the plan's fills the first range and leaves the later ones empty. Here each decode request gets a
slot so that the ranges' total contexts (the KV tokens each nano-batch reads) are balanced, and the
batch's step fields are rewritten to that layout:
- decode request j moves to row slots[j] with its per-row fields, context length and page table; the
  slots left over are padding (context 0: the attention writes zeros there, as past the batch);
- the prefill chunks follow the last used slot (all shifted by one offset), so the layout must keep
  used slots + prefill rows <= the bucket's rows: slots are placed below T - prefill rows, which is
  never fewer than the decode requests (the scheduler's token budget);
- the logit rows keep their order (only their row numbers change), so the sampled-ids vector, which the
  next iteration's decode rows read through prev_rows, and Sequence.last_sample_index stay right.

Placement is sticky: a request keeps the slot it had in this bucket's previous batch while that slot is
usable and its range is not the one to unload; new requests go longest first into the lightest range
with room; then, while the heaviest range exceeds the lightest with room by more than the longest
context, the request of the heaviest whose context is nearest half the gap moves over. So the ranges
end within one request's context of each other (where their room allows), and few requests move.
Torch-free: runtime.engine_runner applies it to a bucket model that carries one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROW_FIELDS = {"input_ids": 0, "prev_rows": -1, "positions": 0, "slot_mapping": -1}   # per row: pad value


def place(contexts: list[int], ranges: list[tuple[int, int]], limit: int,
          previous: list[int | None] | None = None) -> list[int]:
    """A decode slot per request: contexts[j] its KV tokens, ranges the nano-batches' slot ranges,
    slots usable below `limit`, previous[j] its slot last time (None: new). Raises ValueError when
    the usable slots are fewer than the requests."""
    usable = [(a, min(e, limit)) for a, e in ranges]
    room = [max(0, e - a) for a, e in usable]
    n = len(contexts)
    if sum(room) < n:
        raise ValueError(f"{n} decode requests, {sum(room)} usable slots")
    previous = previous or [None] * n
    which: list[int | None] = [None] * n
    kept: set[int] = set()
    for j, p in enumerate(previous):
        if p is not None and p not in kept:
            which[j] = next((k for k, (a, e) in enumerate(usable) if a <= p < e), None)
            kept.add(p)
    load, count = [0] * len(usable), [0] * len(usable)
    for j, k in enumerate(which):
        if k is not None:
            load[k] += contexts[j]
            count[k] += 1
    for j in sorted((j for j in range(n) if which[j] is None), key=lambda j: -contexts[j]):
        k = min((k for k in range(len(usable)) if count[k] < room[k]), key=lambda k: (load[k], k))
        which[j], load[k], count[k] = k, load[k] + contexts[j], count[k] + 1
    _rebalance(contexts, which, load, count, room)
    return _slots(which, previous, usable)


def _rebalance(contexts, which, load, count, room) -> None:
    """Move requests from the heaviest range to the lightest with room until they are within the
    longest context of each other (each move shrinks the sum of squared loads: it ends)."""
    longest = max(contexts, default=0)
    while True:
        heavy = max(range(len(load)), key=lambda k: (load[k], -k))
        light = min((k for k in range(len(load)) if k != heavy and count[k] < room[k]),
                    key=lambda k: (load[k], k), default=None)
        if light is None or load[heavy] - load[light] <= longest:
            return
        gap = load[heavy] - load[light]
        j = min((j for j, k in enumerate(which) if k == heavy), key=lambda j: (abs(gap - 2 * contexts[j]), j))
        which[j] = light
        load[heavy], load[light] = load[heavy] - contexts[j], load[light] + contexts[j]
        count[heavy], count[light] = count[heavy] - 1, count[light] + 1


def _slots(which, previous, usable) -> list[int]:
    """Each request's slot: its previous one where it stays in that range, else the lowest free one."""
    slots: list[int | None] = [None] * len(which)
    taken: set[int] = set()
    for j, (k, p) in enumerate(zip(which, previous)):
        if p is not None and usable[k][0] <= p < usable[k][1] and p not in taken:
            slots[j] = p
            taken.add(p)
    cursor = [a for a, _ in usable]
    for j, k in enumerate(which):
        if slots[j] is None:
            while cursor[k] in taken:
                cursor[k] += 1
            slots[j] = cursor[k]
            taken.add(cursor[k])
    return slots


def spread_fields(fields: dict, num_decode: int, slots: list[int]) -> dict:
    """The step fields (runtime.engine_runner.batch_fields) with decode request j in row slots[j] and the
    prefill rows right after the last used slot."""
    span = max(slots, default=-1) + 1
    shift = span - num_decode
    num_rows = len(fields["input_ids"]) + shift
    row_of = list(slots) + list(range(span, num_rows))
    out = dict(fields)
    for name, pad in ROW_FIELDS.items():
        values = [pad] * num_rows
        for r, v in enumerate(fields[name]):
            values[row_of[r]] = v
        out[name] = values
    context_lens = [0] * span
    tables: list[list[int]] = [[] for _ in range(span)]
    for j, s in enumerate(slots):
        context_lens[s], tables[s] = fields["context_lens"][j], fields["page_tables"][j]
    out["context_lens"] = context_lens
    out["page_tables"] = tables + list(fields["page_tables"][num_decode:])
    out["chunk_starts"] = [s + shift for s in fields["chunk_starts"]]
    out["logit_rows"] = [row_of[r] for r in fields["logit_rows"]]
    return out


def range_loads(context_lens: list[int], ranges: list[tuple[int, int]]) -> list[int]:
    """KV tokens each range's decode slots read (context_lens per slot, 0 = padding)."""
    return [sum(context_lens[a:e]) for a, e in ranges]


@dataclass
class DecodeSpread:
    """One bucket's placement across its batches (the sticky slots of the latest batch it placed)."""
    ranges: tuple[tuple[int, int], ...]      # decode slots of each decode-attention nano-batch, covering [0, B)
    max_tokens: int                          # the bucket's rows
    slot_of: dict = field(default_factory=dict)   # request -> its slot in the latest batch placed
    num_batches: int = 0
    num_moves: int = 0                       # requests placed in another slot than in the previous batch

    def apply(self, fields: dict, requests: list, num_decode: int) -> dict:
        """`fields` laid out for this bucket's nano-batches; requests: the decode rows' requests (keys)."""
        if num_decode == 0:
            return fields
        limit = min(self.ranges[-1][1], self.max_tokens - (len(fields["input_ids"]) - num_decode))
        previous = [self.slot_of.get(r) for r in requests]
        slots = place(list(fields["context_lens"]), list(self.ranges), limit, previous)
        self.num_moves += sum(p is not None and p != s for p, s in zip(previous, slots))
        self.slot_of = dict(zip(requests, slots))
        self.num_batches += 1
        return spread_fields(fields, num_decode, slots)
