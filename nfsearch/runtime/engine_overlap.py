"""An overlapped plan inside the engine: one bucket's model issues its layers as the plan's nano-ops,
on one stream per plan stream, inside the bucket's CUDA graph.

runtime.engine_plans gives each bucket whose plan splits or overlaps ops an OverlappedModel: a
shallow copy of the engine's PagedModel (same weights, KV cache, buffers, sampled ids) whose layer
loop runs the bucket's OverlapProgram (runtime.overlap_program: rows, streams, SM shares, waits).
Embedding, LM head and sampling stay the PagedModel's, on the stream that captures the graph.

Each nano-op works on a fixed row slice of the static buffers: dense ops and RoPE + K/V write on
rows [a, b); decode attention on decode slots [a, b) (q, page-table rows, context lengths and the
output sliced alike); prefill attention over the whole q and attention buffers with every chunk
clipped to its window [a, b) (clipped starts, lengths and prefixes made on the device once per
forward, before the streams fork: no host value, so capturable).

Streams: inside capture (or eagerly) each plan stream is a side stream forked from the current one
(runtime.context.StreamFork); an op waits on the events of the ops the program says, records its
own where a later op waits on it, and every side stream joins the current one before the LM head.
SM shares are the kernels' num_sms (green contexts cannot switch inside a graph); the program's
notes say which kernels cannot be held to their share. On the CPU the same ops run in issue order.
"""

from __future__ import annotations

import torch

from nfsearch.errors import NfsearchError
from nfsearch.runtime.overlap_program import OverlapProgram, build_program
from nfsearch.runtime.paged_model import PagedModel
from nfsearch.runtime.step_inputs import StepInputs


class OverlappedModel(PagedModel):
    program: OverlapProgram

    @classmethod
    def of(cls, model: PagedModel, program: OverlapProgram, num_tokens: int) -> OverlappedModel:
        """A shallow copy of `model` (its ops dict included) that runs `program` for buckets of
        num_tokens rows."""
        twin = cls.__new__(cls)
        twin.__dict__.update(model.__dict__)
        twin.program, twin.num_tokens = program, num_tokens
        twin._streams, twin._events = {}, {}
        return twin

    # ------------------------------------------------------------------------------ the layers
    def _layers(self, x: torch.Tensor, step: StepInputs, T: int) -> None:
        if T != self.num_tokens:
            raise ValueError(f"an overlapped model of a {self.num_tokens}-row bucket given {T} rows")
        b = {k: t[:T] for k, t in self.buf.items()}
        windows = self._clipped_chunks(step)
        if self.device.type != "cuda":
            for op in self.program.ops:
                self.run_op(op, x, b, step, windows)
            return
        from nfsearch.runtime.context import StreamFork
        fork = StreamFork(self.device)
        for op in self.program.ops:
            s = fork.enter(self._stream(op.stream))
            for w in op.waits:
                s.wait_event(self._event(w))
            with torch.cuda.stream(s):
                self.run_op(op, x, b, step, windows)
            if op.record:
                self._event(op.id).record(s)
        fork.join()

    def _stream(self, name: str):
        if name not in self._streams:
            self._streams[name] = torch.cuda.Stream(device=self.device)
        return self._streams[name]

    def _event(self, op_id: str):
        if op_id not in self._events:
            self._events[op_id] = torch.cuda.Event()
        return self._events[op_id]

    def _clipped_chunks(self, step: StepInputs) -> dict:
        """window -> (chunk starts, lengths, prefix lengths) [S] int32 of every chunk clipped to it
        (length 0 where a chunk lies outside)."""
        starts, lens, prefixes = step.chunk_starts, step.chunk_lens, step.prefix_lens
        out = {}
        for a, e in self.program.prefill_windows:
            first = starts.clamp(min=a)
            num = ((starts + lens).clamp(max=e) - first).clamp_(min=0)
            out[(a, e)] = (first, num, prefixes + (first - starts))
        return out

    # ------------------------------------------------------------------------------ one nano-op
    def run_op(self, op, x: torch.Tensor, b: dict, step: StepInputs, windows: dict) -> None:
        """Nano-op `op` (an overlap_program.EngineOp) on its rows."""
        a, e = op.rows
        i, n, w, eps = op.layer, op.num_sms, self.w.layers[op.layer], self.cfg.rms_norm_eps
        ops = self.ops
        if op.op == "norm1":
            ops["norm1"](x[a:e], w.norm1, b["h"][a:e], n, eps=eps)
        elif op.op == "kqv":
            bias = None if w.bqkv is None else w.bqkv.expand(e - a, w.bqkv.shape[0])
            ops["kqv"](b["h"][a:e], w.wqkv, b["qkv"][a:e], n, residual=bias)
        elif op.op == "rope_append":
            self.rope_and_write_kv(i, b, step, a, e, n)
        elif op.op == "decode_attn":
            self.decode_attn(b["q"][a:e], self.k_caches[i], self.v_caches[i], step.page_tables[a:e],
                             step.context_lens[a:e], b["attn"][a:e], self.scale, num_sms=n, **self.kv_scale_kwargs[i])
        elif op.op == "prefill_attn":
            self._prefill(op, b, step, windows[op.rows])
        elif op.op == "o":
            ops["o"](b["attn"][a:e].view(e - a, -1), w.wo, b["mid"][a:e], n, residual=x[a:e])
        elif op.op == "norm2":
            ops["norm2"](b["mid"][a:e], w.norm2, b["h"][a:e], n, eps=eps)
        elif op.op == "ug":
            ops["ug"](b["h"][a:e], w.wug, b["ug"][a:e], n)
        elif op.op == "act":
            ops["act"](b["ug"][a:e], b["act"][a:e], n)
        elif op.op == "d":
            ops["d"](b["act"][a:e], w.wd, x[a:e], n, residual=b["mid"][a:e])
        else:
            raise ValueError(f"the engine's layer has no op {op.op}")

    def _prefill(self, op, b: dict, step: StepInputs, chunks) -> None:
        i, B = op.layer, step.max_decode
        extra = {"max_chunk_rows": op.rows[1] - op.rows[0]} if self._is_triton_prefill else {}
        self.prefill_attn(b["q"], self.k_caches[i], self.v_caches[i], step.page_tables[B:], *chunks, b["attn"],
                          self.scale, num_sms=op.num_sms, **self.kv_scale_kwargs[i], **extra)

    @property
    def _is_triton_prefill(self) -> bool:
        from nfsearch.runtime.kernels import paged_attention as pa
        return self.prefill_attn is pa.paged_prefill_attention


def overlapped_model(model: PagedModel, plan, bucket, op_impls: dict[str, str]) -> OverlappedModel:
    """The bucket's model: `model` (a per-bucket copy with its kernels) running `plan` tiled to the model's
    depth for the bucket's rows, on this device's SM count."""
    if model.w.is_fp8:
        raise NfsearchError("an overlapped plan with FP8 weights: its nano-ops run the bf16 layer")
    program = build_program(plan, len(model.w.layers), bucket.max_tokens, bucket.max_decode, bucket.max_segments,
                            model.num_sms, op_impls)
    return OverlappedModel.of(model, program, bucket.max_tokens)
