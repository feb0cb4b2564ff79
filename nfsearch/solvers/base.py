"""The stage-2 solver interface: data in, a timed SM assignment out, the same for every backend.

Stage 2 (search.py) turns a fixed structure (nano-batch sizes) into `Stage2Data`: one task per
nano-op of the unrolled layers, its stream, its allowed SM counts with their durations in integer
time units, the data dependencies, and a feasible hint. A backend implements three steps, kept
apart so that tests and benchmarks can time or inspect each one:

    model = solver.build(data)
    raw = solver.solve(model, time_limit_s, threads, seed)
    result = solver.extract(model, raw)            -> Stage2Result

`get_solver(name)` gives a backend by name; `resolve(name, data)` also handles "auto" (Gurobi when
importable, licensed and the model fits its licence, else CP-SAT) and says why in one line.
"""

from dataclasses import dataclass, field

from nfsearch.errors import NfsearchError

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

    @property
    def horizon(self) -> int:
        """An upper bound on the makespan: every task one after another at its slowest choice."""
        return sum(max(d for _, d in t.choices) for t in self.tasks)

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


def get_solver(name: str) -> Solver:
    if name == "cpsat":
        from nfsearch.solvers.cpsat import CpSatSolver
        return CpSatSolver()
    if name == "gurobi":
        from nfsearch.solvers.gurobi import GurobiSolver
        return GurobiSolver()
    raise NfsearchError(f"unknown solver '{name}' (choose one of {', '.join(SOLVER_NAMES)})")


def resolve(name: str, data: Stage2Data | None = None) -> tuple[Solver, str]:
    """The backend to use for `name` ("auto" included) and a one-line reason."""
    if name not in SOLVER_NAMES:
        raise NfsearchError(f"unknown solver '{name}' (choose one of {', '.join(SOLVER_NAMES)})")
    if name != "auto":
        solver = get_solver(name)
        ok, why = solver.available(data)
        if not ok:
            raise NfsearchError(f"solver {name} is unavailable: {why}")
        return solver, f"{name} as requested"
    gurobi = get_solver("gurobi")
    ok, why = gurobi.available(data)
    if ok:
        return gurobi, "auto: gurobi is installed, licensed and the model fits"
    return get_solver("cpsat"), f"auto: cpsat ({why})"
