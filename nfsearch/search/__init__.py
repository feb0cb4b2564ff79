"""Two-stage schedule search: stage1 (structures), stage2 (SM allocation via solvers/), solve (pipeline)."""

from nfsearch.search.solve import solve

__all__ = ["solve"]
