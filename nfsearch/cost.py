"""The cost model: time of a nano-op at an SM count, alone or beside ops of other classes."""

from functools import lru_cache

import networkx as nx

from nfsearch.interference import Interference
from nfsearch.ops import Op, op_context
from nfsearch.profile import ProfileMiss, ProfileTable
from nfsearch.specs import Workload


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
