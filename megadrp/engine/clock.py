"""Where a run's seconds go: one clock that the metrics, the cost ledger's measured side and the
time-limit stop all read, so none of them keeps a second, disagreeing, account.

Every second of a process, from the operating system's record of its start to its last line,
lands in exactly one part: `startup` (imports, rendezvous, plan, model load, engine build),
`reference` (reference losses measured from a model), `calibrate` (importance scores of a one-shot
prune or a warm start), `train` (optimizer steps, data included),
`eval` (held-out evaluation), `controller_wait` (waiting on the DRO controller's decision),
`save`, `export`, and `other` (what none of them covers: metrics writing, the loop's own
bookkeeping). `take()` hands out what accumulated since the last take, one metrics row's worth,
as `{part}_seconds`; the rows of a run therefore sum to its wall-clock.

The stop before a job's end (runtime/deadline.py) asks `needed(...)`: a step (a moving average),
an evaluation if one is due (the last one's seconds), and a save (the last one's, or until one
is timed, the checkpoint's bytes at 1 GB/s and at least 5 s).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

PARTS = ("startup", "reference", "calibrate", "train", "eval", "controller_wait", "save", "export", "other")


def process_start() -> float:
    """When this process started (seconds since the epoch), by the operating system's record:
    the interpreter's own start-up and imports count as the run's time."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # pragma: no cover - psutil ships with DeepSpeed; a clock without it starts here
        return time.time()


class Clock:
    def __init__(self, started: float | None = None, now=time.time) -> None:
        self._now = now
        self.started = process_start() if started is None else started
        self._mark = self.started  # the start of the current row's account
        self._parts = dict.fromkeys(PARTS, 0.0)
        self._open: str | None = None
        self.step_seconds = 0.0  # moving average of one optimizer step
        self.last_eval_seconds = 0.0
        self.last_save_seconds: float | None = None

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Counts the block's seconds as `name` (parts do not nest: an inner one is counted by
        the outer)."""
        assert name in PARTS, name
        if self._open is not None:
            yield
            return
        self._open, t0 = name, self._now()
        try:
            yield
        finally:
            took = self._now() - t0
            self._parts[name] += took
            self._open = None
            if name == "eval":
                self.last_eval_seconds = took
            elif name == "save":
                self.last_save_seconds = took

    def step_done(self, seconds: float) -> None:
        self.step_seconds = seconds if not self.step_seconds else 0.8 * self.step_seconds + 0.2 * seconds

    def end_startup(self) -> None:
        """Everything since the process started that no part counted was start-up."""
        counted = sum(self._parts.values())
        self._parts["startup"] += max(0.0, self._now() - self._mark - counted)

    def take(self) -> dict[str, float]:
        """`{part}_seconds` accumulated since the last take (non-zero parts, and always `train`);
        `other` is what no part covered."""
        now = self._now()
        out = dict(self._parts)
        out["other"] = max(0.0, now - self._mark - sum(out.values()))
        self._mark, self._parts = now, dict.fromkeys(PARTS, 0.0)
        return {f"{k}_seconds": round(v, 3) for k, v in out.items() if v or k == "train"}

    def wall(self) -> float:
        return self._now() - self.started

    def needed(self, eval_due: bool, fallback_save: float) -> float:
        """Seconds the next step, an evaluation if `eval_due`, and one save need."""
        save = self.last_save_seconds if self.last_save_seconds is not None else fallback_save
        return self.step_seconds + (self.last_eval_seconds if eval_due else 0.0) + save
