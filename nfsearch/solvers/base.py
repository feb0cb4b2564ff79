"""The stage-2 solver interface: data in, a timed SM assignment out, the same for every backend.

Stage 2 (search/stage2.py) turns a fixed structure (nano-batch sizes) into `Stage2Data`: one task per
nano-op of the unrolled layers, its stream, its allowed SM counts with their durations in integer
time units, the data dependencies, and a feasible hint. A backend implements three steps, kept
apart so that tests and benchmarks can time or inspect each one:

    model = solver.build(data)
    raw = solver.solve(model, time_limit_s, threads, seed)
    result = solver.extract(model, raw)            -> Stage2Result

The package's `get_solver` and `resolve` pick a backend; this module knows none of them.
"""

from dataclasses import dataclass, field


SOLVER_NAMES = ("auto", "cpsat", "gurobi")


@dataclass(frozen=True)
class Task:
    id: str                              # the nano-op id, e.g. "L0.kqv#1"; solver variables are named after it
    group: str                           # tasks of one group (same op, same nano-batch, any layer) share an SM count
    stream: str
    choices: tuple[tuple[int, int], ...]  # (sm_count, duration in units), sm_count ascending


@dataclass(frozen=True)
class Stage2Data:
    tasks: tuple[Task, ...]
    edges: tuple[tuple[int, int], ...]   # (i, j): task j starts after task i ends
    num_sms: int
    units_per_ms: int
    hint: dict = field(default_factory=dict)   # task index -> (start, sm_count): a feasible schedule
    wait: int = 0                        # units a task waits on an input from ANOTHER stream (event wait)

    def lag(self, i: int, j: int) -> int:
        """The gap edge (i, j) needs between i's end and j's start: the event wait across streams."""
        return self.wait if self.tasks[i].stream != self.tasks[j].stream else 0

    @property
    def horizon(self) -> int:
        """An upper bound on the makespan: every task one after another at its slowest choice."""
        return sum(max(d for _, d in t.choices) for t in self.tasks) + self.wait * len(self.edges)

    def groups(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, t in enumerate(self.tasks):
            out.setdefault(t.group, []).append(i)
        return out


@dataclass(frozen=True)
class Stage2Result:
    status: str                          # "optimal", "feasible"
    starts: tuple[int, ...]
    sm_counts: tuple[int, ...]
    durations: tuple[int, ...]
    makespan: int                        # units
    bound: float                         # proven lower bound on the makespan, units
    wall_s: float

    @property
    def gap(self) -> float:
        return max(0.0, (self.makespan - self.bound) / self.makespan) if self.makespan else 0.0


class Solver:
    """A stage-2 backend. Subclasses set `name` and implement the methods below."""
    name = "?"

    def available(self, data: Stage2Data | None = None) -> tuple[bool, str]:
        """Whether this backend can solve `data` here, and if not, one line saying why."""
        raise NotImplementedError

    def build(self, data: Stage2Data):
        raise NotImplementedError

    def solve(self, model, time_limit_s: float, threads: int, seed: int):
        raise NotImplementedError

    def extract(self, model, raw) -> Stage2Result:
        raise NotImplementedError

    def run(self, data: Stage2Data, time_limit_s: float, threads: int, seed: int) -> Stage2Result:
        model = self.build(data)
        return self.extract(model, self.solve(model, time_limit_s, threads, seed))

    def settings(self, time_limit_s: float, threads: int, seed: int) -> str:
        """One line on how determinism and limits were set (stored in the plan's solver note)."""
        return ""
