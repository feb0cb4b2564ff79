"""The two baselines every run measures beside the plan (WORKLOADS.md):

* seq-torch: what a user would write: whole ops on one stream, cuBLAS GEMMs and SDPA attention
  (the "torch" impls), captured as one CUDA graph.
* seq-same: the plan's own kernels (each op's impl as the plan uses it), whole ops at the full GPU,
  one stream, no nano-batching, one CUDA graph.
Both are launch lists from nfsearch.runtime.launch.sequential_launches, so they run through the same
executor path as the plan.
"""

from __future__ import annotations

from collections import Counter

from nfsearch.runtime.launch import LaunchList, sequential_launches


def seq_torch(schedule, num_sms: int, num_layers: int | None = None) -> LaunchList:
    return sequential_launches(schedule.model, schedule.workload, num_layers or schedule.num_layers, num_sms,
                               "torch", stream="seq-torch")


def plan_impls(launches: LaunchList) -> dict[str, str]:
    """Each op's impl in the plan (the most used one where nano-ops differ)."""
    counts: dict[str, Counter] = {}
    for l in launches.launches:
        counts.setdefault(l.op, Counter())[l.impl] += 1
    return {op: c.most_common(1)[0][0] for op, c in counts.items()}


def seq_same(schedule, plan_launches: LaunchList, num_sms: int, num_layers: int | None = None) -> LaunchList:
    return sequential_launches(schedule.model, schedule.workload, num_layers or schedule.num_layers, num_sms,
                               plan_impls(plan_launches), stream="seq-same")
