"""The fit behind runtime.bucket_energy: per-bucket mean power from windows of measured energy and the
seconds each bucket occupies in them. Torch-free (numpy).

Rows: windows (joules); columns: the seconds each (variant, bucket) and idle occupy in them. A column
dominates a window where it holds more than half of it; one that dominates none is not separable from
what runs beside it: it gets no number of its own, its seconds pooled in one "rest" column so they still
carry energy. Non-negative least squares (Lawson-Hanson: a few columns, numpy only); standard errors
from the unconstrained covariance of the columns left positive. A bucket's mean power absorbs whatever
clock state its neighbours leave it in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DOMINANT_SHARE = 0.5       # a column dominates a window where it holds more than this share of its time


def _busy_until(starts: np.ndarray, ends: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Seconds of the (sorted, disjoint) intervals before each time in t."""
    dur = ends - starts
    cum = np.concatenate([[0.0], np.cumsum(dur)])
    j = np.searchsorted(starts, t, side="right")        # intervals starting at or before t
    last = np.maximum(j - 1, 0)
    partial = np.minimum(np.maximum(t - starts[last], 0.0), dur[last])
    return np.where(j > 0, cum[last] + partial, 0.0)


def by_column(intervals, codes, num_columns: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each column's (starts, ends), interval i going to column codes[i] (built once, fitted at every lag)."""
    spans = np.array(intervals, dtype=float).reshape(-1, 2)
    codes = np.asarray(codes, dtype=int)
    return [(spans[codes == j, 0], spans[codes == j, 1]) for j in range(num_columns)]


def occupancy(windows, columns: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """[windows, len(columns) + 1]: seconds each column's intervals (by_column) occupy in each window,
    idle last."""
    a = np.array([w.start_s for w in windows], dtype=float)
    b = np.array([w.end_s for w in windows], dtype=float)
    cols = [_busy_until(s, e, b) - _busy_until(s, e, a) for s, e in columns]
    busy = np.stack(cols, axis=1) if cols else np.zeros((len(windows), 0))
    idle = np.maximum((b - a) - busy.sum(axis=1), 0.0)
    return np.concatenate([busy, idle[:, None]], axis=1)


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min |a x - b| subject to x >= 0 (Lawson-Hanson active set; a has a few columns)."""
    m, n = a.shape
    x, active = np.zeros(n), np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(float).eps * max(m, n) * max(np.abs(a).sum(axis=0).max(initial=0.0), 1.0)
    for _ in range(3 * n + 1):
        grad = a.T @ (b - a @ x)
        if active.all() or grad[~active].max(initial=-np.inf) <= tol:
            break
        active[np.argmax(np.where(active, -np.inf, grad))] = True
        while active.any():
            z = np.zeros(n)
            z[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
            if (z[active] > tol).all():
                x = z
                break
            neg = active & (z <= tol)
            step = np.min(x[neg] / np.maximum(x[neg] - z[neg], 1e-300))
            x = x + step * (z - x)
            active &= x > tol
            x[~active] = 0.0
    return x


def fit_powers(a: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean power per column, its standard error (nan where unknown), rms residual in J)."""
    p = nnls(a, e)
    resid = e - a @ p
    on = p > 0
    dof = len(e) - int(on.sum())
    se = np.full(len(p), np.nan)
    if dof > 0 and on.any():
        cov = (resid @ resid / dof) * np.linalg.pinv(a[:, on].T @ a[:, on])
        se[on] = np.sqrt(np.maximum(np.diag(cov), 0.0))
    return p, se, float(np.sqrt(np.mean(resid ** 2))) if len(e) else 0.0


@dataclass
class Fit:
    """The fit at one lag: windows, occupancy, who holds which window, powers by column."""
    lag_s: float
    windows: list                    # bucket_energy.EnergyWindow (start_s, end_s, energy_j)
    occ: np.ndarray                  # [windows, labels + idle] seconds
    owns: np.ndarray                 # [windows, labels + idle] holds more than half of the window
    power: dict                      # separable column -> W
    se: dict
    rest: list[int]                  # columns pooled (not separable)
    rest_w: float | None
    rms_j: float

    @property
    def energy_j(self) -> np.ndarray:
        return np.array([w.energy_j for w in self.windows])

    @property
    def spans(self) -> np.ndarray:
        return np.array([w.end_s - w.start_s for w in self.windows])


def fit_at(windows, lag_s: float, columns) -> Fit:
    """Fit the separable columns (each holds some window) and one pooled column of the rest; columns:
    by_column's."""
    occ = occupancy(windows, columns)
    spans = np.array([w.end_s - w.start_s for w in windows])
    owns = occ > DOMINANT_SHARE * spans[:, None]
    used = occ.sum(axis=0) > 0
    separable = [j for j in range(occ.shape[1]) if used[j] and owns[:, j].any()]
    rest = [j for j in range(occ.shape[1]) if used[j] and not owns[:, j].any()]
    a = np.concatenate([occ[:, separable]] + ([occ[:, rest].sum(axis=1, keepdims=True)] if rest else []), axis=1)
    p, se, rms = fit_powers(a, np.array([w.energy_j for w in windows]))
    return Fit(lag_s, windows, occ, owns, dict(zip(separable, p.tolist())), dict(zip(separable, se.tolist())),
                rest, float(p[-1]) if rest else None, rms)
