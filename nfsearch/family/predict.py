"""A family's prediction: per bucket the iteration's time, energy and energy floor, and whole-trace tokens/s.

An iteration is the model's layers and its LM head. The layers: simulate.judge's predicted time per
layer (replay and power bound) x the model's layers, for the bucket's plan and for the sequential
plan of the same batch. The LM head (the cost model has no op for it): the roofline of its GEMM over
the batch's logit rows at the profile's GEMM ceiling (P_gemm) and copy bandwidth; the embedding
gather, final norm and sampling are left out (each well under 1% of an iteration).

Energy: per layer, the plan's own power bound's dynamic energy plus static power over the predicted
layer time, x layers (the LM head not priced). The floor: the layer's energy spent at the power limit
(cost.power_bound: bound_ms = dynamic J / (limit - static W)) x layers, plus the LM head's roofline.

Whole trace: the scheduler's iterations per bucket x the bucket's predicted iteration time is the
run's GPU time; the trace's real tokens (prompts and outputs, once each) over it is tokens/s.

Attention: the problem's profile is the family's engine view (family.attention.engine_view), so where
the profile has the engine's paged kernels measured every figure here prices attention with them;
`attention_ms` states each attention op's whole time per layer on the whole GPU and its impl.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from nfsearch.cost import Problem
from nfsearch.plan import Schedule
from nfsearch.profile import gpu_from_profile
from nfsearch.simulate import judge

LOGIT_BYTES = 4                  # the engine's logits are float32


@dataclass(frozen=True)
class BucketPrediction:
    layer_ms: float                  # the plan's judged time per layer
    sequential_layer_ms: float       # the sequential plan's, same batch
    lm_head_ms: float
    num_layers: int
    energy_j: float | None           # per iteration (layers only); None without energy in the profile
    floor_ms: float | None           # per iteration: layers at the power limit + LM head roofline
    power_limit_w: float | None
    attention_ms: dict | None = None  # op -> {"ms", "impl"}: the whole op per layer on the whole GPU

    @property
    def iteration_ms(self) -> float:
        return self.layer_ms * self.num_layers + self.lm_head_ms

    @property
    def sequential_iteration_ms(self) -> float:
        return self.sequential_layer_ms * self.num_layers + self.lm_head_ms

    def to_dict(self) -> dict:
        out = asdict(self) | {"iteration_ms": self.iteration_ms,
                              "sequential_iteration_ms": self.sequential_iteration_ms}
        if out["attention_ms"] is None:       # older families have none
            del out["attention_ms"]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> BucketPrediction:
        return cls(d["layer_ms"], d["sequential_layer_ms"], d["lm_head_ms"], d["num_layers"], d["energy_j"],
                   d["floor_ms"], d["power_limit_w"], d.get("attention_ms"))


def attention_ms(problem: Problem) -> dict:
    """Each attention op of the batch: its whole time per layer on the whole GPU by the problem's profile
    (calibrated as the cost model prices it) and the impl that gives it."""
    cost, out = problem.cost, {}
    for op in ("decode_attn", "prefill_attn"):
        tokens = cost.whole_tokens.get(op, 0)
        if tokens > 0:
            out[op] = {"ms": cost.solo_ms(op, tokens, cost.num_sms), "impl": cost.impl(op, tokens, cost.num_sms)}
    return out


def lm_head_ms(problem: Problem, num_logit_rows: int) -> float:
    """The LM head GEMM's roofline: [rows, H] x [H, V/tp] at the profile's GEMM ceiling and copy bandwidth."""
    model, gpu = problem.model, gpu_from_profile(problem.profile)
    hidden, vocab = model.hidden_size, model.vocab_size // problem.workload.tp_degree
    dtype = problem.workload.dtype_bytes
    flops = 2.0 * num_logit_rows * hidden * vocab
    num_bytes = dtype * (hidden * vocab + num_logit_rows * hidden) + LOGIT_BYTES * num_logit_rows * vocab
    return max(flops / (gpu.peak_tflops * 1e9), num_bytes / (gpu.mem_bandwidth_tbps * 1e9))


def predict_bucket(problem: Problem, plan: Schedule, num_logit_rows: int) -> BucketPrediction:
    """The bucket's predicted iteration (its plan and the sequential plan of its batch)."""
    from nfsearch.search.baselines import sequential_plan  # here: the search package imports ortools
    judged = judge(plan, problem.cost)
    sequential = judge(sequential_plan(problem), problem.cost)
    num_layers = problem.model.num_layers
    head_ms = lm_head_ms(problem, num_logit_rows)
    floor = problem.cost.power_bound()
    energy_j = floor_ms = limit = None
    if judged.power_bound is not None and floor is not None:
        own = judged.power_bound
        energy_j = num_layers * (own.dynamic_energy_j + own.static_power_w * judged.layer_ms * 1e-3)
        floor_ms = num_layers * floor.bound_ms + head_ms
        limit = floor.power_limit_w
    return BucketPrediction(judged.layer_ms, sequential.layer_ms, head_ms, num_layers, energy_j, floor_ms, limit,
                            attention_ms(problem))


@dataclass(frozen=True)
class TracePrediction:
    tokens_per_s: float
    sequential_tokens_per_s: float
    gpu_s: float                     # predicted busy time of the whole run (the family's plans)
    sequential_gpu_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def predict_trace(entries: list[tuple[int, BucketPrediction]], num_real_tokens: int) -> TracePrediction:
    """entries: (iterations in the bucket, its prediction) for every bucket."""
    gpu_ms = sum(n * p.iteration_ms for n, p in entries)
    seq_ms = sum(n * p.sequential_iteration_ms for n, p in entries)
    rate = lambda ms: num_real_tokens / (ms * 1e-3) if ms > 0 else 0.0
    return TracePrediction(rate(gpu_ms), rate(seq_ms), gpu_ms * 1e-3, seq_ms * 1e-3)
