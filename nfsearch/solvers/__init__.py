"""Stage-2 solver backends (CP-SAT, Gurobi) behind one interface; see base.py."""

from nfsearch.solvers.base import (SOLVER_NAMES, Solver, Stage2Data, Stage2Result, Task, get_solver,
                                   resolve)

__all__ = ["SOLVER_NAMES", "Solver", "Stage2Data", "Stage2Result", "Task", "get_solver", "resolve"]
