"""Stage-2 model durations of nano-ops at SM counts, in integer time units (1 us), cached."""

import math

from nfsearch.cost import Problem
from nfsearch.profile import ProfileMiss


UNITS_PER_MS = 1_000              # stage-2 time unit: 1 us


class Durations:
    """Stage-2 model durations in units: solo at the full GPU (nothing fits beside it), else the
    co-run time against the worst other class of the plan (pessimistic). Cached."""

    def __init__(self, problem: Problem):
        self.p = problem
        self.classes = frozenset(problem.cost.op_class(n) for n in problem.layer.nodes)
        grid = problem.gpu.sm_grid()          # granularity multiples, their complements (a split's back side)
        self.grid = sorted(set(grid) | {problem.gpu.num_sms - g for g in grid
                                         if grid[0] <= problem.gpu.num_sms - g < problem.gpu.num_sms})
        self.cache: dict[tuple, int] = {}
        self.plan_profile = problem.plan_profile()       # (hashes the table: once per search)
        self.wait_units = math.ceil(problem.cost.event_wait_ms * UNITS_PER_MS - 1e-6)

    def units(self, op: str, tokens: int, sms: int) -> int:
        key = (op, tokens, sms)
        if key not in self.cache:
            cost = self.p.cost
            ms = (cost.solo_ms(op, tokens, sms) if sms == self.p.gpu.num_sms
                  else cost.stretched_ms(op, tokens, sms, self.classes))
            self.cache[key] = max(1, math.ceil(ms * UNITS_PER_MS - 1e-6))
        return self.cache[key]

    def undominated(self, op: str, tokens: int, sms: int) -> int:
        """The fewest SMs (on the grid, at most `sms`) that run the op no slower than `sms` does."""
        d = self.units(op, tokens, sms)
        return next(g for g in self.grid if g <= sms and self.units_or_inf(op, tokens, g) <= d)

    def units_or_inf(self, op: str, tokens: int, sms: int) -> float:
        try:
            return self.units(op, tokens, sms)
        except ProfileMiss:
            return math.inf

    def choices(self, op: str, tokens: int, allowed) -> tuple[tuple[int, int], ...]:
        """Pareto-filtered (SM count, units) among the `allowed` SM counts (those the profile answers)."""
        kept, best = [], math.inf
        for g in sorted(set(allowed)):
            d = self.units_or_inf(op, tokens, g)
            if d < best:
                kept.append((g, d))
                best = d
        return tuple(kept)
