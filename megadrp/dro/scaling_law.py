"""Scaling-law fits that predict each domain's reachable loss (SPEC §3.1).

Continued pretraining:  L(D)    = A·D^(−b) + E
Pruning:                L(D, s) = A·D^(−b1)·s^(−b2) + E      (s: expected sparsity)

Fitted in (log A, b, log E[, b2]) with scipy's robust least squares (Huber loss, small δ)
from a grid of starting points; the 3 best fits are averaged. Pure numpy/scipy.
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


def fit(d: np.ndarray, loss: np.ndarray, s: np.ndarray | None = None, top_k: int = 3) -> tuple[Fit | None, str]:
    """(fit, reason). reason is "" on success; fit is None when no start converged."""
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
        return None, f"only {len(d)} usable points"
    pruning = s is not None
    starts = [list(x) for x in itertools.product(LOG_A_STARTS, B_STARTS, LOG_E_STARTS)]
    if pruning:
        starts = [[a, b, e, b2] for a, b, e in itertools.product(LOG_A_STARTS, B_STARTS, LOG_E_STARTS) for b2 in B2_STARTS]
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

    for x0 in starts:
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
        return None, "no start converged"
    results.sort(key=lambda t: t[0])
    best = np.mean([x for _, x in results[:top_k]], axis=0)
    cost = float(np.mean([c for c, _ in results[:top_k]]))
    f = Fit(float(best[0]), float(best[1]), float(best[2]), float(best[3]) if pruning else None, cost)
    return f, (f"dropped {dropped} non-finite points" if dropped else "")
