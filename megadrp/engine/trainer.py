"""The training loop: a few components wired together, readable top to bottom.

    plan      = make_plan(config, world)        # megadrp/plan.py: resolved and validated once (+ memory plan)
    ds_engine = zero3.build_engine(plan)        # engine/zero3.py: the masked model on DeepSpeed ZeRO-3
    schedule  = DomainSchedule(plan)            # engine/domain_schedule.py: weights table, sampler, controller
    evaluate  = Evaluator(plan.domains)         # engine/evaluator.py: per-domain losses, all-reduced
    state     = TrainState(k)                   # engine/train_state.py: step, tokens, EMA, skipped steps
    clock     = Clock()                         # engine/clock.py: where the seconds go (metrics, deadline)
    for step:  train_step → evaluate + schedule.observe when due → save({train, schedule}) when due
    export(plan, ds_engine)                     # engine/export.py: final masks → smaller HF model

Per step: every rank's DataLoader workers draw the step's windows from the shared weights
table; forward/backward on the DeepSpeed engine (gradient accumulation to
`train.global_batch`); the per-domain loss sums and sample counts stay on the device and
are reduced once per step with the stop flag (the step's one host synchronisation). A step
whose loss is not finite is skipped by DeepSpeed's ZeRO-3 optimizer (its gradient norm is
not finite): weights, optimizer moments and the optimizer's step count stay as they were.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from megadrp import cost_ledger
from megadrp.config import Config, dump_yaml, to_dict
from megadrp.data.mixture import digest_hex
from megadrp.engine import references, zero3
from megadrp.engine.checkpoint import RunRecord, Saver, clear_partial, latest, resume
from megadrp.engine.clock import Clock
from megadrp.engine.collectives import StepSums, any_rank, min_over_ranks
from megadrp.engine.distill import TeacherEngine
from megadrp.engine.domain_schedule import DomainSchedule
from megadrp.engine.evaluator import Evaluator
from megadrp.engine.export import export, final_masks
from megadrp.engine.loader import make_loader, stop_loader
from megadrp.engine.metrics import MetricsWriter, Progress, log_memory_plan, shape_record
from megadrp.engine.one_shot import warm_start
from megadrp.engine.optim import group_lrs
from megadrp.engine.signal import LossSignal
from megadrp.engine.startup import check_start
from megadrp.engine.train_state import TrainState, check_skipped
from megadrp.errors import ConfigError, TrainingStopped
from megadrp.model.llama import count_parameters
from megadrp.plan import make_plan, plan_notes
from megadrp.runtime import process_group
from megadrp.runtime.deadline import Deadline
from megadrp.runtime.faults import Faults
from megadrp.runtime.files import atomic_write_text
from megadrp.runtime.launch import DistInfo
from megadrp.runtime.process_group import on_rank0
from megadrp.runtime.run_dir import RunDir
from megadrp.runtime.stop import StopRequest

__all__ = ["Trainer", "TrainingStopped"]
log = logging.getLogger("megadrp")


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, stop: StopRequest | None = None,
                 deadline: Deadline | None = None, clock: Clock | None = None) -> None:
        """`deadline`: when the job ends (runtime/deadline.py); the run stops at a checkpoint
        while a step, an evaluation due and a save still fit before it."""
        self.cfg, self.rank, self.world = cfg, info.rank, info.world_size
        self.deadline, self.clock = deadline or Deadline(None), clock or Clock()
        self._resumed = False
        self.run_dir = RunDir(cfg.run_dir)
        self.faults = Faults.from_env()
        self.stop = stop or StopRequest().install()
        on_rank0(lambda: self.run_dir.check(cfg.resume, cfg.overwrite), self.rank, self.world)
        # `auto` micro-batch and checkpointing plan for the smallest device of the job, so that
        # every rank chooses the same layout
        memory, device = process_group.device_memory(info.local_world_size)
        self.plan = make_plan(cfg, self.world, self.rank, min_over_ranks(memory, torch.device(device)))
        on_rank0(lambda: check_start(self.plan, self.world), self.rank, self.world)  # what --dry-run checks too
        if self.rank == 0:
            log_memory_plan(self.plan, memory)
            for note in plan_notes(cfg):
                log.warning("%s", note)
        self.evaluate = Evaluator.for_plan(self.plan, self.rank, self.world)
        if self.faults.signal_in_startup:  # as Slurm's USR1 would, in the middle of a long model load
            os.kill(os.getpid(), signal.SIGUSR1)
        # Another model's reference losses are measured before the training engine (and a teacher)
        # exist, so no two of them hold memory together (engine/references.py; cached, so only the
        # first start pays). With `dro.reference_loss: teacher` the teacher's own engine measures them.
        teacher_is_reference = self.plan.teacher_config is not None and self.plan.reference_model == cfg.distill.teacher
        with self.clock.part("reference"):
            self.reference = (references.measure(self.plan, self.evaluate.reference, self.run_dir, self.rank)
                              if self.plan.reference_model and not teacher_is_reference else None)
        self.teacher = TeacherEngine(self.plan, self.rank) if self.plan.teacher_config is not None else None
        if teacher_is_reference:
            with self.clock.part("reference"):
                self.reference = references.measure(self.plan, self.evaluate.reference, self.run_dir, self.rank,
                                                    self.teacher.engine)
        init = None  # learned masks warm-started from a one-shot prune's choice (not on a resume: the checkpoint's)
        if cfg.prune.init == "importance" and (cfg.resume == "none" or latest(self.run_dir.checkpoints) is None):
            with self.clock.part("calibrate"):
                init = warm_start(self.plan, self.rank, self.world)
        self.ds_engine, self.group_names = zero3.build_engine(self.plan, self.rank, init)
        self.model = self.ds_engine.module
        self.state = TrainState(self.plan.k, domains=self.plan.names)
        self.signal = LossSignal(cfg.dro.signal, cfg.eval.interval, cfg.eval.held_out_every)
        self.schedule = DomainSchedule(self.plan, self.rank, self.run_dir.controller_pid, self.faults)
        self.metrics: MetricsWriter | None = None
        # 16-bit weights and their fp32 master, Adam's two moments
        record = RunRecord(to_dict(cfg), self.plan.manifest.tokenizer_fingerprint)  # a resume may not change it
        self.save = Saver(self.ds_engine, self.run_dir.checkpoints,
                          {"train": self.state, "schedule": self.schedule, "run": record},
                          cfg.save.keep, count_parameters(self.plan.model_config) * 16, self.rank, self.world,
                          self.clock, self.faults.kill_in_save)

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> int:
        """0 when the stage is done and exported; EXIT_INTERRUPTED (or 130 for Ctrl-C) when a
        signal stopped it at a checkpoint."""
        cfg = self.cfg
        if self._stop_requested():
            # A stop during startup: nothing trained since the last checkpoint, so none is written.
            return self._finish("interrupted")
        on_rank0(lambda: clear_partial(self.save.root), self.rank, self.world)  # a killed save's leftovers
        self.save.check_room()
        try:
            resume_from = resume(self.ds_engine, self.save.root, cfg.resume, self.save.states, self.world)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self._resumed = resume_from is not None
        if self.rank == 0:
            atomic_write_text(self.run_dir.config, dump_yaml(cfg))
            atomic_write_text(self.run_dir.cost, json.dumps(cost_ledger.ledger(self.plan, self.world), indent=1) + "\n")
            self.metrics = MetricsWriter(self.plan, self.run_dir, self.state.step if resume_from else None, to_dict(cfg))
            if resume_from:
                log.info("resumed from %s at step %d", resume_from, self.state.step)
        if not resume_from:  # a resumed controller holds its references
            if self.plan.reference_from_engine:  # the source itself, unmasked, before the first step
                with self.clock.part("reference"):
                    self.reference = references.measure(self.plan, self.evaluate.reference, self.run_dir, self.rank,
                                                        self.ds_engine)
            if self.reference is not None:
                self.schedule.use_reference(self.reference)
        self.schedule.start(evaluation_at_start=cfg.eval.at_start and not resume_from)
        self.clock.end_startup()
        try:
            if cfg.eval.at_start and not resume_from:
                self._evaluate_and_observe(0, steps=0)
            status = self._train()
        finally:
            self.schedule.close()
        if self.teacher is not None:  # the export gathers the whole student: the teacher's shards go first
            self.teacher.release()
            self.teacher = None
        if status == "done":
            with self.clock.part("export"):
                export(self.plan, self.ds_engine, self.run_dir.hf, self.rank)
        return self._finish(status)

    def _stop_requested(self) -> bool:
        return any_rank(self.stop.signum, self.ds_engine.device).item() > 0

    def _finish(self, status: str) -> int:
        """Rank 0 writes the closing metrics record and status.json before any rank returns (a
        launcher may kill rank 0 as soon as another rank exits)."""
        if self.rank == 0:
            if self.metrics is not None:
                self.metrics.end(self.state.step, status, self.clock.take(), self.clock.wall())
            self.run_dir.write_state(status)
        process_group.shutdown()
        return self.stop.exit_code if status == "interrupted" else 0

    def _train(self) -> str:
        batches = iter(make_loader(self.plan, self.schedule, self.state.step, self.ds_engine.device))
        try:
            return self._loop(batches)
        finally:
            self.schedule.table.close()
            stop_loader(batches)

    def _loop(self, batches) -> str:
        cfg, t, st = self.cfg, self.cfg.train, self.state
        progress = Progress(t.steps, st.step, t.global_batch * t.seq_len)
        steps_since_eval = 0
        self.ds_engine.train()
        while st.step < t.steps:
            st.step += 1
            step = st.step
            with self.clock.part("train"):
                t_step = time.time()
                self.schedule.draw(step)
                lrs = self._lrs(step)
                for g, name in zip(self.ds_engine.optimizer.param_groups, self.group_names):
                    g["lr"] = lrs[name]
                loss_sums, counts, bad, stop = self._train_step(step, batches)
                self.clock.step_done(time.time() - t_step)
                step_loss = st.finish_step(loss_sums, counts, t.seq_len, bad)
                if self.plan.pruning:
                    zero3.clamp_masks(self.model, self.plan.zero3)
            if bad:
                check_skipped(step, st, self.ds_engine.optimizer, t.max_bad_steps, self.save.root)
            if self.rank == 0 and (step % t.log_interval == 0 or step == t.steps) and step_loss is not None:
                print(progress.line(step, step_loss), file=sys.stderr, flush=True)
            if step == self.faults.kill_controller_at:
                self.schedule.kill_controller()
            steps_since_eval += 1
            if step % cfg.eval.interval == 0 or step == t.steps:
                self._evaluate_and_observe(step, steps_since_eval)
                steps_since_eval = 0
                # a signal that arrived during the evaluation stops the run now
                stop = stop or self._stop_requested()
            if (cfg.save.interval and step % cfg.save.interval == 0) or step == t.steps or stop:
                self.save(step, zero3.weights_finite(self.ds_engine), lambda: self._finish("failed"))
            if stop and step < t.steps:
                if self.rank == 0:
                    log.warning("stopped at step %d on signal; checkpoint saved, resume with resume=auto", step)
                return "interrupted"
        return "done"

    def _train_step(self, step: int, batches) -> tuple[np.ndarray, np.ndarray, bool, bool]:
        """One optimizer step over this rank's micro-batches. Returns the step's per-domain
        loss sums and sample counts (all ranks), whether its loss was non-finite anywhere,
        and whether any rank was signalled to stop."""
        k, device = self.plan.k, self.ds_engine.device
        mode = "sample" if self.plan.pruning else None
        sums = StepSums(k, device)
        for accum in range(self.plan.layout.accumulation):
            batch = next(batches)
            assert batch["step"] == step and batch["accum"] == accum, "data stream out of step with the trainer"
            x = batch["input_ids"].to(device, non_blocking=True)  # pinned by the loader on an accelerator
            # one hard-concrete draw per micro-batch, keyed by its place in the global batch
            extra = {} if self.teacher is None else {"teacher": self.teacher.for_batch(x[:, :-1])}
            out = self.ds_engine(x[:, :-1], x[:, 1:], step=step, mask_mode=mode, mask_seed=self.cfg.seed,
                                 mask_draw=self.plan.layout.micro_index(accum), **extra)
            loss = out.losses.mean()
            if out.kd is not None:  # distillation: α · KL + (1 − α) · cross-entropy
                alpha = self.cfg.distill.alpha
                loss = alpha * out.kd.mean() + (1 - alpha) * loss
            if out.lagrangian is not None:
                loss = loss + out.lagrangian.to(loss.dtype)
            if step in self.faults.nan_steps and self.rank == 0:
                loss = loss * float("nan")
            sums.add(out.losses, batch["domain"].to(device, non_blocking=True), loss, out.kd)
            # A non-finite loss is backpropagated as it is: the ZeRO-3 optimizer sees a
            # non-finite gradient norm (all-reduced, so on every rank) and skips the step.
            self.ds_engine.backward(loss)
            self.ds_engine.step()
            self.last_digest = batch["weights_digest"]
        if step == self.faults.signal_at and self.rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        if step == self.faults.crash_at and self.rank == 0 and not self._resumed:
            raise RuntimeError(f"MEGADRP_FAULT_CRASH_AT={step}: an injected crash (as a lost node or NCCL timeout)")
        self._check_deadline(step)
        reduced = sums.reduce(self.stop.signum).cpu().numpy()  # the step's one host synchronisation
        bad = reduced[2 * k] > 0
        if self.teacher is not None and not bad and reduced[k:2 * k].sum() > 0:
            # reported as the KL itself (the loss carries T², Hinton's gradient scale)
            self.state.add_kd(float(reduced[2 * k + 2] / reduced[k:2 * k].sum()) / self.teacher.temperature ** 2)
        if bad:
            return np.zeros(k), np.zeros(k), True, reduced[2 * k + 1] > 0
        return reduced[:k], reduced[k:2 * k], False, reduced[2 * k + 1] > 0

    def _lrs(self, step: int) -> dict[str, float]:
        t, p = self.cfg.train, self.cfg.prune
        return group_lrs(step, t.lr, p.mask_lr, p.lambda_lr, t.steps, t.warmup_steps, t.min_lr_ratio)

    def _check_deadline(self, step: int) -> None:
        """Stop now (a checkpoint at this step) if the next step, an evaluation due after it and
        one save would not fit before the job ends. Every rank decides alone and the step's
        reduction makes any rank's stop everyone's."""
        if self.deadline.end is None or step >= self.cfg.train.steps:
            return
        needed = self.clock.needed((step + 1) % self.cfg.eval.interval == 0,
                                   max(5.0, self.save.bytes / 1e9))  # untimed: the checkpoint's bytes at 1 GB/s
        if self.deadline.too_close(needed):
            self.stop.request(f"the job ends in {self.deadline.left():.0f} s ({self.deadline.source}); the next step, "
                              f"an evaluation due and a save need about {needed:.0f} s")

    # ---- evaluation and the domain schedule -----------------------------------------------
    def _evaluate_and_observe(self, step: int, steps: int) -> None:
        cfg, st = self.cfg, self.state
        mode = ("final" if step == cfg.train.steps else "expected") if self.plan.pruning else None
        ev = None
        if self.signal.evaluate_now(step, cfg.train.steps, st):
            with self.clock.part("eval"):
                if mode == "final" and self.model.l0 is not None:  # score the masks the export keeps (collective)
                    final_masks(self.model.l0)
                ev = self.evaluate(self.ds_engine, step, mode, self.teacher)
        lambdas = zero3.lambdas(self.model, self.plan.zero3) if self.plan.pruning else None
        gathered = [None] * self.world
        dist.all_gather_object(gathered, getattr(self, "last_digest", None))
        l0 = self.model.l0
        sparsity = (ev.shape["sparsity"] if ev is not None else zero3.expected_sparsity(self.model, self.plan.zero3)) \
            if self.plan.pruning else 0.0
        with self.clock.part("controller_wait"):
            decision, _ = self.schedule.observe(step, self.signal.value(ev, st), st.tokens, sparsity,
                                                l0.target_sparsity(step) if self.plan.pruning else 0.0)
        if decision is not None:
            st.last_decision = decision
        kd_loss = st.take_kd()  # on every rank: the train state stays the same everywhere
        if self.rank == 0:
            assert self.metrics is not None
            lrs = self._lrs(max(step, 1))
            self.metrics.evaluation(
                step, self.world, st, ev, self.schedule.weights_after(step),
                [digest_hex(g) if g is not None else None for g in gathered], self.schedule,
                {g: lrs[g] for g in self.group_names}, self.clock.take(), steps, kd_loss, self.ds_engine.device,
                shape_record(l0, ev, step, lambdas, sparsity) if self.plan.pruning else None)
