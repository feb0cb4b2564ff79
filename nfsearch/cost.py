"""The cost model and the scheduling problem the search works on.

CostModel: time of a nano-op at an SM count, alone or beside ops of other classes. Co-run times
come from the profile's measured co-run rows where it has them; otherwise from NanoFlow's published
A100 curves (NANOFLOW.md): an op of class c given a share R of the SMs, while another class runs
beside it, progresses at P_c(R) of its full-GPU solo speed, so its co-run time is
max(solo time at its SM count, full-GPU time / P_c(R)); that source is named in every plan.

Problem bundles model, workload, GPU, profile, layer graph and cost model for the search.
"""

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import networkx as nx

from nfsearch.errors import NfsearchError
from nfsearch.graph import Op, build_layer, op_context
from nfsearch.plan import MAX_NUM_LAYERS, PlanGpu, PlanProfile
from nfsearch.profile import ProfileMiss, ProfileTable, gpu_from_profile, load
from nfsearch.roofline import analytic_profile, interp, roofline
from nfsearch.specs import GpuSpec, ModelSpec, Workload, load_gpu


# share R -> normalised speed P(R); GEMM-like compute is linear (P = R)
PUBLISHED_CURVES = {
    "compute": ((0.0, 0.0), (1.0, 1.0)),
    "memory": ((0.0, 0.0), (0.1, 0.25), (0.2, 0.4), (0.3, 0.5), (0.4, 0.6), (0.5, 0.7), (0.6, 0.8),
               (0.7, 0.85), (0.8, 0.9), (0.9, 0.95), (1.0, 1.0)),
    "network": ((0.0, 0.0), (0.1, 0.4), (0.2, 0.6), (0.3, 0.7), (0.4, 0.8), (0.5, 0.9), (1.0, 1.0)),
}
PUBLISHED_CURVES["other"] = PUBLISHED_CURVES["memory"]


@dataclass(frozen=True)
class Interference:
    """The default model; `source` says where co-run figures come from."""
    source: str = "published NanoFlow curves (A100)"

    def speed(self, op_class: str, share: float) -> float:
        curve = PUBLISHED_CURVES[op_class]
        return max(1e-6, interp(curve[1:], share) if share > curve[1][0] else curve[1][1] * share / curve[1][0])

    def corun_ms(self, op_class: str, solo_ms: float, full_gpu_ms: float, share: float) -> float:
        return max(solo_ms, full_gpu_ms / self.speed(op_class, share))


class CostModel:
    def __init__(self, profile: ProfileTable, layer: nx.DiGraph, workload: Workload,
                 interference: Interference | None = None, allow_extrapolation: bool = False):
        self.profile = profile
        self.workload = workload
        self.interference = interference or Interference()
        self.is_extrapolating = allow_extrapolation
        self.ops: dict[str, Op] = {name: layer.nodes[name]["op"] for name in layer.nodes}
        self.num_sms = int(profile.meta["num_sms"])
        self.solo_ms = lru_cache(maxsize=None)(self._solo_ms)
        self.corun_ms = lru_cache(maxsize=None)(self._corun_ms)

    def op_class(self, op: str) -> str:
        return self.ops[op].op_class

    def impl(self, op: str, num_tokens: int, sm_count: int) -> str:
        return self._lookup(op, num_tokens, sm_count)[1]

    def _solo_ms(self, op: str, num_tokens: int, sm_count: int) -> float:
        return self._lookup(op, num_tokens, sm_count)[0]

    def _corun_ms(self, op: str, num_tokens: int, sm_count: int, co_class: str) -> float:
        """Time while an op of `co_class` runs beside it (measured if the table has it)."""
        solo = self.solo_ms(op, num_tokens, sm_count)
        if co_class == self.op_class(op) or not co_class:
            return solo
        if co_class in self.profile.rows["co_class"].values and self.profile.impls(op, co_class):
            try:
                return max(solo, self._lookup(op, num_tokens, sm_count, co_class)[0])
            except ProfileMiss:
                pass
        full = self.solo_ms(op, num_tokens, self.num_sms)
        return self.interference.corun_ms(self.op_class(op), solo, full, sm_count / self.num_sms)

    def stretched_ms(self, op: str, num_tokens: int, sm_count: int, co_classes: frozenset[str]) -> float:
        """Time while ops of `co_classes` run beside it: the worst of the pairwise stretches."""
        others = [c for c in co_classes if c != self.op_class(op)]
        if not others:
            return self.solo_ms(op, num_tokens, sm_count)
        return max(self.corun_ms(op, num_tokens, sm_count, c) for c in others)

    def _lookup(self, op: str, num_tokens: int, sm_count: int, co_class: str = "") -> tuple[float, str]:
        context = op_context(self.ops[op], self.workload)
        return self.profile.time_ms(op, num_tokens, sm_count, context, co_class=co_class,
                                    allow_extrapolation=self.is_extrapolating)


@dataclass(frozen=True)
class Problem:
    model: ModelSpec
    workload: Workload
    gpu: GpuSpec
    profile: ProfileTable
    layer: nx.DiGraph
    cost: CostModel
    num_layers: int

    @property
    def bound_ms(self) -> float:
        return roofline(self.model, self.workload, self.gpu).bound_ms

    def plan_gpu(self) -> PlanGpu:
        return PlanGpu(self.gpu.name, self.gpu.num_sms, self.gpu.sm_granularity)

    def plan_profile(self) -> PlanProfile:
        return PlanProfile(self.profile.fingerprint(), self.profile.meta["source"], self.profile.label,
                           self.cost.interference.source)


def make_problem(model: ModelSpec, workload: Workload, profile: ProfileTable, num_layers: int = 2,
                 allow_extrapolation: bool = False) -> Problem:
    if not 1 <= num_layers <= MAX_NUM_LAYERS:
        raise NfsearchError(f"num_layers must be in 1..{MAX_NUM_LAYERS}, not {num_layers}")
    layer = build_layer(model, workload)
    gpu = gpu_from_profile(profile)
    source = "measured co-run table" if profile.has_corun() else Interference().source
    cost = CostModel(profile, layer, workload, Interference(source), allow_extrapolation)
    return Problem(model, workload, gpu, profile, layer, cost, num_layers)



def profiles_dir() -> Path:
    """The bundled profiles/ folder (in the source tree beside the package)."""
    return Path(str(resources.files("nfsearch"))).parent / "profiles"


def default_profile(model: ModelSpec, workload: Workload, gpu_key: str = "h100-sxm") -> ProfileTable:
    """The bundled measured table for this GPU and model if there is one, else an analytic one."""
    folder = profiles_dir() / gpu_key
    if workload.tp_degree == 1:
        for name in (f"{model.name}.parquet", f"{model.name}.analytic.parquet"):
            if (folder / name).is_file():
                return load(folder / name)
    return analytic_profile(model, workload, load_gpu(gpu_key))
