"""Stage-2 solver backends behind one interface (base.py); this module picks one.

`resolve("auto")` takes Gurobi where gurobipy is importable, licensed and the model fits its licence,
else CP-SAT, and says why in one line.
"""

from nfsearch.errors import NfsearchError
from nfsearch.solvers.base import SOLVER_NAMES, Solver, Stage2Data, Stage2Result, Task
from nfsearch.solvers.cpsat import CpSatSolver
from nfsearch.solvers.gurobi import GurobiSolver  # gurobipy itself is imported on use

__all__ = ["SOLVER_NAMES", "Solver", "Stage2Data", "Stage2Result", "Task", "get_solver", "resolve"]


def get_solver(name: str) -> Solver:
    if name == "cpsat":
        return CpSatSolver()
    if name == "gurobi":
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
    cpsat = get_solver("cpsat")
    ok, why_not = cpsat.available(data)
    if not ok:
        raise NfsearchError(f"no stage-2 solver: {why_not}; gurobi: {why}")
    return cpsat, f"auto: cpsat ({why})"
