"""How an op's time stretches when it co-runs with an op of another class.

Default: NanoFlow's published curves (NANOFLOW.md). An op of class c given a share R of the SMs,
while another class runs beside it, progresses at P_c(R) of its full-GPU solo speed, so its co-run
time is max(solo time at its SM count, full-GPU time / P_c(R)). A measured co-run table (profile
rows with a co_class) replaces the curve for the ops it covers.
"""

from dataclasses import dataclass

from nfsearch.analytic import _interp

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
        return max(1e-6, _interp(curve[1:], share) if share > curve[1][0] else curve[1][1] * share / curve[1][0])

    def corun_ms(self, op_class: str, solo_ms: float, full_gpu_ms: float, share: float) -> float:
        return max(solo_ms, full_gpu_ms / self.speed(op_class, share))
