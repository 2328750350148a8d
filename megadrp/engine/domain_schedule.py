"""The domain mix over time: the shared weights table the data-loader workers read, the
sampler that replays their draws, the controller process on rank 0, and when a decision
takes effect.

`observe(step, ...)` is the one way in: the evaluation's numbers go to the controller (rank
0), its decision is broadcast, and every rank publishes it to its own table for steps
step+1 … (lag 0, SPEC §3 Timing). Steps 1 … interval train on p0; an evaluation at step 0
only sets `auto` reference losses.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch.distributed as dist

from megadrp.data.mixture import DomainSampler, WeightsTable
from megadrp.dro.controller import ControllerSettings, Decision, Observation
from megadrp.dro.service import ControllerService
from megadrp.plan import RunPlan
from megadrp.runtime.faults import Faults


class DomainSchedule:
    def __init__(self, plan: RunPlan, rank: int, pid_file: Path, faults: Faults) -> None:
        """`pid_file`: where rank 0 records the controller process (RunDir.controller_pid)."""
        cfg = plan.cfg
        self.plan, self.rank, self.faults = plan, rank, faults
        self.interval, self.steps, self.lag = cfg.eval.interval, cfg.train.steps, cfg.dro.update_lag
        self.groups = plan.dro_groups  # the controller weighs groups; the table and the sampler hold domains
        self.table = WeightsTable(plan.p_domains, max_rows=cfg.train.steps // cfg.eval.interval + 8)
        self.sampler = DomainSampler(cfg.seed, plan.k, cfg.train.global_batch)
        self.pid_file = pid_file
        self.controller: ControllerService | None = None
        self._resumed, self._saved_controller = False, None
        self.settings = ControllerSettings.from_config(
            cfg.dro, domains=self.groups.names, p0=plan.p0.tolist(), total_steps=cfg.train.steps,
            reference_loss=plan.reference_loss, pruning=plan.pruning, seed=cfg.seed)

    def use_reference(self, losses: list[float]) -> None:
        """Per-domain reference losses measured after the plan was made (engine/references.py);
        before `start`, and only for a fresh start (a resumed controller has its own)."""
        assert self.controller is None, "the controller has started"
        self.settings.reference_loss = self.groups.loss(losses).tolist()

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, evaluation_at_start: bool = False) -> None:
        """Start the controller (rank 0), fresh or from the state loaded by `load_state_dict`.
        A fresh schedule promises p0 for the first interval unless a step-0 evaluation follows."""
        if self.rank == 0:
            saved = self._saved_controller
            self.controller = (ControllerService.restore(self.settings, saved, self.pid_file, self.faults.controller_raise_at)
                               if saved is not None else
                               ControllerService(self.settings, None, self.pid_file, self.faults.controller_raise_at))
        if not self._resumed:
            self.table.publish(1, None, final_through=0 if evaluation_at_start else min(self.interval, self.steps))

    def close(self) -> None:
        """Wake the workers waiting on the table and stop the controller."""
        self.table.close()
        if self.controller is not None:
            self.controller.close()

    # ---- per step ----------------------------------------------------------------------------
    def draw(self, step: int) -> None:
        """Replay the step's domain draws (the workers make the same ones) so the sampler's
        counts are checkpointable; blocks until the step's weights are final."""
        self.sampler.draw(step, self.table.weights_at(step))

    def observe(self, step: int, loss: np.ndarray, tokens: np.ndarray, sparsity: float = 0.0,
                target_sparsity: float = 0.0) -> tuple[Decision | None, float]:
        """Collective. Hand one evaluation to the controller and publish what it decides;
        returns (the decision now in force or None, seconds the step waited for it)."""
        decision, waited = None, 0.0
        if self.rank == 0:
            assert self.controller is not None
            self.controller.submit(Observation(step, self.groups.loss(loss).tolist(),
                                               self.groups.tokens(tokens).tolist(), sparsity, target_sparsity))
            t0 = time.time()
            lag = 0 if step == self.steps else self.lag
            while len(self.controller.pending) > lag:
                decision = self.controller.result() or decision
            waited = time.time() - t0
        box = [decision]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        decision = box[0]
        # Step 0 makes no decision (SPEC §3 Timing): steps 1 … interval keep p0.
        keep = decision is None or step == 0
        self.table.publish(step + 1, None if keep else self.groups.expand(decision.q), min(step + self.interval, self.steps))
        return decision, waited

    def weights_after(self, step: int) -> np.ndarray:
        return self.table.weights_at(step + 1, wait=False)

    @property
    def controller_restarts(self) -> int:
        return self.controller.restarts if self.controller else 0

    @property
    def controller_cpu_seconds(self) -> float:
        """CPU seconds the controller process has used in this segment of the run (rank 0)."""
        return self.controller.cpu_seconds if self.controller else 0.0

    def kill_controller(self) -> None:
        """Fault injection: SIGKILL the controller process (it is restarted and replays)."""
        import os
        import signal

        if self.controller is not None:
            os.kill(self.controller._proc.pid, signal.SIGKILL)

    # ---- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"table": self.table.state_dict(), "sampler": self.sampler.state_dict(),
                "controller": self.controller.state_dict() if self.controller else None}

    def load_state_dict(self, st: dict) -> None:
        """Before `start`: the table and sampler now, the controller's state when it starts."""
        self.table.load_state_dict(st["table"])
        self.sampler = DomainSampler(self.sampler.seed, self.plan.k, self.sampler.global_batch,
                                     st["sampler"]["step"], st["sampler"]["counts"])
        self._resumed, self._saved_controller = True, st["controller"]
