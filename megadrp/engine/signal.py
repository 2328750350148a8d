"""What the controller weighs at an update (`dro.signal`), and when the held-out evaluation runs.

- `eval`: the held-out evaluation's per-domain loss (the paper's): an evaluation at every update.
- `train_ema`: the moving average of each domain's training loss (SPEC §3, ℓ ← 0.9·ℓ + 0.1·batch).
- `train`: each domain's mean training loss over the steps since the last update: the sums every
  step already all-reduces, so no forward pass at all.

With a training-loss signal the held-out evaluation runs at every `eval.held_out_every`-th update
and at the last step (what a run reports), and also whenever some domain has no training loss
yet (no step drew it): its held-out loss stands in, as it always has for `train_ema`.
"""
from __future__ import annotations

import numpy as np


class LossSignal:
    def __init__(self, kind: str, interval: int, held_out_every: int = 1) -> None:
        self.kind, self.interval, self.every = kind, interval, held_out_every

    def evaluate_now(self, step: int, steps: int, state) -> bool:
        """Whether this update runs the held-out evaluation. Pure in (step, state): every rank
        decides the same."""
        if self.kind == "eval" or step in (0, steps) or (step // self.interval) % self.every == 0:
            return True
        return not np.isfinite(self._train(state, take=False)).all()

    def value(self, ev, state) -> np.ndarray:
        """The per-domain loss handed to the controller; resets the `train` interval."""
        if self.kind == "eval":
            return ev.loss
        loss = self._train(state, take=True)
        if ev is not None:
            loss = np.where(np.isfinite(loss), loss, ev.loss)
        return loss

    def _train(self, state, take: bool) -> np.ndarray:
        if self.kind == "train_ema":
            return state.ema
        mean = state.take_interval() if take else np.where(
            state.interval_counts > 0, state.interval_sums / np.maximum(state.interval_counts, 1), np.nan)
        # a domain not drawn in this interval keeps its moving average
        return np.where(np.isfinite(mean), mean, state.ema)
