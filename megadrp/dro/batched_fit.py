"""Every domain's scaling-law fit from every start at once (SPEC §3.1, issue #13).

Why: the controller refits every domain at every evaluation. scipy's `least_squares`, one
domain and one start at a time (`scaling_law.fit_each`: 18 or 36 starts per domain), takes
tens of seconds for 64 domains — longer than an evaluation interval of steps, so a decision
could only take effect evaluations late. Here all (problem, start) pairs are one numpy
program: a Levenberg–Marquardt fit of the Huber cost over arrays of (fits, points), so that
decisions can be ready at lag 0.

Same contract as `scaling_law.fit_each`: the same data cleaning and reasons, the same start
grid, the top_k lowest-cost fits, and `Fit.cost` is scipy's Huber cost (loss="huber",
f_scale=δ) at the returned parameters. `scaling_law.fit_each` stays the independent check.

How (each part says why where it is): the fit runs in linear A and E at the centre of the data
(`_Data`); each iteration tries the step from the Huber cost's own curvature and the IRLS step
and keeps the better (`_levenberg_marquardt`); all starts run a few iterations, the best of each
problem go on, and the best few are polished (`_fit_candidates`). Where the cost keeps falling
as E → 0, the fit stops at log E = LOG_FLOOR, further than scipy goes, so its cost is lower.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scaling_law import B2_STARTS, HUBER_DELTA, S_FLOOR, Fit, Problem, starts

BAD_RESIDUAL = 1e6  # what scaling_law's `resid` puts in place of a non-finite residual
# |exponent| of phi is clipped here: phi² and its products with tiny weights stay normal floats
# (no overflow, no slow subnormals); no sane fit comes near e^150.
EXP_CAP = 150.0
# A and E stay ≥ e^−40: where the cost keeps falling as E → 0 (a pure power law fits better),
# the fit stops at log E = −40 instead of wherever scipy's steps ran out (often −5 to −20).
LOG_FLOOR = -40.0
MAX_EXPONENT_STEP = 1.0  # largest change of b or b2 in one step
STUCK_DAMPING = 1e16  # a fit whose damping passes this found no lower cost in any direction
POLISH = 3  # fits per problem polished beyond top_k (see `_fit_candidates`)
# Beyond SPEC §3.1's grid (b2 ∈ {0, −0.5}): steeper sparsity exponents. s runs from ~1e-3 to
# ~0.6 while pruning, so s^(−b2) spans orders of magnitude and basins with b2 of −3 … −6 exist
# that no SPEC start reaches (a real run's history: cost 5.6e-4 there against 7.0e-4 at
# b2 = −2.7). More starts only lower the best cost; they cost ~45% more time.
EXTRA_B2_STARTS = (-2.0, -4.0)


def batched_starts(pruning: bool) -> list[list[float]]:
    """SPEC's start grid, plus the same (log A, b, log E) grid at EXTRA_B2_STARTS for pruning."""
    grid = starts(pruning)
    if pruning:
        grid += [[a, b, e, b2] for a, b, e, _ in starts(True)[::len(B2_STARTS)] for b2 in EXTRA_B2_STARTS]
    return grid


SCREEN_ITER, SCREEN_KEEP = 8, 12  # after 8 iterations, each problem's best 12 starts go on


@dataclass
class _Data:
    """Per-fit copies of the problems' points, padded to one length: arrays are (fits, points).

    log D and log s are centred per problem (x, z), and the fit runs in a = A·exp(−b·mean log D
    − b2·mean log s), the power-law term at the centre of the data, and in E itself — linear
    coefficients: the model is a·exp(−b·x − b2·z) + E. In log A and log E the valley where A and
    E trade off (small b) is curved and Gauss–Newton crawls along it; in a and E it is straight."""

    x: np.ndarray  # log D − mean, 0 at padding
    z: np.ndarray | None  # log max(s, S_FLOOR) − mean, pruning law only
    y: np.ndarray  # observed loss
    mask: np.ndarray  # 1.0 for a real point, 0.0 for padding
    basis: np.ndarray  # (fits, points, m): 1, x[, z], x²[, xz, z²] — the products the normal equations sum
    linear: np.ndarray  # (fits, points, l): 1, x[, z]
    mean_x: np.ndarray  # (fits,)
    mean_z: np.ndarray | None

    def take(self, i: np.ndarray) -> _Data:
        return _Data(self.x[i], None if self.z is None else self.z[i], self.y[i], self.mask[i], self.basis[i],
                     self.linear[i], self.mean_x[i], None if self.mean_z is None else self.mean_z[i])


# ---- data ------------------------------------------------------------------------------------
def _clean(d, loss, s) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """`scaling_law.fit`'s cleaning: drop non-finite points and D ≤ 0; count what was dropped."""
    d, loss = np.asarray(d, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    ok = np.isfinite(d) & np.isfinite(loss) & (d > 0)
    if s is not None:
        s = np.asarray(s, dtype=np.float64)
        ok &= np.isfinite(s)
        s = s[ok]
    return d[ok], loss[ok], s, int((~ok).sum())


def _pack(cleaned: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], pruning: bool) -> _Data:
    """One row per problem, padded to the longest history; padded points get mask 0, so they
    weigh nothing in any sum."""
    n, p = max(len(c[0]) for c in cleaned), len(cleaned)
    x, y, mask = np.zeros((p, n)), np.zeros((p, n)), np.zeros((p, n))
    z = np.zeros((p, n)) if pruning else None
    for i, (d, loss, s) in enumerate(cleaned):
        k = len(d)
        x[i, :k], y[i, :k], mask[i, :k] = np.log(d), loss, 1.0
        if z is not None:
            z[i, :k] = np.log(np.maximum(s, S_FLOOR))
    count = mask.sum(axis=1)
    mean_x = (x * mask).sum(axis=1) / count
    x = (x - mean_x[:, None]) * mask
    mean_z = None
    if z is not None:
        mean_z = (z * mask).sum(axis=1) / count
        z = (z - mean_z[:, None]) * mask
        basis = np.stack([mask, x, z, x * x, x * z, z * z], axis=-1)
    else:
        basis = np.stack([mask, x, x * x], axis=-1)
    linear = np.ascontiguousarray(basis[:, :, :3 if pruning else 2])
    return _Data(x, z, y, mask, basis, linear, mean_x, mean_z)


def _shift(theta: np.ndarray, data: _Data) -> np.ndarray:
    """log of the factor between A and a: a = A·exp(−shift)."""
    out = theta[:, 1] * data.mean_x
    if data.mean_z is not None:
        out = out + theta[:, 3] * data.mean_z
    return out


def _to_internal(theta: np.ndarray, data: _Data) -> np.ndarray:
    """(log A, b, log E[, b2]) → (a, b, E[, b2])."""
    out = theta.copy()
    out[:, 0] = np.exp(np.clip(theta[:, 0] - _shift(theta, data), LOG_FLOOR, EXP_CAP))
    out[:, 2] = np.exp(np.clip(theta[:, 2], LOG_FLOOR, EXP_CAP))
    return out


def _to_external(theta: np.ndarray, data: _Data) -> np.ndarray:
    out = theta.copy()
    out[:, 0] = np.log(theta[:, 0]) + _shift(theta, data)
    out[:, 2] = np.log(theta[:, 2])
    return out


class _Buffers:
    """Scratch arrays of (fits, points) for one size of the working set, reused every iteration.
    Without them an iteration makes ~45 fresh 1 MB temporaries (64 domains × 36 starts × 64
    points); glibc maps each from the OS and unmaps it on free, and the page faults cost as
    much as the arithmetic."""

    def __init__(self, shape: tuple[int, int]) -> None:
        k, n = shape
        self.r = [np.empty(shape), np.empty(shape)]  # the two trial steps' residuals
        self.phi = [np.empty(shape), np.empty(shape)]
        self.tmp = [np.empty(shape) for _ in range(3)]
        self.flag = np.empty(shape, dtype=bool)
        self.w_p = np.empty((k, 3, n))  # point weights × phi
        self.w_pp = np.empty((k, 2, n))  # point weights × phi²


# ---- cost and its derivatives ----------------------------------------------------------------
def _residuals(theta: np.ndarray, data: _Data, buf: _Buffers | None = None, which: int = 0,
               ) -> tuple[np.ndarray, np.ndarray]:
    """(r, phi) at every point: r = prediction − loss (0 at padding), phi = exp(−b·x − b2·z), so
    the power-law term is a·phi. The exponent is clipped at ±EXP_CAP, so nothing overflows; a
    fit out there has a huge cost either way. (Fit.cost is recomputed unclipped, `_scipy_cost`.)
    With buf, written into buf.r[which], buf.phi[which]."""
    shape = data.x.shape
    r, phi = (buf.r[which], buf.phi[which]) if buf else (np.empty(shape), np.empty(shape))
    np.multiply(-theta[:, 1, None], data.x, out=phi)
    if data.z is not None:
        tmp = buf.tmp[0] if buf else np.empty(shape)
        np.multiply(theta[:, 3, None], data.z, out=tmp)
        phi -= tmp
    np.clip(phi, -EXP_CAP, EXP_CAP, out=phi)
    np.exp(phi, out=phi)
    np.multiply(theta[:, 0, None], phi, out=r)
    r += theta[:, 2, None]
    r -= data.y
    r *= data.mask
    return r, phi


def huber_cost(r: np.ndarray, buf: _Buffers | None = None) -> np.ndarray:
    """scipy's cost for loss="huber", f_scale=δ, summed over the last axis:
    0.5·Σ δ²·ρ(r²/δ²) with ρ(z) = z if z ≤ 1 else 2√z − 1, i.e. r²/2 inside δ, δ|r| − δ²/2 outside.
    Written as Σ m·|r| − m²/2 with m = min(|r|, δ), one expression for both branches."""
    a = np.abs(r, out=buf.tmp[1] if buf else None)
    m = np.minimum(a, HUBER_DELTA, out=buf.tmp[2] if buf else None)
    return np.einsum("...j,...j->...", m, a) - 0.5 * np.einsum("...j,...j->...", m, m)


# Jacobian columns, by parameter slot: a → phi, b → −x·a·phi, E → 1, b2 → −z·a·phi, i.e.
# phi·scale·u with u = (1, −x, −z): scaling_law's `jac` by the chain rule (its log A and log E
# columns are these times a and E; its b column uses log D where this uses the centred x). _PAIRS: for two power-law slots, the basis column holding
# Σ w·u_i·u_j; _LINEAR: the basis column of Σ w·u_i.
_SIGN = {0: 1.0, 1: -1.0, 3: -1.0}
_PAIRS = {False: {(0, 0): 0, (0, 1): 1, (1, 1): 2},
          True: {(0, 0): 0, (0, 1): 1, (0, 3): 2, (1, 1): 3, (1, 3): 4, (3, 3): 5}}
_LINEAR = {False: {0: 0, 1: 1}, True: {0: 0, 1: 1, 3: 2}}


def _normal_equations(theta: np.ndarray, r: np.ndarray, phi: np.ndarray, data: _Data, buf: _Buffers,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H_exact, H_irls, g) for the Huber cost at θ.

    g = Jᵀψ(r), ψ = clip(r, ±δ): the exact gradient. H_exact = Jᵀ diag(ρ'') J, ρ'' = 1 inside δ
    and 0 outside: the cost's own curvature (scipy's robust-loss scaling amounts to the same).
    H_irls = Jᵀ diag(δ/max(|r|, δ)) J: the curvature of the quadratic that majorises the
    Huber cost at r (IRLS); it sees the points outside δ that a longer step would flip."""
    absr = np.abs(r, out=buf.tmp[0])
    inside = np.multiply(np.less_equal(absr, HUBER_DELTA, out=buf.flag), data.mask, out=buf.tmp[1])
    irls = np.maximum(absr, HUBER_DELTA, out=buf.tmp[2])
    np.divide(HUBER_DELTA, irls, out=irls)
    irls *= data.mask
    psi = np.clip(r, -HUBER_DELTA, HUBER_DELTA, out=buf.tmp[0])
    # The sums over points as stacked products (rows: point weights, columns: basis functions);
    # only the products some entry needs: 24 per point for the pruning law instead of 48.
    w_p, w_pp = buf.w_p, buf.w_pp
    np.multiply(inside, phi, out=w_p[:, 0])
    np.multiply(irls, phi, out=w_p[:, 1])
    np.multiply(psi, phi, out=w_p[:, 2])
    np.multiply(w_p[:, 0], phi, out=w_pp[:, 0])
    np.multiply(w_p[:, 1], phi, out=w_pp[:, 1])
    s_pp = np.matmul(w_pp, data.basis)
    s_p = np.matmul(w_p, data.linear)
    s_1 = np.stack([inside.sum(-1), irls.sum(-1), psi.sum(-1)], axis=1)
    pruning = data.z is not None
    scale = {0: np.ones(len(theta)), 1: theta[:, 0], 3: theta[:, 0]}  # d(a·phi)/dθ_i = phi·scale_i·u_i
    h_exact = _assemble(s_pp[:, 0], s_p[:, 0], s_1[:, 0], scale, pruning)
    h_irls = _assemble(s_pp[:, 1], s_p[:, 1], s_1[:, 1], scale, pruning)
    g = np.empty((len(theta), 4 if pruning else 3))
    for i, k in _LINEAR[pruning].items():
        g[:, i] = _SIGN[i] * scale[i] * s_p[:, 2, k]
    g[:, 2] = s_1[:, 2]
    return h_exact, h_irls, g


def _assemble(s_pp: np.ndarray, s_p: np.ndarray, s_1: np.ndarray, scale: dict[int, np.ndarray], pruning: bool,
              ) -> np.ndarray:
    """JᵀWJ from the sums Σ w·phi²·basis (s_pp), Σ w·phi·basis (s_p) and Σ w (s_1)."""
    n = 4 if pruning else 3
    h = np.empty((len(s_1), n, n))
    for (i, j), k in _PAIRS[pruning].items():
        h[:, i, j] = h[:, j, i] = _SIGN[i] * _SIGN[j] * scale[i] * scale[j] * s_pp[:, k]
    for i, k in _LINEAR[pruning].items():
        h[:, i, 2] = h[:, 2, i] = _SIGN[i] * scale[i] * s_p[:, k]
    h[:, 2, 2] = s_1
    return h


def _cholesky_solve(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Solve a·x = b for a stack of small SPD matrices with numpy ops over the stack (a LAPACK
    call per 4×4 matrix costs more than its arithmetic, and np.linalg.solve raises for the
    whole stack if one matrix is singular). ok is False where a pivot is not positive."""
    n = a.shape[-1]
    low = np.zeros_like(a)
    ok = np.ones(a.shape[:-2], dtype=bool)
    for j in range(n):
        piv = a[:, j, j] - (low[:, j, :j] ** 2).sum(-1)
        ok &= piv > 0
        low[:, j, j] = np.sqrt(np.where(piv > 0, piv, 1.0))
        for i in range(j + 1, n):
            low[:, i, j] = (a[:, i, j] - (low[:, i, :j] * low[:, j, :j]).sum(-1)) / low[:, j, j]
    y = np.zeros_like(b)
    for i in range(n):
        y[:, i] = (b[:, i] - (low[:, i, :i] * y[:, :i]).sum(-1)) / low[:, i, i]
    x = np.zeros_like(b)
    for i in reversed(range(n)):
        x[:, i] = (y[:, i] - (low[:, i + 1:, i] * x[:, i + 1:]).sum(-1)) / low[:, i, i]
    ok &= np.isfinite(x).all(-1)
    return np.where(ok[:, None], x, 0.0), ok


# ---- the fit ---------------------------------------------------------------------------------
def _damped_step(theta: np.ndarray, h: np.ndarray, g: np.ndarray, damp: np.ndarray, lam: np.ndarray,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trial θ, predicted decrease, ok) from (H + λ·damp·I) step = −g.

    a and E stay ≥ e^LOG_FLOOR: one that sits on its floor with the gradient pushing down is
    held there (its row and column dropped from the system), and a step that would cross a
    floor is cut at it. The exponents b, b2 move at most MAX_EXPONENT_STEP per step (the whole
    step is scaled), so one step cannot jump to where the linearisation says nothing."""
    floor = np.exp(LOG_FLOOR)
    n = h.shape[-1]
    held = np.zeros(g.shape, dtype=bool)
    for i in (0, 2):
        held[:, i] = (theta[:, i] <= floor * (1 + 1e-9)) & (g[:, i] > 0)
    free = (~held).astype(float)
    a = h * free[:, :, None] * free[:, None, :]
    diag = np.arange(n)
    a[:, diag, diag] += (lam * damp)[:, None] + held  # held: the row reads 1·step = 0
    step, ok = _cholesky_solve(a, -g * free)
    expo = [1, 3] if n == 4 else [1]
    biggest = np.abs(step[:, expo]).max(axis=1)
    step *= np.minimum(1.0, MAX_EXPONENT_STEP / np.maximum(biggest, 1e-300))[:, None]
    trial = theta + step
    for i in (0, 2):
        trial[:, i] = np.maximum(trial[:, i], floor)
    step = trial - theta
    predicted = -(step * g).sum(1) - 0.5 * np.einsum("ki,kij,kj->k", step, h, step)
    return trial, predicted, ok


@dataclass
class _Fits:
    """The fits still being worked on: parameters (internal), residuals, phi, cost, and the
    damping λ and its growth factor ν, (fits, 2): column 0 for the exact-curvature step, 1 for the
    IRLS step (see `_levenberg_marquardt` for why each has its own)."""

    theta: np.ndarray
    r: np.ndarray
    phi: np.ndarray
    cost: np.ndarray
    lam: np.ndarray
    nu: np.ndarray
    rows: np.ndarray  # where each fit's result goes in the caller's arrays
    data: _Data

    def take(self, keep: np.ndarray) -> _Fits:
        return _Fits(self.theta[keep], self.r[keep], self.phi[keep], self.cost[keep], self.lam[keep], self.nu[keep],
                     self.rows[keep], self.data.take(keep))


def _two_steps(f: _Fits, h_exact: np.ndarray, h_irls: np.ndarray, g: np.ndarray, damp: np.ndarray,
               buf: _Buffers) -> tuple[np.ndarray, ...]:
    """The step from H_exact with damping λ[:, 0] and the one from H_irls with λ[:, 1], solved in
    one stacked call: (trial θ, predicted decrease, cost), each (2, fits, …) with row 0 the exact
    step; the residuals and phi of row j are in buf.r[j], buf.phi[j]."""
    n = len(f.theta)
    two = np.concatenate
    trial, predicted, ok = _damped_step(two([f.theta, f.theta]), two([h_exact, h_irls]), two([g, g]),
                                        two([damp, damp]), two([f.lam[:, 0], f.lam[:, 1]]))
    trial, predicted, ok = trial.reshape(2, n, -1), predicted.reshape(2, n), ok.reshape(2, n)
    cost = np.stack([np.where(ok[j], huber_cost(_residuals(trial[j], f.data, buf, j)[0], buf), np.inf)
                     for j in (0, 1)])
    return trial, predicted, cost


def _levenberg_marquardt(theta: np.ndarray, data: _Data, max_iter: int, ftol: float,
                         lam0: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Fit every row of theta (internal coordinates) at once; returns (θ, cost).

    Each iteration tries two steps per fit, from the exact Huber curvature and from the IRLS
    curvature (see `_normal_equations`), and keeps the one with the lower cost if that is lower
    than the fit's cost now. The exact step lands on the minimum when few points change side of
    ±δ; the IRLS step goes further when many do. Each step has its own damping λ, updated by
    whether that step lowered the cost (Nielsen's schedule: ×max(1/3, 1 − (2·gain − 1)³) if it
    did, ×2, ×4, ×8, … if not). Why two: where fewer points lie inside δ than there are
    parameters, H_exact is singular along the valley, the undamped exact step overshoots to
    infinity there and fails, while the IRLS step, conservative, succeeds a little every time;
    with one λ shared, its successes drove λ to zero and the exact step failed forever, so the
    fit crawled (1000 iterations on a 5-point history with one outlier). With its own λ the exact
    step grows its damping until it lands on the next point to cross δ, and then converges as
    Newton does. A fit stops when an accepted step lowers its cost by ≤ ftol·cost, or when both
    λ pass STUCK_DAMPING (no lower cost even along the gradient), or after max_iter tries.
    Finished fits are dropped from the working arrays once a fifth of them is finished."""
    theta, out_cost = theta.copy(), np.empty(len(theta))
    r, phi = _residuals(theta, data)
    k = len(theta)
    f = _Fits(theta, r, phi, huber_cost(r), np.full((k, 2), lam0), np.full((k, 2), 2.0), np.arange(k), data)
    buf = _Buffers(r.shape)
    active = np.ones(k, dtype=bool)  # fits in f not finished yet
    for _ in range(max_iter):
        h_exact, h_irls, g = _normal_equations(f.theta, f.r, f.phi, f.data, buf)
        # isotropic damping at the scale of the largest curvature
        damp = np.diagonal(h_irls, axis1=1, axis2=2).max(axis=1) + 1e-300
        trials, predicted, costs = _two_steps(f, h_exact, h_irls, g, damp, buf)
        lowered = active & (costs < f.cost)  # (2, fits): did this step lower the cost?
        gain = np.clip((f.cost - costs) / np.maximum(predicted, 1e-300), 0.0, 1.0)
        f.lam = np.where(lowered.T, f.lam * np.maximum(1 / 3, 1 - (2 * gain.T - 1) ** 3), f.lam * f.nu)
        f.nu = np.where(lowered.T, 2.0, f.nu * 2)
        pick = (costs[1] < costs[0]).astype(int)  # the lower of the two, per fit
        fits = np.arange(len(pick))
        c_new = costs[pick, fits]
        better = lowered[pick, fits]
        done = better & (f.cost - c_new <= ftol * f.cost)
        f.theta = np.where(better[:, None], trials[pick, fits], f.theta)
        for j in (0, 1):
            take = (better & (pick == j))[:, None]
            np.copyto(f.r, buf.r[j], where=take)
            np.copyto(f.phi, buf.phi[j], where=take)
        f.cost = np.where(better, c_new, f.cost)
        done |= active & (f.lam > STUCK_DAMPING).all(axis=1)
        if done.any():
            theta[f.rows[done]], out_cost[f.rows[done]] = f.theta[done], f.cost[done]
            active &= ~done
            if not active.any():
                return theta, out_cost
            if active.sum() <= 0.8 * len(active):
                f, active = f.take(active), np.ones(int(active.sum()), dtype=bool)
                buf = _Buffers(f.r.shape)
    theta[f.rows[active]], out_cost[f.rows[active]] = f.theta[active], f.cost[active]
    return theta, out_cost


def _scipy_cost(theta: np.ndarray, d: np.ndarray, loss: np.ndarray, s: np.ndarray | None) -> np.ndarray:
    """scipy's cost at external parameters (fits, n) on one problem's points, computed as
    scaling_law's `resid` does (non-finite residual → BAD_RESIDUAL), so Fit.cost means the same."""
    with np.errstate(over="ignore", invalid="ignore"):
        term = np.exp(theta[:, 0, None] - theta[:, 1, None] * np.log(d))
        if s is not None:
            term = term * np.exp(-theta[:, 3, None] * np.log(np.maximum(s, S_FLOOR)))
        r = term + np.exp(theta[:, 2, None]) - loss
    return huber_cost(np.where(np.isfinite(r), r, BAD_RESIDUAL))


def fit_batch(problems: list[Problem], pruning: bool, top_k: int = 3, max_iter: int = 25,
              polish_iter: int = 100) -> list[tuple[list[Fit], str]]:
    """`scaling_law.fit_each`, all problems and starts in one vectorised fit: per problem, the
    top_k fits (lowest Huber cost first) and a reason ("" on success, or how many non-finite
    points were dropped; no fits and "only N usable points" below 3 points). max_iter: iterations
    of the starts (the screened ones, see `_fit_candidates`); polish_iter: of the best few."""
    out: list[tuple[list[Fit], str]] = [([], "")] * len(problems)
    cleaned, where, dropped = [], [], []
    for i, (d, loss, s) in enumerate(problems):
        d, loss, s, n_bad = _clean(d, loss, s if pruning else None)
        if len(d) < 3:
            out[i] = ([], f"only {len(d)} usable points")
            continue
        cleaned.append((d, loss, s))
        where.append(i)
        dropped.append(n_bad)
    if not cleaned:
        return out
    candidates = _fit_candidates(cleaned, pruning, top_k + POLISH, max_iter, polish_iter)
    for (d, loss, s), cand, i, n_bad in zip(cleaned, candidates, where, dropped):
        fits = _select(cand, _scipy_cost(cand, d, loss, s), top_k)
        why = "no start converged" if not fits else f"dropped {n_bad} non-finite points" if n_bad else ""
        out[i] = (fits, why)
    return out


def _fit_candidates(cleaned: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], pruning: bool, keep: int,
                    max_iter: int, polish_iter: int) -> np.ndarray:
    """Every start of every problem, then the `keep` best of each polished: (problems, keep, n),
    external parameters.

    Three rounds, each on the best fits of the one before: all starts for SCREEN_ITER iterations
    (to a relative cost change of 1e-8, scipy's ftol); the best SCREEN_KEEP of each problem on to
    max_iter; the best `keep` of each polished for up to polish_iter more, to 1e-13. After a few
    iterations most starts are far above their problem's best (the best never came from them in
    the benchmark's histories), and only the best can be selected; the few still moving at the end
    (a slow valley: b against b2 when log s nearly follows log D, or E → 0) get there without the
    whole grid paying for it."""
    grid = np.array(batched_starts(pruning), dtype=np.float64)
    n_start, n_prob = len(grid), len(cleaned)
    data = _pack(cleaned, pruning).take(np.repeat(np.arange(n_prob), n_start))  # start-major within a problem
    theta = _to_internal(np.tile(grid, (n_prob, 1)), data)
    rounds = [(min(SCREEN_ITER, max_iter), 1e-8, 1e-3, max(SCREEN_KEEP, keep)),
              (max(max_iter - SCREEN_ITER, 0), 1e-8, 1e-3, keep),
              (polish_iter, 1e-13, 1e-6, None)]  # polish from a small damping: these fits are near their minimum
    width = n_start  # fits per problem in this round
    for iters, ftol, lam0, next_width in rounds:
        theta, cost = _levenberg_marquardt(theta, data, iters, ftol, lam0) if iters else (theta, _cost(theta, data))
        if next_width is None or next_width >= width:
            continue
        best = np.argsort(cost.reshape(n_prob, width), axis=1, kind="stable")[:, :next_width]
        rows = (best + np.arange(n_prob)[:, None] * width).ravel()
        theta, data, width = theta[rows], data.take(rows), next_width
    return _to_external(theta, data).reshape(n_prob, width, -1)


def _cost(theta: np.ndarray, data: _Data) -> np.ndarray:
    return huber_cost(_residuals(theta, data)[0])


def _select(cand: np.ndarray, cost: np.ndarray, top_k: int) -> list[Fit]:
    """The top_k finite candidates by cost, lowest first, as Fits (cost: scipy's definition)."""
    good = np.isfinite(cost) & np.isfinite(cand).all(1)
    order = [k for k in np.argsort(cost, kind="stable") if good[k]][:top_k]
    return [Fit(float(cand[k, 0]), float(cand[k, 1]), float(cand[k, 2]),
                float(cand[k, 3]) if cand.shape[1] == 4 else None, float(cost[k])) for k in order]
