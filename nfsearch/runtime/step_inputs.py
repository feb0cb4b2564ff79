"""One iteration's inputs on the device, shaped by the bucket (so a CUDA graph can be replayed on them).

All integer fields and the sampling floats (as their bit patterns) live in one int32 buffer, so the
host refreshes a step with one copy. Field sizes, for a bucket (max_tokens T, max_decode B,
max_segments S, max_context C) and page_size: max_pages P = ceil(C / page_size), logit rows
L = B + S (each decode row, and the last row of each chunk that completes its prompt).

Padding: rows past the batch have input id 0, prev_row -1, position 0, slot -1; decode slots past the
batch have context_len 0; segments past the batch have chunk_len 0; logit rows past the batch read
row 0 and sample greedily (their ids are ignored).

Row layout: decode row r (< B) is decode slot r (context_lens[r], page_tables[r]); chunk s reads
page_tables[B + s] and owns rows [chunk_starts[s], +chunk_lens[s]) (absolute: chunks may start at the
number of real decode rows, since prefill attention runs after decode attention and overwrites).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from nfsearch.runtime.sampling import SamplingTensors, fold_seed

# (field, size key, pad value); sizes: T tokens, B decode slots, S segments, L logit rows
_FIELDS = (("input_ids", "T", 0), ("prev_rows", "T", -1), ("positions", "T", 0), ("slot_mapping", "T", -1),
           ("context_lens", "B", 0),
           ("chunk_starts", "S", 0), ("chunk_lens", "S", 0), ("prefix_lens", "S", 0),
           ("logit_rows", "L", 0), ("temperature", "L", 0.0), ("top_p", "L", 1.0), ("top_k", "L", 0),
           ("seed", "L", 0), ("sample_step", "L", 0))
_FLOATS = ("temperature", "top_p")


@dataclass
class StepInputs:
    input_ids: torch.Tensor          # [T] int32; ignored where prev_rows >= 0
    prev_rows: torch.Tensor          # [T] int32: index into the previous forward's sampled ids, or -1
    positions: torch.Tensor          # [T] int32
    slot_mapping: torch.Tensor       # [T] int32: page * page_size + offset, -1 = write nothing
    context_lens: torch.Tensor       # [B] int32, the new token included
    page_tables: torch.Tensor        # [B + S, P] int32
    chunk_starts: torch.Tensor       # [S] int32
    chunk_lens: torch.Tensor         # [S] int32
    prefix_lens: torch.Tensor        # [S] int32
    logit_rows: torch.Tensor         # [L] int32
    sampling: SamplingTensors        # [L] each
    num_logit_rows: int = 0          # host: the real logit rows (the rest is padding)
    is_all_greedy: bool = False      # host: every real row has temperature 0 (no sort, no noise)

    @property
    def max_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def max_decode(self) -> int:
        return self.context_lens.shape[0]


class _Layout:
    def __init__(self, bucket, page_size: int):
        B, S = bucket.max_decode, bucket.max_segments
        self.sizes = {"T": bucket.max_tokens, "B": B, "S": S, "L": B + S}
        self.max_pages = max(1, math.ceil(bucket.max_context / page_size))
        self.offsets, at = {}, 0
        for name, key, _ in _FIELDS:
            self.offsets[name] = (at, at + self.sizes[key])
            at += self.sizes[key]
        self.offsets["page_tables"] = (at, at + (B + S) * self.max_pages)
        self.num_ints = at + (B + S) * self.max_pages

    def views(self, flat: torch.Tensor, num_logit_rows: int = 0, is_all_greedy: bool = False) -> StepInputs:
        v = {name: flat[a:b] for name, (a, b) in self.offsets.items()}
        for name in _FLOATS:
            v[name] = v[name].view(torch.float32)
        v["page_tables"] = v["page_tables"].view(-1, self.max_pages)
        sampling = SamplingTensors(temperature=v.pop("temperature"), top_p=v.pop("top_p"),
                                   top_k=v.pop("top_k"), seed=v.pop("seed"), step=v.pop("sample_step"))
        return StepInputs(**v, sampling=sampling, num_logit_rows=num_logit_rows, is_all_greedy=is_all_greedy)

    def pack(self, host: np.ndarray, fields: dict) -> tuple[int, bool]:
        """Host lists into `host` (int32 numpy over the flat buffer) -> (num logit rows, all greedy)."""
        unknown = set(fields) - {name for name, _, _ in _FIELDS} - {"page_tables"}
        if unknown:
            raise TypeError(f"unknown step fields: {sorted(unknown)}")
        as_float = host.view(np.float32)
        for name, key, pad in _FIELDS:
            a, b = self.offsets[name]
            values = fields.get(name, ())
            if name == "seed":
                values = [fold_seed(int(s)) for s in values]
            n = len(values)
            if n > b - a:
                raise ValueError(f"{name}: {n} values for a bucket of {b - a}")
            target = as_float if name in _FLOATS else host
            target[a:a + n] = values
            target[a + n:b] = pad
        num_logit_rows = len(fields.get("logit_rows", ()))
        temps = fields.get("temperature", ())
        self._pack_page_tables(host, fields.get("page_tables", ()), len(fields.get("context_lens", ())))
        return num_logit_rows, all(t == 0 for t in temps)

    def _pack_page_tables(self, host: np.ndarray, tables, num_decode: int) -> None:
        """Decode requests' tables into rows [0, num_decode), the chunks' from row B on."""
        a, b = self.offsets["page_tables"]
        grid = host[a:b].reshape(-1, self.max_pages)
        grid[:] = 0
        if not tables:
            return
        B = self.sizes["B"]
        rows = [r if r < num_decode else B + r - num_decode for r in range(len(tables))]
        lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        if lens.max(initial=0) > self.max_pages or (rows and rows[-1] >= grid.shape[0]):
            raise ValueError(f"page tables do not fit the bucket ({len(tables)} tables, "
                             f"longest {lens.max()} pages; {grid.shape[0]} x {self.max_pages})")
        flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lens.sum()))
        row_idx = np.repeat(np.asarray(rows, dtype=np.int64), lens)
        col_idx = np.arange(flat.shape[0]) - np.repeat(np.cumsum(lens) - lens, lens)
        grid[row_idx, col_idx] = flat


def make_step_inputs(bucket, page_size: int, device, **fields) -> StepInputs:
    """StepInputs from host lists (fields named as StepInputs' and the sampling ones: temperature,
    top_p, top_k, seed, sample_step; page_tables a list of lists, decode requests first).
    `bucket` is anything with max_tokens, max_decode, max_segments and max_context."""
    layout = _Layout(bucket, page_size)
    host = np.zeros(layout.num_ints, dtype=np.int32)
    num_logit_rows, greedy = layout.pack(host, fields)
    flat = torch.from_numpy(host).to(device)
    return layout.views(flat, num_logit_rows, greedy)


class StepBuffers:
    """Static device inputs of one bucket, refreshed by one stream-ordered copy from double-buffered
    pinned memory: `fill_(**fields)` returns the same StepInputs tensors every time (graph inputs);
    the host never waits except for the copy issued two fills ago (long done)."""

    def __init__(self, bucket, page_size: int, device):
        self.layout = _Layout(bucket, page_size)
        self.device = torch.device(device)
        self.flat = torch.zeros(self.layout.num_ints, dtype=torch.int32, device=self.device)
        is_cuda = self.device.type == "cuda"
        self._host = [torch.zeros(self.layout.num_ints, dtype=torch.int32, pin_memory=is_cuda)
                      for _ in range(2)]
        self._copied = [torch.cuda.Event() if is_cuda else None for _ in range(2)]
        self._turn = 0
        self.step = self.layout.views(self.flat)

    def fill_(self, **fields) -> StepInputs:
        turn, self._turn = self._turn, 1 - self._turn
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()          # the copy that last read this pinned buffer
        host = self._host[turn]
        self.step.num_logit_rows, self.step.is_all_greedy = self.layout.pack(host.numpy(), fields)
        self.flat.copy_(host, non_blocking=True)
        if self._copied[turn] is not None:
            self._copied[turn].record()
        return self.step
