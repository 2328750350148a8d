"""The loop's own counters: what a resume needs besides the model, optimizer and data state.

Every field is identical on every rank (tokens and the moving average are built from
numbers all-reduced at each step), so rank 0 saves it and every rank loads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def ema_update(ema: np.ndarray, loss_sums: np.ndarray, counts: np.ndarray, decay: float = 0.9) -> np.ndarray:
    """ℓ ← 0.9·ℓ + 0.1·(this batch's mean loss) for each domain in the batch (SPEC §3, the
    `train_ema` signal); a domain's first batch sets ℓ; domains not in the batch keep theirs."""
    seen = counts > 0
    batch_loss = np.where(seen, loss_sums / np.maximum(counts, 1), np.nan)
    first = seen & ~np.isfinite(ema)
    return np.where(first, batch_loss, np.where(seen, decay * ema + (1 - decay) * batch_loss, ema))


@dataclass
class TrainState:
    k: int  # number of domains
    domains: list[str] | None = None  # their names: a resume with other domains is refused
    step: int = 0
    tokens: np.ndarray = field(default=None)  # type: ignore[assignment]  # trained per domain, all ranks
    ema: np.ndarray = field(default=None)  # type: ignore[assignment]  # training-loss moving average, NaN until seen
    bad_total: int = 0  # non-finite steps skipped in all
    bad_run: int = 0  # ... in a row (not saved: a resume starts a new run of them)
    last_decision: Any = None  # the controller's last Decision, for the metrics
    kd_sum: float = 0.0  # distillation: the steps' mean KL to the teacher, summed since the last evaluation
    kd_steps: int = 0
    interval_sums: np.ndarray = field(default=None)  # type: ignore[assignment]  # training-loss sums since the last
    interval_counts: np.ndarray = field(default=None)  # type: ignore[assignment]  # update, and their samples

    def __post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = np.zeros(self.k)
        if self.ema is None:
            self.ema = np.full(self.k, np.nan)
        if self.interval_sums is None:
            self.interval_sums, self.interval_counts = np.zeros(self.k), np.zeros(self.k)

    def finish_step(self, loss_sums: np.ndarray, counts: np.ndarray, seq_len: int, bad: bool) -> float | None:
        """Account one optimizer step from its all-reduced per-domain loss sums and sample
        counts; returns its mean training loss (None for a skipped step)."""
        self.tokens = self.tokens + counts * seq_len
        if bad:
            self.bad_total += 1
            self.bad_run += 1
            return None
        self.bad_run = 0
        if counts.sum() == 0:
            return None
        self.ema = ema_update(self.ema, loss_sums, counts)
        self.interval_sums = self.interval_sums + loss_sums
        self.interval_counts = self.interval_counts + counts
        return float(loss_sums.sum() / counts.sum())

    def take_interval(self) -> np.ndarray:
        """Each domain's mean training loss over the steps since the last call (NaN for a domain
        no step drew), and reset: the `train` signal."""
        mean = np.where(self.interval_counts > 0, self.interval_sums / np.maximum(self.interval_counts, 1), np.nan)
        self.interval_sums, self.interval_counts = np.zeros(self.k), np.zeros(self.k)
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {"domains": self.domains, "step": self.step, "tokens": self.tokens.tolist(), "ema": self.ema.tolist(),
                "bad_total": self.bad_total, "last_decision": self.last_decision, "kd_sum": self.kd_sum,
                "kd_steps": self.kd_steps, "interval_sums": self.interval_sums.tolist(),
                "interval_counts": self.interval_counts.tolist()}

    def add_kd(self, mean_kl: float) -> None:
        self.kd_sum += mean_kl
        self.kd_steps += 1

    def take_kd(self) -> float | None:
        """The mean training KL since the last evaluation (None without distillation); resets it."""
        if not self.kd_steps:
            return None
        mean = self.kd_sum / self.kd_steps
        self.kd_sum, self.kd_steps = 0.0, 0
        return mean

    def load_state_dict(self, st: dict[str, Any]) -> None:
        saved = st.get("domains")
        if saved is not None and self.domains is not None and list(saved) != list(self.domains):
            raise ValueError(f"the checkpoint was trained on domains {list(saved)}, this run has {list(self.domains)}; "
                             "resume with the same `domains`, or start fresh (resume=none) in another run_dir")
        self.step = int(st["step"])
        self.tokens = np.asarray(st["tokens"], dtype=np.float64)
        self.ema = np.asarray(st["ema"], dtype=np.float64) if st.get("ema") is not None else np.full(self.k, np.nan)
        self.bad_total = int(st["bad_total"])
        self.last_decision = st.get("last_decision")
        self.kd_sum, self.kd_steps = float(st.get("kd_sum", 0.0)), int(st.get("kd_steps", 0))
        self.interval_sums = np.asarray(st.get("interval_sums", np.zeros(self.k)), dtype=np.float64)
        self.interval_counts = np.asarray(st.get("interval_counts", np.zeros(self.k)), dtype=np.float64)


def check_skipped(step: int, state: TrainState, optimizer, max_bad_steps: int, checkpoints) -> None:
    """After a non-finite step: it must have been skipped by the optimizer (ZeRO-3 does), and
    the run stops after `max_bad_steps` of them in a row, its last good checkpoint kept."""
    import logging

    from megadrp.errors import TrainingStopped

    if not getattr(optimizer, "overflow", False):
        raise TrainingStopped(f"step {step}: non-finite loss, and the optimizer did not skip the step; "
                              "megadrp relies on ZeRO-3 (zero_optimization.stage 3) to skip such steps")
    logging.getLogger("megadrp").warning("step %d: non-finite loss; step skipped (%d in a row, %d in all)", step,
                                         state.bad_run, state.bad_total)
    if state.bad_run >= max_bad_steps:
        raise TrainingStopped(f"{state.bad_run} non-finite steps in a row at step {step}; stopping. "
                              f"The last good checkpoint is in {checkpoints}")
