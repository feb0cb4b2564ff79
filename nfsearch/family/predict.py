"""A family's prediction: per bucket the iteration's time, energy and energy floor, and whole-trace tokens/s.

An iteration is the model's layers and its LM head, at the shapes the engine's CUDA graph of the
bucket runs (runtime/paged_model.py): every op but attention over all of the bucket's rows, the LM
head over its logit rows (max decode + max segments), whatever the batch leaves empty. The layers:
simulate.judge's predicted time per layer (replay and power bound) of the bucket's batch, for the
bucket's plan and for the sequential plan of the same batch, plus its padding (`padding_cost`: the
dense ops at the bucket's rows against the batch's tokens, in time and energy; added to an overlapped
plan's replay as if it ran alone), x the model's layers. The LM head (the cost model has no op for
it): the roofline of its GEMM at the profile's GEMM ceiling (P_gemm) and copy bandwidth; the
embedding gather, final norm and sampling are left out (each well under 1% of an iteration).

Energy: per layer, the plan's own power bound's dynamic energy (with the padding's) plus static power
over the predicted layer time, x layers (the LM head not priced). The floor: the layer's energy (with
the padding's) spent at the power limit (cost.power_bound: bound_ms = dynamic J / (limit - static W))
x layers, plus the LM head's roofline.

Whole trace: the scheduler's iterations per bucket x the bucket's predicted iteration time is the
run's GPU time; the trace's real tokens (prompts and outputs, once each) over it is tokens/s.

Attention: the problem's profile is the family's engine view (family.attention.engine_view), so where
the profile has the engine's paged kernels measured every figure here prices attention with them;
`attention_ms` states each attention op's whole time per layer on the whole GPU and its impl.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from nfsearch.cost import Problem
from nfsearch.family.attention_plan import ATTENTION_OPS
from nfsearch.plan import Schedule
from nfsearch.profile import gpu_from_profile
from nfsearch.simulate import Judgement, judge

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
    padding_ms: float = 0.0          # per layer, in layer_ms: the dense ops over the bucket's empty rows

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
                   d["floor_ms"], d["power_limit_w"], d.get("attention_ms"), d.get("padding_ms", 0.0))


def attention_ms(problem: Problem) -> dict:
    """Each attention op of the batch: its whole time per layer on the whole GPU by the problem's profile
    (calibrated as the cost model prices it) and the impl that gives it."""
    cost, out = problem.cost, {}
    for op in ATTENTION_OPS:
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


def padding_cost(problem: Problem, num_rows: int) -> tuple[float, float]:
    """(ms, dynamic J) per layer that rows beyond the batch's tokens add, up to `num_rows`: each op over
    the whole batch but attention (and the network) priced at num_rows against the batch's tokens, alone
    on the whole GPU (no energy where the profile cannot bound the layer's power)."""
    cost, tokens = problem.cost, problem.workload.num_tokens
    if num_rows <= tokens:
        return 0.0, 0.0
    has_energy = cost.power_bound() is not None      # energy points for every op of the layer
    ms = joules = 0.0
    for op in cost.ops:
        if op in ATTENTION_OPS or cost.op_class(op) == "network" or cost.whole_tokens[op] != tokens:
            continue
        ms += cost.solo_ms(op, num_rows, cost.num_sms) - cost.solo_ms(op, tokens, cost.num_sms)
        if has_energy:
            joules += cost.nano_dynamic_j(op, num_rows) - cost.nano_dynamic_j(op, tokens)
    return max(0.0, ms), max(0.0, joules)


def _padded(judged: Judgement, pad_ms: float, pad_j: float) -> tuple[float, object]:
    """(layer ms, power bound) of a judged plan with the padding's time and energy added."""
    bound = judged.power_bound
    replayed = judged.replayed_layer_ms + pad_ms
    if bound is None:
        return replayed, None
    bound = replace(bound, dynamic_energy_j=bound.dynamic_energy_j + pad_j)
    return bound.layer_ms(replayed), bound


def predict_bucket(problem: Problem, plan: Schedule, bucket) -> BucketPrediction:
    """The predicted iteration of `bucket` (serving.batch.Bucket: its rows and logit rows) holding the
    problem's batch: its plan and the sequential plan of the batch."""
    from nfsearch.search.baselines import sequential_plan  # here: the search package imports ortools
    pad_ms, pad_j = padding_cost(problem, bucket.max_tokens)
    layer_ms, own = _padded(judge(plan, problem.cost), pad_ms, pad_j)
    sequential_ms, _ = _padded(judge(sequential_plan(problem), problem.cost), pad_ms, pad_j)
    num_layers = problem.model.num_layers
    head_ms = lm_head_ms(problem, bucket.max_decode + bucket.max_segments)
    floor = problem.cost.power_bound()
    energy_j = floor_ms = limit = None
    if own is not None and floor is not None:
        energy_j = num_layers * (own.dynamic_energy_j + own.static_power_w * layer_ms * 1e-3)
        floor_ms = num_layers * replace(floor, dynamic_energy_j=floor.dynamic_energy_j + pad_j).bound_ms + head_ms
        limit = floor.power_limit_w
    return BucketPrediction(layer_ms, sequential_ms, head_ms, num_layers, energy_j, floor_ms, limit,
                            attention_ms(problem), pad_ms)


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
