"""Domain-weight updates (SPEC §3.2–3.4): χ² DRO, the reference-ratio move, Sheared-LLaMA's
dynamic batch loading. Pure numpy; every function returns a reason string when it had to
fall back, so the controller can log why.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    s = x.sum()
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"cannot normalise {x}")
    return x / s


def apply_floor(q: np.ndarray, floor: float) -> np.ndarray:
    """The distribution closest in ratio to q with every entry >= floor (water-filling:
    entries below the floor are fixed at it, the rest share what is left in proportion).
    Needs len(q)·floor <= 1, which holds for floor = min p."""
    q = normalise(q)
    fixed = np.zeros(len(q), dtype=bool)
    while True:
        out = np.full(len(q), floor)
        free = ~fixed
        out[free] = q[free] / q[free].sum() * (1.0 - floor * fixed.sum())
        newly = free & (out < floor)
        if not newly.any():
            return out
        fixed |= newly


def chi2(q: np.ndarray, p: np.ndarray) -> float:
    """½·Σ p_i·(q_i/p_i − 1)²."""
    return float(0.5 * np.sum(p * (q / p - 1.0) ** 2))


@dataclass
class DROResult:
    q: np.ndarray  # final sampling weights: every q_i >= min p
    q_raw: np.ndarray  # worst case before the floor (its χ² is ρ when converged)
    eta: float | None
    converged: bool
    ref_scale: float  # factor applied to r to get a positive excess (1.0 when none was needed)
    reason: str  # "" when nothing unusual happened


def _worst_case(p: np.ndarray, excess: np.ndarray, eta: float, min_prob: float) -> np.ndarray:
    w = p * np.maximum(excess - eta, 0.0)
    if w.sum() <= 0:
        return p.copy()
    c = normalise(w) / p
    return normalise(p * np.maximum(c, min_prob))


def dro_weights(loss: np.ndarray, ref: np.ndarray, p: np.ndarray, rho: float = 0.1, min_prob: float = 0.2,
                tol: float = 1e-4, max_iter: int = 200) -> DROResult:
    """Worst-case q in the χ² ball of radius ρ around p, tilted toward positive excess."""
    loss, ref, p = (np.asarray(a, dtype=np.float64) for a in (loss, ref, p))
    p = normalise(p)
    floor = p.min()
    reasons = []
    if len(p) == 1:
        return DROResult(p.copy(), p.copy(), None, True, 1.0, "one domain: weights stay 1")
    if not (np.all(np.isfinite(loss)) and np.all(np.isfinite(ref))):
        return DROResult(p.copy(), p.copy(), None, False, 1.0, "non-finite loss or reference: keeping q = p")
    scale, excess = 1.0, loss - ref
    k = 0
    while not np.any(excess > 0):
        k += 1
        scale = max(0.0, 1.0 - 0.1 * k)
        excess = loss - scale * ref
        if scale == 0.0:
            break
    if scale != 1.0:
        reasons.append(f"no positive excess: reference scaled by {scale:.1f}")
    if not np.any(excess > 0):
        return DROResult(p.copy(), p.copy(), None, False, scale, "; ".join(reasons + ["no positive excess at all: keeping q = p"]))

    def f(eta: float) -> float:
        return chi2(_worst_case(p, excess, eta, min_prob), p) - rho

    hi = float(excess.max()) - 1e-12
    span = float(excess.max() - excess.min()) + 1.0
    lo = float(excess.min()) - span
    while f(lo) > 0:  # far enough left the tilt vanishes; widen until it does
        lo -= 10 * span
        span *= 10
        if span > 1e12:
            break
    f_lo, f_hi = f(lo), f(hi)
    if not (f_lo <= 0 <= f_hi):
        reasons.append(f"bisection failed (χ² reachable in [{f_lo + rho:.3g}, {f_hi + rho:.3g}], ρ={rho}): keeping q = p")
        return DROResult(p.copy(), p.copy(), None, False, scale, "; ".join(reasons))
    eta = lo
    converged = False
    for _ in range(max_iter):
        eta = 0.5 * (lo + hi)
        v = f(eta)
        if abs(v) <= tol:
            converged = True
            break
        if v > 0:
            hi = eta
        else:
            lo = eta
    if not converged:
        reasons.append(f"bisection did not reach tolerance {tol} in {max_iter} steps: keeping q = p")
        return DROResult(p.copy(), p.copy(), None, False, scale, "; ".join(reasons))
    q_raw = _worst_case(p, excess, eta, min_prob)
    q = apply_floor(q_raw, floor)
    return DROResult(q, q_raw, eta, True, scale, "; ".join(reasons))


def box_normalise(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, iters: int = 200) -> np.ndarray:
    """Σ clip(s·x, lo, hi) = 1 for the scale s found by bisection: "clamp, then normalise"
    done so that the result really lies inside the box (a plain renormalisation after a
    clamp can push entries back out). Needs Σlo <= 1 <= Σhi."""
    x = np.asarray(x, dtype=np.float64)
    if lo.sum() > 1 + 1e-12 or hi.sum() < 1 - 1e-12:
        raise ValueError("box does not contain a distribution")
    a, b = 0.0, 1.0
    while np.clip(b * x, lo, hi).sum() < 1:
        b *= 2
        if b > 1e300:
            break
    for _ in range(iters):
        m = 0.5 * (a + b)
        if np.clip(m * x, lo, hi).sum() < 1:
            a = m
        else:
            b = m
    out = np.clip(b * x, lo, hi)
    return out / out.sum()


def update_ratio(p: np.ndarray, q: np.ndarray, p0: np.ndarray, momentum: float = 0.9) -> np.ndarray:
    """Move the reference ratio toward q, keeping it inside [p0/2, 2·p0] and [min p0, max p0]
    (both clamps of SPEC §3.3 at once, so neither is undone by the other's normalisation)."""
    p0 = normalise(p0)
    new = normalise(momentum * np.asarray(p) + (1 - momentum) * np.asarray(q))
    lo = np.maximum(p0 / 2, p0.min())
    hi = np.minimum(2 * p0, p0.max())
    return box_normalise(new, lo, hi)


def sheared_update(w: np.ndarray, loss: np.ndarray, ref: np.ndarray, eta: float = 1.0, c: float = 1e-4) -> np.ndarray:
    """Sheared-LLaMA's dynamic batch loading: exponentiated gradient on the excess loss,
    smoothed toward uniform."""
    logits = np.log(np.asarray(w, dtype=np.float64)) + eta * (np.asarray(loss) - np.asarray(ref))
    logits -= logits.max()
    new = normalise(np.exp(logits))
    return (1 - c) * new + c / len(new)
