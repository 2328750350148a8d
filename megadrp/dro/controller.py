"""The domain-weight controller: a deterministic state machine over evaluation numbers.

`Controller.update(obs)` takes one evaluation (step, per-domain loss, tokens trained,
sparsity) and returns the next sampling weights q with everything worth logging (r, p,
fits, predictions, reasons). It knows nothing of processes or tensors; `service.py` runs it
in a child process of rank 0 (restartable, its state checkpointed).

Modes (SPEC §3.4): constant, sheared, dro, dro_dyloss, drpruning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from megadrp.dro import batched_fit, scaling_law
from megadrp.dro.constants import DROConstants
from megadrp.dro.weights import dro_weights, normalise, sheared_update, update_ratio

log = logging.getLogger("megadrp.dro")
MODES = ("constant", "sheared", "dro", "dro_dyloss", "drpruning")


@dataclass(kw_only=True)
class ControllerSettings(DROConstants):
    """What the controller is given: the constants (megadrp/dro/constants.py) and what the run
    knows. Only numbers, never the config."""

    mode: str
    domains: list[str]
    p0: list[float]
    total_steps: int
    reference_loss: list[float] | None  # None: the first evaluation's losses ("auto")
    pruning: bool = False
    seed: int = 0

    @classmethod
    def from_config(cls, dro, **run) -> "ControllerSettings":
        """The constants from `dro` (a `megadrp.config.DROConfig`, which extends the same
        DROConstants) and `mode`; `run` gives what the run knows (domains, p0, resolved reference
        losses, ...)."""
        shared = {f.name: getattr(dro, f.name) for f in fields(DROConstants)}
        return cls(**shared, mode=dro.mode, **run)


@dataclass
class Observation:
    step: int
    loss: list[float]  # the signal: eval loss, or the training-loss EMA
    tokens: list[float]  # tokens trained so far per domain, all ranks
    sparsity: float = 0.0  # expected sparsity of the model (pruning)
    target_sparsity: float = 0.0  # this step's ramped target sparsity (what predictions use)


@dataclass
class Decision:
    step: int
    q: list[float]
    reference_loss: list[float] | None
    reference_ratio: list[float] | None
    fits: dict[str, dict[str, float] | None] = field(default_factory=dict)
    predicted_loss: dict[str, float | None] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


class Controller:
    def __init__(self, s: ControllerSettings) -> None:
        if s.mode not in MODES:
            raise ValueError(f"dro.mode={s.mode!r}: expected one of {', '.join(MODES)}")
        self.s = s
        k = len(s.domains)
        self.p0 = normalise(np.asarray(s.p0, dtype=np.float64))
        self.p = self.p0.copy()
        self.q = self.p0.copy()
        self.r = None if s.reference_loss is None else np.asarray(s.reference_loss, dtype=np.float64)
        self.fitted = np.zeros(k, dtype=bool)
        self.history: list[list[tuple[float, float, float]]] = [[] for _ in range(k)]
        self.rng = np.random.default_rng([s.seed, 0xD50])
        self.updates = 0
        # All domains × all starts in one vectorised fit (milliseconds, so a decision is ready
        # for the very next step); scipy's per-problem `scaling_law.fit_each` is the check.
        self.fit_problems = batched_fit.fit_batch

    # ---- one evaluation ------------------------------------------------------------------
    def update(self, obs: Observation) -> Decision:
        s = self.s
        loss = np.asarray(obs.loss, dtype=np.float64)
        reasons: list[str] = []
        if self.r is None:  # reference_loss: auto
            self.r = loss.copy()
            reasons.append("reference loss set from this evaluation (auto)")
        if obs.step == 0:
            # SPEC §3 Timing: an evaluation before any training only sets `auto` references;
            # steps 1 … interval train on p0, and no update is counted.
            reasons.append("step 0: no decision (weights stay p0)")
            return self._decision(obs.step, {}, {}, reasons)
        fits: dict[str, dict[str, float] | None] = {}
        preds: dict[str, float | None] = {}
        progress = obs.step / max(1, s.total_steps)
        if s.mode in ("dro_dyloss", "drpruning"):
            self._record(obs, loss, progress)
            if progress >= s.fit_start:
                fits, preds = self._fit_references(obs, reasons)
            else:
                reasons.append(f"no scaling-law fit before {s.fit_start:.0%} of training (now {progress:.1%}); "
                               "references unchanged")
        if s.mode == "constant":
            self.q = self.p0.copy()
        elif s.mode == "sheared":
            self.q = sheared_update(self.q, loss, self.r, s.sheared_eta, s.sheared_c)
        else:
            res = dro_weights(loss, self.r, self.p, s.rho, s.min_prob, s.tol)
            if res.reason:
                reasons.append(res.reason)
            self.q = res.q
            if s.mode == "drpruning" and progress >= s.ratio_start:
                self.p = update_ratio(self.p, self.q, self.p0, s.ratio_momentum)
        self.updates += 1
        return self._decision(obs.step, fits, preds, reasons)

    def _decision(self, step: int, fits: dict, preds: dict, reasons: list[str]) -> Decision:
        for r in reasons:
            log.info("step %d: %s", step, r)
        has_ratio = self.s.mode in ("dro", "dro_dyloss", "drpruning")
        assert self.r is not None
        return Decision(
            step=step, q=self.q.tolist(),
            reference_loss=None if self.s.mode == "constant" else self.r.tolist(),
            reference_ratio=self.p.tolist() if has_ratio else None,
            fits=fits, predicted_loss=preds, reasons=reasons,
        )

    def _record(self, obs: Observation, loss: np.ndarray, progress: float) -> None:
        if progress < self.s.history_start:
            return
        for i, h in enumerate(self.history):
            if not (np.isfinite(loss[i]) and obs.tokens[i] > 0):
                continue
            if len(h) >= self.s.max_points:  # drop one at random among the oldest 32
                h.pop(int(self.rng.integers(0, min(32, len(h)))))
            h.append((float(obs.tokens[i]), float(loss[i]), float(obs.sparsity)))

    def _fit_references(self, obs: Observation, reasons: list[str]):
        """Fit every domain whose history is long enough (all at once: `fit_problems`), and
        lower r to the mean of the best fits' clipped predictions at the end of training."""
        s = self.s
        fits: dict[str, list[dict[str, float]] | None] = {n: None for n in s.domains}
        preds: dict[str, float | None] = {n: None for n in s.domains}
        assert self.r is not None
        todo = [i for i, h in enumerate(self.history) if len(h) > s.min_fit_points]
        short = [f"{s.domains[i]} ({len(h)})" for i, h in enumerate(self.history) if len(h) <= s.min_fit_points]
        if short:
            reasons.append(f"no scaling-law fit yet for {', '.join(short)}: a fit needs more than "
                           f"{s.min_fit_points} points in its history; references unchanged")
        problems = []
        for i in todo:
            d, obs_loss, sp = (np.array(c) for c in zip(*self.history[i]))
            problems.append((d, obs_loss, sp if s.pruning else None))
        try:
            results = self.fit_problems(problems, s.pruning)
        except Exception as e:  # a fit must never stop training; say why and go on
            results = [([], f"{type(e).__name__}: {e}")] * len(problems)
        # The prediction's sparsity is the current step's ramped target (SPEC §3.1).
        s_final = obs.target_sparsity if s.pruning else None
        for i, (domain_fits, why), (_, obs_loss, _) in zip(todo, results, problems):
            name = s.domains[i]
            if not domain_fits:
                reasons.append(f"{name}: scaling-law fit failed ({why}); reference unchanged")
                continue
            if why:
                reasons.append(f"{name}: {why}")
            d_final = obs.tokens[i] * s.total_steps / max(1, obs.step)
            pred = scaling_law.reference_prediction(domain_fits, d_final, s_final, float(np.min(obs_loss)))
            if not np.isfinite(pred):
                reasons.append(f"{name}: prediction not finite; reference unchanged")
                continue
            fits[name], preds[name] = [f.as_dict() for f in domain_fits], pred
            self.r[i] = pred if not self.fitted[i] else min(self.r[i], pred)
            self.fitted[i] = True
        return fits, preds

    # ---- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "p": self.p.tolist(), "q": self.q.tolist(), "r": None if self.r is None else self.r.tolist(),
            "fitted": self.fitted.tolist(), "history": [list(map(list, h)) for h in self.history],
            "rng": self.rng.bit_generator.state, "updates": self.updates,
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.p, self.q = np.asarray(st["p"]), np.asarray(st["q"])
        self.r = None if st["r"] is None else np.asarray(st["r"])
        self.fitted = np.asarray(st["fitted"], dtype=bool)
        self.history = [[tuple(x) for x in h] for h in st["history"]]
        self.rng.bit_generator.state = st["rng"]
        self.updates = st["updates"]
