"""Runs the `Controller` in a child process of rank 0 and survives its death.

Results are consumed strictly in submission order, and the controller is a deterministic
function of (settings, state, observations), so a restarted child that replays the
pending observations from the last consumed state gives exactly the weights the dead one
would have given. A fit that raises leaves the controller state as it was and yields no
decision (training keeps the last weights).
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from pathlib import Path
from typing import Any

from megadrp.dro.controller import Controller, ControllerSettings, Decision, Observation
from megadrp.runtime.files import atomic_write_text

log = logging.getLogger("megadrp.dro")
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _child(settings: ControllerSettings, state: dict | None, inq: mp.Queue, outq: mp.Queue, raise_at: int) -> None:
    # Job signals (Slurm's --signal, Ctrl-C) are for the trainer, which stops this process itself.
    for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    ctrl = Controller(settings)
    if state is not None:
        ctrl.load_state_dict(state)
    while True:
        msg = inq.get()
        if msg is None:
            return
        seq, obs = msg
        snapshot = ctrl.state_dict()
        try:
            if obs.step == raise_at:  # fault injection (megadrp.faults)
                raise RuntimeError(f"injected controller fault at step {obs.step}")
            decision = ctrl.update(obs)
            outq.put((seq, "ok", decision, ctrl.state_dict(), time.process_time()))
        except Exception:
            ctrl.load_state_dict(snapshot)
            outq.put((seq, "error", traceback.format_exc(), snapshot, time.process_time()))


class ControllerService:
    def __init__(self, settings: ControllerSettings, state: dict | None = None,
                 pid_file: str | os.PathLike | None = None, raise_at: int = -1) -> None:
        self.settings = settings
        self.raise_at = raise_at
        self.state = state  # controller state after the last consumed result
        self.pending: list[tuple[int, Observation]] = []
        self.seq = 0
        self.restarts = 0
        # CPU seconds of the controller processes (children that died: what they last reported),
        # so that its footprint on rank 0's node is in the metrics, not guessed.
        self._cpu_dead, self._cpu_child = 0.0, 0.0
        self.pid_file = Path(pid_file) if pid_file else None
        self._ctx = mp.get_context("spawn")
        self._proc: Any = None
        self._start()

    def _start(self) -> None:
        self.inq, self.outq = self._ctx.Queue(), self._ctx.Queue()
        self._proc = self._ctx.Process(target=_child, args=(self.settings, self.state, self.inq, self.outq, self.raise_at),
                                       daemon=True, name="megadrp-controller")
        # One BLAS/OpenMP thread in the child: its fits are small, and idle BLAS threads that
        # spin after each call would take CPU from the training ranks on the same node.
        saved = {k: os.environ.get(k) for k in _THREAD_VARS}
        os.environ.update({k: "1" for k in _THREAD_VARS})
        try:
            self._proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if self.pid_file:
            atomic_write_text(self.pid_file, f"{self._proc.pid}\n")
        for seq, obs in self.pending:
            self.inq.put((seq, obs))

    def submit(self, obs: Observation) -> None:
        self.seq += 1
        self.pending.append((self.seq, obs))
        self.inq.put((self.seq, obs))

    def result(self) -> Decision | None:
        """The decision for the oldest pending observation (blocks); None if its update raised."""
        if not self.pending:
            raise RuntimeError("no observation pending")
        want, obs = self.pending[0]
        while True:
            try:
                seq, status, payload, state, cpu = self.outq.get(timeout=0.5)
            except queue.Empty:
                if not self._proc.is_alive():
                    self.restarts += 1
                    log.warning("controller process %d died (exit code %s); restarting it from its last "
                                "state and replaying %d pending evaluation(s)",
                                self._proc.pid, self._proc.exitcode, len(self.pending))
                    self._cpu_dead, self._cpu_child = self._cpu_dead + self._cpu_child, 0.0
                    self._start()
                continue
            if seq != want:  # a stale answer from before a restart
                continue
            self._cpu_child = cpu
            self.pending.pop(0)
            self.state = state
            if status == "error":
                log.error("controller update for step %d raised; keeping the last weights:\n%s",
                          obs.step, payload)
                return None
            return payload

    @property
    def cpu_seconds(self) -> float:
        """CPU time (user + system) the controller processes have used, as of the last result."""
        return self._cpu_dead + self._cpu_child

    def state_dict(self) -> dict:
        return {"state": self.state, "pending": [dataclasses.asdict(o) for _, o in self.pending]}

    @classmethod
    def restore(cls, settings: ControllerSettings, saved: dict, pid_file=None, raise_at: int = -1) -> "ControllerService":
        svc = cls(settings, saved["state"], pid_file, raise_at)
        for o in saved["pending"]:
            svc.submit(Observation(**o))
        return svc

    def close(self) -> None:
        try:
            self.inq.put(None)
            self._proc.join(timeout=5)
        except (OSError, ValueError):
            pass
        if self._proc.is_alive():
            self._proc.kill()
