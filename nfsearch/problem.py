"""A scheduling problem: model, workload, GPU, profile and cost model, bundled for the search."""

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import networkx as nx

from nfsearch.analysis import roofline
from nfsearch.analytic import analytic_profile
from nfsearch.cost import CostModel
from nfsearch.errors import NfsearchError
from nfsearch.graph import build_layer
from nfsearch.interference import Interference
from nfsearch.profile import ProfileTable, load
from nfsearch.specs import GpuSpec, ModelSpec, Workload, gpu_by_name, load_gpu


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

    def plan_gpu(self) -> dict:
        return {"name": self.gpu.name, "num_sms": self.gpu.num_sms, "sm_granularity": self.gpu.sm_granularity}

    def plan_profile(self) -> dict:
        return {"fingerprint": self.profile.fingerprint(), "source": self.profile.meta["source"],
                "label": self.profile.label, "interference": self.cost.interference.source}


def make_problem(model: ModelSpec, workload: Workload, profile: ProfileTable, num_layers: int = 2,
                 allow_extrapolation: bool = False) -> Problem:
    if num_layers < 1:
        raise NfsearchError("num_layers must be at least 1")
    layer = build_layer(model, workload)
    gpu = gpu_from_profile(profile)
    source = "measured co-run table" if profile.has_corun() else Interference().source
    cost = CostModel(profile, layer, workload, Interference(source), allow_extrapolation)
    return Problem(model, workload, gpu, profile, layer, cost, num_layers)


def gpu_from_profile(profile: ProfileTable) -> GpuSpec:
    """The GPU a profile was made on, with the profile's own measured rates where it has them."""
    meta = profile.meta
    known = load_gpu(meta["gpu_key"]) if meta.get("gpu_key") else gpu_by_name(meta["gpu_name"])
    base = known or load_gpu("h100-sxm")
    return GpuSpec(key=meta.get("gpu_key", base.key), name=meta["gpu_name"], num_sms=int(meta["num_sms"]),
                   sm_granularity=int(meta["sm_granularity"]),
                   peak_tflops=float(meta.get("peak_tflops", base.peak_tflops)),
                   mem_bandwidth_tbps=float(meta.get("mem_bandwidth_tbps", base.mem_bandwidth_tbps)),
                   net_bandwidth_gbps=float(meta.get("net_bandwidth_gbps", base.net_bandwidth_gbps)),
                   figures_source=meta.get("figures_source", meta["source"]))


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
