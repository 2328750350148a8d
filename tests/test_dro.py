"""The controller's math: χ² DRO, the reference ratio, Sheared's update, scaling-law fits."""
from __future__ import annotations

import numpy as np
import pytest

from megadrp.dro import scaling_law
from megadrp.dro.controller import Controller, ControllerSettings, Observation
from megadrp.dro.weights import chi2, dro_weights, sheared_update, update_ratio, worst_mix


def test_dro_hand_computed_two_domains():
    # p uniform, only domain 0 has excess (1, 0). For η < 0, p' ∝ (1−η, −η) and (while c_1 ≥ min_prob)
    # q_raw = p'. χ² = ½(2·q0 − 1)² = ρ = 0.1 gives q0 = (1 + √0.2)/2 = 0.7236.
    res = dro_weights(np.array([2.0, 1.0]), np.array([1.0, 1.0]), np.array([0.5, 0.5]), rho=0.1, min_prob=0.2)
    assert res.converged and res.eta < 0
    assert abs(res.q_raw[0] - (1 + np.sqrt(0.2)) / 2) < 1e-4
    # The floor max(q, min p = 0.5), renormalised once (SPEC §3.2): (0.7236, 0.5)/1.2236.
    assert np.allclose(res.q, np.array([res.q_raw[0], 0.5]) / (res.q_raw[0] + 0.5))
    skewed = dro_weights(np.array([2.0, 1.0, 1.0]), np.array([1.0, 1.0, 1.0]), np.array([0.2, 0.4, 0.4]))
    assert skewed.q[0] > 0.2 and abs(skewed.q.sum() - 1) < 1e-12


@pytest.mark.parametrize("seed", range(20))
def test_dro_invariants(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    p = rng.dirichlet(np.ones(k))
    loss = rng.uniform(1, 4, k)
    ref = loss - rng.normal(0, 0.5, k)
    res = dro_weights(loss, ref, p, rho=0.1)
    assert abs(res.q.sum() - 1) < 1e-12 and (res.q >= 0).all()
    # the floor is applied once, then renormalised: every entry is at least floor / that sum
    assert (res.q >= p.min() / np.maximum(res.q_raw, p.min()).sum() - 1e-12).all()
    if res.converged and res.eta is not None:
        assert abs(chi2(res.q_raw, p) - 0.1) <= 1e-4
    else:
        assert res.reason


def test_dro_no_positive_excess_scales_reference():
    res = dro_weights(np.array([1.0, 2.0]), np.array([1.5, 2.5]), np.array([0.5, 0.5]))
    assert res.ref_scale < 1 and "reference scaled" in res.reason and abs(res.q.sum() - 1) < 1e-12


def test_dro_degenerate():
    one = dro_weights(np.array([2.0]), np.array([1.0]), np.array([1.0]))
    assert one.q.tolist() == [1.0] and "one domain" in one.reason
    nan = dro_weights(np.array([np.nan, 1.0]), np.array([1.0, 1.0]), np.array([0.5, 0.5]))
    assert nan.q.tolist() == [0.5, 0.5] and "non-finite" in nan.reason


@pytest.mark.parametrize("seed", range(40))
def test_worst_mix_is_the_maximum_over_the_ball(seed):
    """`evaluate --shift`'s worst χ² mix: inside the ball, and no feasible mix found by a
    general constrained optimiser (SLSQP from two starts) has a larger mean loss."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    p, loss, rho = rng.dirichlet(np.ones(k)), rng.uniform(1, 5, k), float(rng.choice([0.01, 0.1, 0.5, 2.0, 10.0]))
    q = worst_mix(loss, p, rho)
    assert q.min() >= 0 and q.sum() == pytest.approx(1.0) and chi2(q, p) <= rho * (1 + 1e-6)
    cons = [{"type": "eq", "fun": lambda x: x.sum() - 1}, {"type": "ineq", "fun": lambda x: rho - chi2(x, p)}]
    for x0 in (p, np.ones(k) / k):
        r = minimize(lambda x: -x @ loss, x0, bounds=[(0, 1)] * k, constraints=cons, method="SLSQP")
        if r.success:
            assert q @ loss >= -r.fun - 1e-5


def test_worst_mix_edges():
    p = np.array([0.5, 0.3, 0.2])
    assert np.array_equal(worst_mix(np.array([1.0, 2.0, 3.0]), p, 100.0), [0, 0, 1])  # the ball holds a vertex
    assert np.allclose(worst_mix(np.full(3, 2.0), p, 0.1), p)  # equal losses: nothing to tilt toward
    # two domains tie for the worst: a wide ball holds their shared corner (in p's proportions)
    assert np.allclose(worst_mix(np.array([2.0, 2.0, 1.0]), p, 100.0), [0.625, 0.375, 0.0])
    q = worst_mix(np.array([2.0, 2.0, 1.0]), np.ones(3) / 3, 0.05)
    assert chi2(q, np.ones(3) / 3) == pytest.approx(0.05, rel=1e-6) and q[0] == pytest.approx(q[1])
    q = worst_mix(np.array([1.0, 2.0, 3.0]), p, 0.1)
    assert chi2(q, p) == pytest.approx(0.1, rel=1e-6) and q[2] > p[2] and q[0] < p[0]


def test_update_ratio_clamps():
    p0 = np.array([0.67, 0.045, 0.045, 0.02, 0.045, 0.025, 0.15])
    p = p0.copy()
    for _ in range(200):
        p = update_ratio(p, np.array([0, 0, 0, 1.0, 0, 0, 0]), p0)
        assert abs(p.sum() - 1) < 1e-12
        # the clamps hold up to the renormalisation that follows each (SPEC §3.3, as the reference)
        assert (p >= p0 / 2 * 0.9).all() and (p <= 2 * p0 * 1.15).all()
    assert p[3] > 2 * p0[3]  # pushed to its bound, then past it by the last renormalisation


def test_sheared_update():
    w = sheared_update(np.array([0.5, 0.5]), np.array([2.0, 1.0]), np.array([1.0, 1.0]), eta=1.0, c=1e-4)
    e = np.exp(1.0)
    want = np.array([e, 1.0]) / (e + 1)
    assert np.allclose(w, (1 - 1e-4) * want + 1e-4 / 2)


def test_scaling_law_recovers_parameters():
    rng = np.random.default_rng(0)
    d = np.geomspace(1e6, 1e9, 50)
    loss = np.exp(4.0) * d ** -0.3 + np.exp(0.6) + rng.normal(0, 1e-3, 50)
    fits, why = scaling_law.fit(d, loss)
    f = fits[0]
    assert len(fits) == 3 and why == "" and [x.cost for x in fits] == sorted(x.cost for x in fits)
    assert abs(f.b - 0.3) / 0.3 < 0.05 and abs(np.exp(f.log_e) - np.exp(0.6)) / np.exp(0.6) < 0.03
    s = rng.uniform(0.05, 0.6, 50)
    loss2 = np.exp(4.0) * d ** -0.3 * s ** 0.5 + np.exp(0.6) + rng.normal(0, 1e-3, 50)
    fits2, _ = scaling_law.fit(d, loss2, s)
    f2 = fits2[0]
    assert abs(f2.b2 + 0.5) < 0.05 and abs(f2.b - 0.3) / 0.3 < 0.05


def test_scaling_law_degenerate_inputs():
    fits, why = scaling_law.fit(np.array([1.0, 2.0]), np.array([3.0, 3.0]))
    assert fits == [] and "usable points" in why
    d = np.geomspace(1e5, 1e7, 20)
    fits, why = scaling_law.fit(d, np.full(20, 2.0))
    assert fits and np.isfinite(float(fits[0].predict(1e8)))  # constant: a defined (finite) result
    loss = 2.0 + 1e-8 * d  # rising
    loss[3] = np.nan
    f, why = scaling_law.fit(d, loss)
    assert "dropped 1" in why


def _settings(mode, **kw):
    base = dict(mode=mode, domains=["a", "b", "c"], p0=[0.5, 0.3, 0.2], total_steps=100,
                reference_loss=[2.0, 1.0, 3.0], fit_start=0.1, history_start=0.0)
    base.update(kw)
    return ControllerSettings(**base)


def _curve(step):
    d = np.array([1e5, 1e5, 1e5]) * step
    return (np.array([3.0, 1.5, 3.5]) * (1 + 5 * d ** -0.3)).tolist(), d.tolist()


def test_controller_modes_and_invariants():
    for mode in ("constant", "sheared", "dro", "dro_dyloss", "drpruning"):
        c = Controller(_settings(mode))
        prev_r, fitted = None, np.zeros(3, dtype=bool)
        lows: list = []
        for step in range(5, 101, 5):
            loss, toks = _curve(step)
            d = c.update(Observation(step, loss, toks))
            q = np.array(d.q)
            assert abs(q.sum() - 1) < 1e-9 and (q > 0).all()
            if mode == "constant":
                assert np.allclose(q, [0.5, 0.3, 0.2])
            if prev_r is not None and mode in ("dro_dyloss", "drpruning"):
                # the first fit sets r; from then on r never rises
                assert all(a <= b + 1e-12 for a, b, f in zip(d.reference_loss, prev_r, fitted) if f)
                assert all(r <= min(lo) + 1e-12 for r, lo, f in zip(d.reference_loss, lows, fitted) if f)
            if mode in ("dro_dyloss", "drpruning"):
                fitted |= np.array([v is not None for v in d.fits.values()]) if d.fits else False
            lows = [lows[i] + [loss[i]] for i in range(3)] if prev_r is not None else [[x] for x in loss]
            prev_r = d.reference_loss
            if d.reference_ratio is not None:
                p = np.array(d.reference_ratio)
                # [min p0, max p0] up to the renormalisation after the clamp (SPEC §3.3)
                assert (p >= 0.2 * 0.95).all() and (p <= 0.5 * 1.05).all()
        if mode in ("dro_dyloss", "drpruning"):
            assert any(v is not None for v in d.fits.values())


def test_controller_state_round_trip():
    a = Controller(_settings("drpruning"))
    for step in range(5, 55, 5):
        a.update(Observation(step, *_curve(step)))
    b = Controller(_settings("drpruning"))
    b.load_state_dict(a.state_dict())
    for step in range(55, 101, 5):
        da, db = a.update(Observation(step, *_curve(step))), b.update(Observation(step, *_curve(step)))
        assert da.q == db.q and da.reference_loss == db.reference_loss


def test_controller_history_is_bounded():
    c = Controller(_settings("drpruning", max_points=16, fit_start=2.0))  # no fits: only the history
    for step in range(1, 101):
        c.update(Observation(step, *_curve(step)))
    assert all(len(h) == 16 for h in c.history)


def test_controller_service_reports_its_cpu_and_survives_a_kill(tmp_path):
    """The service's child reports its CPU time with every result (`controller_cpu_seconds` in
    the metrics); a SIGKILLed child is restarted, replays what was pending, gives the decision the
    dead one would have given, and the CPU of the dead child is kept in the total."""
    import os
    import signal

    from megadrp.dro.service import ControllerService

    steps = list(range(5, 101, 5))
    ref = Controller(_settings("drpruning"))
    want = [ref.update(Observation(s, *_curve(s))).q for s in steps]
    svc = ControllerService(_settings("drpruning"), pid_file=tmp_path / "controller.pid")
    try:
        got, cpu = [], []
        for i, s in enumerate(steps):
            svc.submit(Observation(s, *_curve(s)))
            if i == 10:
                os.kill(int((tmp_path / "controller.pid").read_text()), signal.SIGKILL)
            got.append(svc.result().q)
            cpu.append(svc.cpu_seconds)
        assert svc.restarts == 1
        assert got == want
        assert cpu[0] > 0 and all(b >= a for a, b in zip(cpu, cpu[1:]))
    finally:
        svc.close()
