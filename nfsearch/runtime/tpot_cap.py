"""`--max-tpot MS`: cap the dense batch so that each iteration (the time between two tokens of a
decoding request) stays under a budget; the user trades throughput for latency.

An iteration's time is modelled as a + b x tokens + c x decode KV tokens + d x decode rows (the GEMMs
grow with the rows, decode attention with the KV it reads and, where it loops on the host as the CPU
reference does, with the requests). a, b, c, d are fitted at start-up from a few timed forwards
of dry batches of different sizes on the engine's own model (GPU time on the GPU, host time on the
CPU); the dense batch is the largest multiple of 16 whose full iteration, with as many decode rows as
the scheduler may run at the trace's mean context, the model puts under the budget. During the run
the measured iteration times scale the model (a running mean of measured / predicted), and the
scheduler's token budget follows it between 16 tokens and the chosen dense batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from nfsearch.errors import NfsearchError
from nfsearch.runtime.engine_runner import dry_fields
from nfsearch.runtime.step_inputs import make_step_inputs
from nfsearch.serving.batch import Bucket

MIN_TOKENS = 16                  # the smallest bucket default_buckets makes
ADAPT_WEIGHT = 0.1               # weight of each new measured/predicted ratio in the running mean


@dataclass(frozen=True)
class IterationTimeModel:
    a_ms: float                  # fixed cost per iteration (launch, weights read once)
    b_ms_per_token: float
    c_ms_per_kv_token: float     # decode attention, per cached token read
    d_ms_per_decode: float = 0.0 # decode attention, per request

    def predict_ms(self, num_tokens: int, num_kv_tokens: float, num_decode: int = 0) -> float:
        return (self.a_ms + self.b_ms_per_token * num_tokens + self.c_ms_per_kv_token * num_kv_tokens
                + self.d_ms_per_decode * num_decode)

    def describe(self) -> str:
        return (f"{self.a_ms:.3f} ms + {self.b_ms_per_token * 1e3:.3f} us/token + "
                f"{self.c_ms_per_kv_token * 1e6:.3f} ns/KV token + {self.d_ms_per_decode * 1e3:.3f} us/decode row")


def _time_forward_ms(model, bucket: Bucket, page_size: int, device, repeats: int) -> float:
    step = make_step_inputs(bucket, page_size, device, **dry_fields(bucket, page_size))
    is_cuda = torch.device(device).type == "cuda"
    model.forward(step)                                  # warm-up (kernels compiled, caches hot)
    best = float("inf")
    for _ in range(repeats):
        if is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model.forward(step)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            model.forward(step)
            best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def measure_time_model(model, page_size: int, max_tokens: int, max_decode: int, max_context: int,
                       device, repeats: int = 2) -> IterationTimeModel:
    """Fit a, b, c, d (least squares, each >= 0) to timed dry forwards: prefill batches of 16 up to
    max_tokens rows, and decode-only batches of two sizes at two contexts. Every shape must fit the
    model's buffers."""
    points = []                                          # (tokens, kv tokens, decode rows, ms)
    sizes = sorted({min(max_tokens, max(MIN_TOKENS, max_tokens >> k)) for k in range(3)} | {min(MIN_TOKENS, max_tokens)})
    context = max(page_size, max_context)
    for t in sizes:          # mostly prefill; one decode row, so no kernel ever sees an empty grid
        bucket = Bucket(t, 1, max(1, min(8, t - 1)), context)
        points.append((t, context, 1, _time_forward_ms(model, bucket, page_size, device, repeats)))
    big = max(1, min(max_decode, max_tokens, 64))
    for num_decode, ctx in {(max(1, big // 4), context), (max(1, big // 4), max(page_size, context // 4)),
                            (big, max(page_size, context // 4))}:
        bucket = Bucket(num_decode, num_decode, 1, ctx)
        points.append((num_decode, num_decode * ctx, num_decode,
                       _time_forward_ms(model, bucket, page_size, device, repeats)))
    x = np.array([[1.0, t, kv, n] for t, kv, n, _ in points])
    y = np.array([p[-1] for p in points])
    is_free = np.ones(4, dtype=bool)
    for _ in range(4):                                   # drop negative terms and refit (tiny NNLS)
        coef = np.zeros(4)
        coef[is_free] = np.linalg.lstsq(x[:, is_free], y, rcond=None)[0]
        if (coef >= 0).all():
            break
        is_free &= coef > 0
    return IterationTimeModel(*(float(max(0.0, v)) for v in coef))


@dataclass
class TpotCap:
    max_tpot_ms: float
    time_model: IterationTimeModel
    dense_batch: int             # the chosen cap (tokens)
    max_decode: int
    uncapped_dense_batch: int
    mean_context: float          # the trace's mean prompt + half its mean output
    ratio: float = 1.0           # running mean of measured / predicted iteration time
    token_budget: int = 0        # the scheduler's current budget

    def predict_ms(self, num_tokens: int) -> float:
        """A full iteration of num_tokens rows with as many decode rows as may run, at the mean context."""
        num_decode = min(self.max_decode, num_tokens)
        return self.time_model.predict_ms(num_tokens, num_decode * self.mean_context, num_decode)

    def observe(self, num_tokens: int, num_kv_tokens: int, num_decode: int, time_ms: float) -> int:
        """One measured iteration: update the ratio; returns the token budget for the next batches."""
        m = self.time_model
        predicted = m.predict_ms(num_tokens, num_kv_tokens, num_decode)
        if predicted > 0 and time_ms > 0:
            self.ratio += ADAPT_WEIGHT * (time_ms / predicted - self.ratio)
        spare_ms = (self.max_tpot_ms / self.ratio - m.a_ms - m.c_ms_per_kv_token * num_kv_tokens
                    - m.d_ms_per_decode * num_decode)
        tokens = self.dense_batch if m.b_ms_per_token <= 0 else int(spare_ms / m.b_ms_per_token)
        self.token_budget = max(min(MIN_TOKENS, self.dense_batch), min(self.dense_batch, tokens))
        return self.token_budget

    def describe(self) -> str:
        return (f"--max-tpot {self.max_tpot_ms:g} ms: dense batch {self.dense_batch} tokens "
                f"(uncapped {self.uncapped_dense_batch}), up to {self.max_decode} decode rows, predicted "
                f"{self.predict_ms(self.dense_batch):.2f} ms/iteration; iteration time {self.time_model.describe()}")


def choose_cap(max_tpot_ms: float, time_model: IterationTimeModel, dense_batch: int, max_decode: int,
               mean_context: float) -> TpotCap:
    """The largest dense batch (a multiple of 16, at most dense_batch) predicted under max_tpot_ms;
    NfsearchError when even the smallest is not."""
    cap = TpotCap(max_tpot_ms, time_model, dense_batch, max_decode, dense_batch, mean_context)
    smallest = min(MIN_TOKENS, dense_batch)
    if cap.predict_ms(smallest) > max_tpot_ms:
        raise NfsearchError(f"--max-tpot {max_tpot_ms:g} ms is below the shortest iteration: "
                            f"{cap.predict_ms(smallest):.2f} ms for a {smallest}-token batch on this device "
                            f"({time_model.describe()})")
    tokens = dense_batch
    while tokens > smallest and cap.predict_ms(tokens) > max_tpot_ms:
        tokens = max(smallest, (tokens - 1) // MIN_TOKENS * MIN_TOKENS)
    cap.dense_batch, cap.max_decode, cap.token_budget = tokens, min(max_decode, tokens), tokens
    return cap


def cap_engine(engine, max_tpot_ms: float) -> TpotCap:
    """Measure the engine model's iteration times, choose the cap and rebuild the engine's buckets for
    it (default_buckets: the capped dense batch, then its halves for the smaller budgets). Called
    before the runner is built, so only the capped buckets get buffers and graphs."""
    from nfsearch.serving.scheduler import default_buckets
    if not max_tpot_ms > 0:
        raise NfsearchError(f"--max-tpot {max_tpot_ms:g} ms: expected a positive time")
    shape = engine.trace_shape
    mean_context = min(engine.max_context, shape.mean_prompt_len + shape.mean_output_len / 2)
    model = measure_time_model(engine.model, engine.page_size, engine.dense_batch, engine.max_decode,
                               engine.max_context, engine.device)
    cap = choose_cap(max_tpot_ms, model, engine.dense_batch, engine.max_decode, mean_context)
    engine.dense_batch, engine.max_decode = cap.dense_batch, cap.max_decode
    engine.buckets = default_buckets(cap.dense_batch, cap.max_decode, engine.max_context, engine.page_size)
    return cap


def observe_batch(cap: TpotCap, sched, batch, time_ms: float) -> None:
    """After reading an iteration: adapt the scheduler's token budget to its measured time."""
    sched.token_budget = cap.observe(batch.num_tokens, sum(batch.context_lens), batch.num_decode, time_ms)
