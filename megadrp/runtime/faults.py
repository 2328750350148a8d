"""Fault injection for the reliability tests, read from the environment once.

Why one object: the faults used to be environment reads scattered through the loop, the
checkpoint code and the controller service; now the run reads them in one place at start,
the components take this object, and a production run (no variable set) carries an inert
one. The variables (documented in docs/reliability.md):

    MEGADRP_FAULT_NAN_STEPS=3,7              the loss of these steps is NaN on rank 0
    MEGADRP_FAULT_SIGNAL_AT=6                rank 0 sends itself SIGUSR1 during step 6
    MEGADRP_FAULT_SIGNAL_IN_STARTUP=1        every rank sends itself SIGUSR1 as the model is built
    MEGADRP_FAULT_KILL_CONTROLLER_AT=9       SIGKILL the controller process after step 9
    MEGADRP_FAULT_KILL_IN_SAVE=4             SIGKILL every rank in the middle of step 4's save
    MEGADRP_FAULT_CONTROLLER_RAISE_AT=8      the controller's update for step 8 raises
    MEGADRP_FAULT_CRASH_AT=12                rank 0 raises during step 12 of a run that did not resume
                                             (a crash: non-zero exit, not a user error; a requeued
                                             run resumes past it)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping


def _steps(value: str) -> frozenset[int]:
    return frozenset(int(x) for x in value.split(",") if x.strip())


@dataclass(frozen=True)
class Faults:
    nan_steps: frozenset[int] = field(default_factory=frozenset)
    signal_at: int = 0
    signal_in_startup: bool = False
    kill_controller_at: int = 0
    kill_in_save: int = 0
    controller_raise_at: int = -1
    crash_at: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Faults":
        env = os.environ if env is None else env
        return cls(nan_steps=_steps(env.get("MEGADRP_FAULT_NAN_STEPS", "")),
                   signal_at=int(env.get("MEGADRP_FAULT_SIGNAL_AT", "0") or 0),
                   signal_in_startup=env.get("MEGADRP_FAULT_SIGNAL_IN_STARTUP", "") == "1",
                   kill_controller_at=int(env.get("MEGADRP_FAULT_KILL_CONTROLLER_AT", "0") or 0),
                   kill_in_save=int(env.get("MEGADRP_FAULT_KILL_IN_SAVE", "0") or 0),
                   controller_raise_at=int(env.get("MEGADRP_FAULT_CONTROLLER_RAISE_AT", "-1") or -1),
                   crash_at=int(env.get("MEGADRP_FAULT_CRASH_AT", "0") or 0))
