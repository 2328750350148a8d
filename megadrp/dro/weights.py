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
    """q_i ← max(q_i, floor), then renormalise once (SPEC §3.2, as the reference computes
    it). After the renormalisation an entry may sit slightly below the floor; exact
    water-filling would differ from the reference's weights, so it is not done here."""
    return normalise(np.maximum(normalise(q), floor))


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


def worst_mix(loss: np.ndarray, p: np.ndarray, rho: float) -> np.ndarray:
    """The mix q in the χ² ball ½·Σ p_i(q_i/p_i − 1)² ≤ ρ around p with the largest mean loss
    q·loss: the DRO objective itself (SPEC §3.2, without the floor a sampler needs).
    q_i ∝ p_i·(loss_i − η)₊ with η set so the ball's edge is reached; a ball wide enough to
    hold the worst domain alone gives that domain."""
    loss, p = np.asarray(loss, dtype=np.float64), normalise(p)
    if np.ptp(loss) == 0:
        return p.copy()  # nothing to tilt toward
    worst = p * (loss == loss.max())  # the worst domains (ties share), in p's proportions
    corner = worst / worst.sum()
    if chi2(corner, p) <= rho:
        return corner
    r = dro_weights(loss - loss.min() + 1.0, np.zeros_like(loss), p, rho=rho, min_prob=0.0, tol=1e-9, max_iter=400)
    if not r.converged:
        raise ValueError(f"worst mix in the χ² ball of radius {rho}: {r.reason}")
    return r.q_raw


def update_ratio(p: np.ndarray, q: np.ndarray, p0: np.ndarray, momentum: float = 0.9) -> np.ndarray:
    """Move the reference ratio toward q (SPEC §3.3), the two clamps applied in sequence as
    the reference code does: p ← normalise(0.9·p + 0.1·q); clamp to [p0/2, 2·p0],
    normalise; clamp to [min p0, max p0], normalise. Each normalisation may push an entry
    slightly back outside the box it was just clamped to; that is the reference's rule."""
    p0 = normalise(p0)
    new = normalise(momentum * np.asarray(p, dtype=np.float64) + (1 - momentum) * np.asarray(q, dtype=np.float64))
    new = normalise(np.clip(new, p0 / 2, 2 * p0))
    return normalise(np.clip(new, p0.min(), p0.max()))


def sheared_update(w: np.ndarray, loss: np.ndarray, ref: np.ndarray, eta: float = 1.0, c: float = 1e-4) -> np.ndarray:
    """Sheared-LLaMA's dynamic batch loading: exponentiated gradient on the excess loss,
    smoothed toward uniform."""
    logits = np.log(np.asarray(w, dtype=np.float64)) + eta * (np.asarray(loss) - np.asarray(ref))
    logits -= logits.max()
    new = normalise(np.exp(logits))
    return (1 - c) * new + c / len(new)
