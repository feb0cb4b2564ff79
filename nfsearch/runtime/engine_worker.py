"""The online engine loop: requests arrive and leave while batches run, in a process of its own.

The HTTP server (serving.server) talks to this process over two multiprocessing queues, so neither
HTTP nor detokenisation ever holds the GIL the loop needs to keep the GPU fed. Messages:

inbox (server -> engine):
    ("add", request_id, prompt_ids, sampling: dict of SamplingParams fields)
    ("cancel", request_id)          # the client left or a stop string matched: finish it, free its pages
    ("stop",)                       # leave the loop
outbox (engine -> server):
    ("ready", info: dict)           # once, after start-up (or ("fatal", message) when start-up fails)
    ("tokens", [(request_id, new_ids, finish_reason | None, error | None), ...])   # one per iteration
    ("stats", {"num_used_pages", "num_running", "num_waiting", "num_iterations", ...})

Each iteration is Engine.step, the one Engine.run takes (launch i+1 before reading i), with arrivals
from the inbox instead of a fixed list. A cancelled request is finished between iterations, exactly where postprocess finishes
one, so its pages may still be written by the batch in flight and are reused only by later batches
(the same stream order that makes the scheduler's own frees safe).
"""

from __future__ import annotations

import queue
import time

from nfsearch.serving.scheduler import SamplingParams, SeqStatus, Sequence


def worker_main(engine_kwargs: dict, inbox, outbox) -> None:
    """Process entry (spawn): build the engine, say ready, serve until ("stop",)."""
    try:
        import torch

        from nfsearch.runtime.engine import Engine
        if engine_kwargs.get("device") == "cpu":
            torch.set_num_threads(int(engine_kwargs.pop("num_threads", 1) or 1))
        engine_kwargs.pop("num_threads", None)
        engine = Engine(**engine_kwargs)
    except Exception as exc:  # noqa: BLE001 -- any start-up failure: the server reports it and exits
        outbox.put(("fatal", f"{type(exc).__name__}: {exc}"))
        return
    plans = plans_info(engine, engine_kwargs.get("plans"))
    description = engine.describe() + "".join(f"\n{line}" for line in (plans or {}).get("lines", ()))
    # the top bucket's context bounds a request (a family's buckets stop at its trace's longest request)
    outbox.put(("ready", {"num_pages": engine.num_pages, "page_size": engine.page_size,
                          "max_model_len": min(engine.cfg.max_model_len, engine.max_context),
                          "dense_batch": engine.dense_batch, "vocab_size": engine.cfg.spec.vocab_size,
                          "eos_token_ids": list(engine.cfg.eos_token_ids), "gemm": engine.gemm_numerics,
                          "kv_cache_dtype": engine.kv_dtype_name, "plans": plans, "description": description}))
    serve_forever(engine, inbox, outbox)


def plans_info(engine, path: str | None) -> dict | None:
    """The plan family the engine runs (`serve --plans`), for /health and the start-up lines; None without."""
    family = engine.family
    if family is None:
        return None
    trace = family.trace
    head = (f"plan family {path} ({trace['name']}, {trace['num_requests']} requests): {len(family.buckets)} bucket "
            f"plans, predicted {family.prediction.tokens_per_s:,.0f} tokens/s")
    return {"path": path, "trace": trace["name"], "num_buckets": len(family.buckets),
            "predicted_tokens_per_s": family.prediction.tokens_per_s,
            "lines": [head] + [k.describe() for k in engine.bucket_kernels]}


def serve_forever(engine, inbox, outbox) -> None:
    """Serve requests from inbox until ("stop",); tokens and stats go to outbox."""
    OnlineLoop(engine, outbox).run(inbox)


class OnlineLoop:
    def __init__(self, engine, outbox):
        self.engine, self.outbox = engine, outbox
        self.sched = engine.new_scheduler()
        self.live: dict[int, Sequence] = {}      # request id -> sequence not yet reported finished
        self.num_sent: dict[int, int] = {}       # request id -> output tokens already sent
        self.start = time.perf_counter()
        self.num_iterations = 0
        self.num_cancelled = 0                   # requests finished early by a cancel (client gone, stop string)
        self.is_stopping = False

    def now(self) -> float:
        return time.perf_counter() - self.start

    def run(self, inbox) -> None:
        in_flight = None
        last_stats = self.stats()
        self.outbox.put(("stats", last_stats))
        while not self.is_stopping:
            is_idle = in_flight is None and not self.sched.has_work()
            updates = self._drain(inbox, block=is_idle)
            in_flight, launched, read = self.engine.step(self.sched, in_flight, self.start, self.engine.variants[0])
            for batch, _ in read:
                updates += self._updates(batch)
            if launched is not None:
                self.num_iterations += 1
            if updates:
                self.outbox.put(("tokens", updates))
            stats = self.stats()
            if stats != last_stats:
                self.outbox.put(("stats", stats))
                last_stats = stats
        if in_flight is not None:
            self.engine.read(in_flight, self.sched, self.start)

    def stats(self) -> dict:
        pages = self.sched.pages
        return {"num_used_pages": pages.num_used_pages, "num_pages": pages.num_pages,
                "num_running": len(self.sched.running), "num_waiting": len(self.sched.waiting),
                "num_live_requests": len(self.live), "num_preemptions": self.sched.num_preemptions,
                "num_cancelled": self.num_cancelled}

    # ------------------------------------------------------------------------------ messages
    def _drain(self, inbox, block: bool) -> list:
        """Apply every queued message (waiting for one when idle); the updates of refused/cancelled ones."""
        updates = []
        while True:
            try:
                msg = inbox.get(timeout=0.5) if block else inbox.get_nowait()
            except queue.Empty:
                if block:
                    continue                 # idle: keep waiting (the loop has nothing to run)
                return updates
            block = False
            kind = msg[0]
            if kind == "add":
                updates += self._add(*msg[1:])
            elif kind == "cancel":
                self._cancel(msg[1])
            elif kind == "stop":
                self.is_stopping = True
                return updates

    def _add(self, request_id: int, prompt_ids: list[int], sampling: dict) -> list:
        seq = Sequence(request_id, list(prompt_ids), SamplingParams(**sampling), self.now())
        if not self.sched.add(seq):
            return [(request_id, [], "error", seq.error)]
        self.live[request_id] = seq
        self.num_sent[request_id] = 0
        return []

    def _cancel(self, request_id: int) -> None:
        seq = self.live.pop(request_id, None)
        self.num_sent.pop(request_id, None)
        if seq is None or seq.is_finished:
            return
        # pending samples of seq in the batch in flight are discarded by postprocess (seq is finished)
        self.sched._finish(seq, "abort", self.now())
        self.num_cancelled += 1

    def _updates(self, batch) -> list:
        """What a postprocessed batch gave each live request: new ids, and its finish reason once finished."""
        updates = []
        for seq in dict.fromkeys(batch.sample_seqs):
            rid = seq.seq_id
            if self.live.get(rid) is not seq:
                continue                     # cancelled
            sent = self.num_sent[rid]
            new_ids = seq.output_ids[sent:]
            finish = seq.finish_reason if seq.status is SeqStatus.FINISHED else None
            if new_ids or finish:
                updates.append((rid, list(new_ids), finish, None))
                self.num_sent[rid] = len(seq.output_ids)
            if finish:
                del self.live[rid], self.num_sent[rid]
        return updates
