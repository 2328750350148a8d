"""Scaling-law fits that predict each domain's reachable loss (SPEC §3.1).

Continued pretraining:  L(D)    = A·D^(−b) + E
Pruning:                L(D, s) = A·D^(−b1)·s^(−b2) + E      (s: expected sparsity)

Fitted in (log A, b, log E[, b2]) by a robust least squares (Huber loss, small δ) from a
grid of starting points. The 3 best fits each predict, each prediction is clipped, and the
reference is the mean of those predictions (`reference_prediction`): averaging the
*parameters* instead can be far off (log E of −9 and −1 average to nonsense), and the
reference code averages predictions. This module is scipy's per-problem fit, the
independent check; the controller's hot path uses the batched fit in `batched_fit.py`.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

HUBER_DELTA = 1e-3
LOG_A_STARTS = (0.0, 10.0, 20.0)
LOG_E_STARTS = (0.0, 1.0)
B_STARTS = (0.0, 0.5, 1.0)
B2_STARTS = (0.0, -0.5)
S_FLOOR = 1e-3  # sparsity is 0 before pruning starts; keep s^(−b2) finite


@dataclass(frozen=True)
class Fit:
    log_a: float
    b: float
    log_e: float
    b2: float | None = None  # pruning form only
    cost: float = 0.0

    def predict(self, d: np.ndarray | float, s: np.ndarray | float | None = None) -> np.ndarray:
        return predict(np.array([self.log_a, self.b, self.log_e] + ([self.b2] if self.b2 is not None else [])), d, s)

    def as_dict(self) -> dict[str, float]:
        out = {"log_A": self.log_a, "b": self.b, "log_E": self.log_e}
        if self.b2 is not None:
            out["b2"] = self.b2
        return out


def predict(theta: np.ndarray, d, s=None) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        term = np.exp(theta[0] - theta[1] * np.log(d))
        if len(theta) == 4:
            term = term * np.exp(-theta[3] * np.log(np.maximum(np.asarray(s, dtype=np.float64), S_FLOOR)))
        return term + np.exp(theta[2])


def starts(pruning: bool) -> list[list[float]]:
    """SPEC §3.1's grid of starting points, in (log A, b, log E[, b2]) order."""
    grid = itertools.product(LOG_A_STARTS, B_STARTS, LOG_E_STARTS)
    if pruning:
        return [[a, b, e, b2] for a, b, e in grid for b2 in B2_STARTS]
    return [list(x) for x in grid]


def reference_prediction(fits: list[Fit], d_final: float, s_final: float | None, lowest: float) -> float:
    """Mean of the fits' predictions at (d_final, s_final), each clipped to [0, lowest]
    (the lowest loss observed): SPEC §3.1. A fit whose prediction is not finite is left out
    of the mean, as the reference code drops its NaN fits and averages the rest; NaN only
    when no fit predicts a finite value."""
    preds = np.array([float(f.predict(d_final, s_final)) for f in fits], dtype=np.float64)
    preds = preds[np.isfinite(preds)]
    if not len(preds):
        return float("nan")
    return float(np.mean(np.clip(preds, 0.0, lowest)))


def fit(d: np.ndarray, loss: np.ndarray, s: np.ndarray | None = None, top_k: int = 3) -> tuple[list[Fit], str]:
    """(the `top_k` best fits, lowest Huber cost first; reason). reason is "" on success;
    the list is empty when no start converged."""
    d, loss = np.asarray(d, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    ok = np.isfinite(d) & np.isfinite(loss) & (d > 0)
    if s is not None:
        s = np.asarray(s, dtype=np.float64)
        ok &= np.isfinite(s)
    dropped = int((~ok).sum())
    d, loss = d[ok], loss[ok]
    if s is not None:
        s = s[ok]
    if len(d) < 3:
        return [], f"only {len(d)} usable points"
    pruning = s is not None
    results: list[tuple[float, np.ndarray]] = []

    log_d = np.log(d)
    log_s = np.log(np.maximum(s, S_FLOOR)) if pruning else None

    def resid(theta: np.ndarray) -> np.ndarray:
        r = predict(theta, d, s) - loss
        return np.where(np.isfinite(r), r, 1e6)

    def jac(theta: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            expo = theta[0] - theta[1] * log_d - (theta[3] * log_s if pruning else 0.0)
            term = np.exp(np.minimum(expo, 700.0))
            cols = [term, -log_d * term, np.full_like(d, np.exp(min(theta[2], 700.0)))]
            if pruning:
                cols.append(-log_s * term)
        j = np.stack(cols, axis=1)
        return np.where(np.isfinite(j), j, 0.0)

    for x0 in starts(pruning):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                r = least_squares(resid, np.array(x0, dtype=np.float64), jac=jac, loss="huber", f_scale=HUBER_DELTA,
                                  max_nfev=100 * len(x0))
            except (ValueError, FloatingPointError):
                continue
        if np.all(np.isfinite(r.x)) and np.isfinite(r.cost):
            results.append((float(r.cost), r.x))
    if not results:
        return [], "no start converged"
    results.sort(key=lambda t: t[0])
    fits = [Fit(float(x[0]), float(x[1]), float(x[2]), float(x[3]) if pruning else None, c) for c, x in results[:top_k]]
    return fits, (f"dropped {dropped} non-finite points" if dropped else "")


Problem = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]  # (tokens D, loss, sparsity s or None)


def fit_each(problems: list[Problem], pruning: bool, top_k: int = 3) -> list[tuple[list[Fit], str]]:
    """`fit` for every problem, one after another: the slow, independent reference."""
    return [fit(d, loss, s if pruning else None, top_k) for d, loss, s in problems]
