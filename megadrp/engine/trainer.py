"""The training loop: a few components wired together, readable top to bottom.

    plan      = make_plan(config, world)        # megadrp/plan.py: resolved and validated once (+ memory plan)
    ds_engine = zero3.build_engine(plan)        # engine/zero3.py: the masked model on DeepSpeed ZeRO-3
    schedule  = DomainSchedule(plan)            # engine/domain_schedule.py: weights table, sampler, controller
    evaluate  = Evaluator(plan.domains)         # engine/evaluator.py: per-domain losses, all-reduced
    state     = TrainState(k)                   # engine/train_state.py: step, tokens, EMA, skipped steps
    for step:  train_step → evaluate + schedule.observe when due → checkpoint.save({train, schedule}) when due
    export(plan, ds_engine)                     # engine/export.py: final masks → smaller HF model

Per step: every rank's DataLoader workers draw the step's windows from the shared weights
table; forward/backward on the DeepSpeed engine (gradient accumulation to
`train.global_batch`); the per-domain loss sums and sample counts stay on the device and
are reduced once per step with the stop flag (the step's one host synchronisation). A step
whose loss is not finite is skipped by DeepSpeed's ZeRO-3 optimizer (its gradient norm is
not finite): weights, optimizer moments and the optimizer's step count stay as they were.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megadrp.config import Config, dump_yaml, to_dict
from megadrp.data.mixture import MixtureDataset, digest_hex
from megadrp.engine import checkpoint, references, zero3
from megadrp.engine.collectives import StepSums, any_rank, min_over_ranks
from megadrp.engine.distill import TeacherEngine
from megadrp.engine.domain_schedule import DomainSchedule
from megadrp.engine.evaluator import EvalResult, Evaluator
from megadrp.engine.export import export, final_masks
from megadrp.engine.metrics import MetricsLog, Progress, Wandb, evaluation_record
from megadrp.engine.optim import group_lrs
from megadrp.engine.train_state import TrainState
from megadrp.errors import ConfigError
from megadrp.model.llama import count_parameters
from megadrp.plan import make_plan
from megadrp.runtime import process_group
from megadrp.runtime.deadline import Deadline
from megadrp.runtime.faults import Faults
from megadrp.runtime.files import atomic_write_text
from megadrp.runtime.launch import DistInfo
from megadrp.runtime.process_group import on_rank0
from megadrp.runtime.run_dir import RunDir
from megadrp.runtime.stop import StopRequest

log = logging.getLogger("megadrp")


class TrainingStopped(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is kept."""


def _stop_loader(batches) -> None:
    """Shut the DataLoader's workers down on any exit path. They ignore SIGTERM (job signals
    are the trainer's), so the DataLoader's own shutdown, which ends in SIGTERM, cannot stop
    one that is still busy: such a worker is killed."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in getattr(batches, "_workers", []):
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


def _ignore_signals_in_worker(_: int) -> None:
    # The trainer handles SIGTERM/SIGUSR1 (checkpoint, then exit); workers must not die first.
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, stop: StopRequest | None = None,
                 deadline: Deadline | None = None) -> None:
        """`deadline`: when the job ends (runtime/deadline.py); the run stops at a checkpoint
        while a step, an evaluation due and a save still fit before it."""
        self.cfg, self.rank, self.world = cfg, info.rank, info.world_size
        self.deadline = deadline or Deadline(None)
        # what the deadline check weighs: a step (a moving average), the last evaluation, a save
        # (until one is timed: the checkpoint's bytes at 1 GB/s, at least 5 s)
        self._step_seconds = self._eval_seconds = 0.0
        self._save_seconds: float | None = None
        self._resumed = False
        self.run_dir = RunDir(cfg.run_dir)
        self.faults = Faults.from_env()
        self.stop = stop or StopRequest().install()
        on_rank0(lambda: self.run_dir.check(cfg.resume, cfg.overwrite), self.rank, self.world)
        # `auto` micro-batch and checkpointing plan for the smallest device of the job, so that
        # every rank chooses the same layout
        memory, device = process_group.device_memory(info.local_world_size)
        self.plan = make_plan(cfg, self.world, self.rank, min_over_ranks(memory, torch.device(device)))
        self._log_memory_plan(memory)
        self.evaluate = Evaluator.for_domains(self.plan.domains, cfg.train.seq_len, cfg.eval.tokens_per_domain,
                                              cfg.eval.micro_batch, self.rank, self.world,
                                              self.plan.model_config.vocab_size)
        if self.faults.signal_in_startup:  # as Slurm's USR1 would, in the middle of a long model load
            os.kill(os.getpid(), signal.SIGUSR1)
        # Another model's reference losses are measured before the training engine (and a teacher)
        # exist, so no two of them hold memory together (engine/references.py; cached, so only the
        # first start pays). With `dro.reference_loss: teacher` the teacher's own engine measures them.
        teacher_is_reference = self.plan.teacher_config is not None and self.plan.reference_model == cfg.distill.teacher
        self.reference = (references.measure(self.plan, self.evaluate, self.run_dir, self.rank)
                          if self.plan.reference_model and not teacher_is_reference else None)
        self.teacher = TeacherEngine(self.plan, self.rank) if self.plan.teacher_config is not None else None
        if teacher_is_reference:
            self.reference = references.measure(self.plan, self.evaluate, self.run_dir, self.rank, self.teacher.engine)
        self.ds_engine, self.group_names = zero3.build_engine(self.plan, self.rank)
        self.model = self.ds_engine.module
        self.state = TrainState(self.plan.k, domains=self.plan.names)
        self.schedule = DomainSchedule(self.plan, self.rank, self.run_dir.controller_pid, self.faults)
        self.metrics: MetricsLog | None = None

    def _log_memory_plan(self, device_bytes: int) -> None:
        mem = self.plan.memory
        if self.rank != 0 or mem is None:
            return
        log.info("%s", "\n".join(mem.lines()))
        if mem.total > device_bytes:
            name, size = mem.largest()
            log.warning("the memory plan (%.1f GiB per GPU) exceeds this device's %.1f GiB; its largest term is %s "
                        "(%.1f GiB). It is an estimate: the run goes on, but may run out of memory",
                        mem.total / 2**30, device_bytes / 2**30, name, size / 2**30)

    def _check_room(self, root: Path) -> None:
        # fp32 master weights and Adam's two moments (12 bytes) plus the 16/32-bit module copy
        need = count_parameters(self.plan.model_config) * 16
        on_rank0(lambda: checkpoint.check_room(root, need), self.rank, self.world)

    def _resume(self, root: Path, stateful: dict) -> Path | None:
        try:
            return checkpoint.resume(self.ds_engine, root, self.cfg.resume, stateful, self.world)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    @property
    def stop_signal(self) -> int:
        return self.stop.signum

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> int:
        """0 when the stage is done and exported; EXIT_INTERRUPTED (or 130 for Ctrl-C) when a
        signal stopped it at a checkpoint."""
        cfg = self.cfg
        if self._stop_requested():
            # A stop during startup: nothing trained since the last checkpoint, so none is written.
            return self._finish("interrupted")
        ckpt_root = self.run_dir.checkpoints
        on_rank0(lambda: checkpoint.clear_partial(ckpt_root), self.rank, self.world)  # a killed save's leftovers
        self._check_room(ckpt_root)
        stateful = {"train": self.state, "schedule": self.schedule}  # what a checkpoint holds besides the engine
        resume_from = self._resume(ckpt_root, stateful)
        self._resumed = resume_from is not None
        if self.rank == 0:
            atomic_write_text(self.run_dir.config, dump_yaml(cfg))
            self.metrics = MetricsLog(self.run_dir.metrics, self.state.step if resume_from else None)
            self.wandb = Wandb(cfg.wandb.mode, cfg.wandb.project, cfg.wandb.name, self.run_dir.root, to_dict(cfg))
            if resume_from:
                log.info("resumed from %s at step %d", resume_from, self.state.step)
        if not resume_from:  # a resumed controller holds its references
            if self.plan.reference_from_engine:  # the source itself, unmasked, before the first step
                self.reference = references.measure(self.plan, self.evaluate, self.run_dir, self.rank, self.ds_engine)
            if self.reference is not None:
                self.schedule.use_reference(self.reference)
        self.schedule.start(evaluation_at_start=cfg.eval.at_start and not resume_from)
        try:
            if cfg.eval.at_start and not resume_from:
                self._evaluate_and_observe(0)
            status = self._train(ckpt_root, stateful)
        finally:
            self.schedule.close()
        if self.teacher is not None:  # the export gathers the whole student: the teacher's shards go first
            self.teacher.release()
            self.teacher = None
        if status == "done":
            export(self.plan, self.ds_engine, self.run_dir.hf, self.rank)
        if self.rank == 0:
            self.wandb.finish()
        return self._finish(status)

    def _stop_requested(self) -> bool:
        return any_rank(self.stop_signal, self.ds_engine.device).item() > 0

    def _finish(self, status: str) -> int:
        """Rank 0 writes status.json before any rank returns (a launcher may kill rank 0 as
        soon as another rank exits)."""
        if self.rank == 0:
            self.run_dir.write_state(status)
        process_group.shutdown()
        if status == "interrupted":
            return self.stop.exit_code
        return 0

    def _train(self, ckpt_root: Path, stateful: dict) -> str:
        cfg, t = self.cfg, self.cfg.train
        sampler = self.schedule.sampler
        ds = MixtureDataset([d.train for d in self.plan.domains], t.seq_len, self.plan.layout, self.schedule.table,
                            cfg.seed, t.steps, start_step=self.state.step, start_counts=sampler.counts,
                            names=self.plan.names, vocab_size=self.plan.model_config.vocab_size)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=t.num_workers,
            prefetch_factor=t.prefetch_factor if t.num_workers > 0 else None,
            worker_init_fn=_ignore_signals_in_worker if t.num_workers > 0 else None,
            pin_memory=self.ds_engine.device.type == "cuda")  # so the step's copies to the device need not block
        batches = iter(loader)
        try:
            return self._loop(batches, ckpt_root, stateful)
        finally:
            self.schedule.table.close()
            _stop_loader(batches)

    def _loop(self, batches, ckpt_root: Path, stateful: dict) -> str:
        cfg, t, st = self.cfg, self.cfg.train, self.state
        progress = Progress(t.steps, st.step, t.global_batch * t.seq_len)
        self._interval_t0, self._interval_steps = time.time(), 0
        self.ds_engine.train()
        while st.step < t.steps:
            st.step += 1
            step = st.step
            t_step = time.time()
            self.schedule.draw(step)
            self._set_lr(step)
            loss_sums, counts, bad, stop = self._train_step(step, batches)
            took = time.time() - t_step
            self._step_seconds = took if not self._step_seconds else 0.8 * self._step_seconds + 0.2 * took
            step_loss = st.finish_step(loss_sums, counts, t.seq_len, bad)
            if self.plan.pruning:
                zero3.clamp_masks(self.model, self.plan.zero3)
            if bad:
                self._check_skipped(step, ckpt_root)
            if self.rank == 0 and (step % t.log_interval == 0 or step == t.steps) and step_loss is not None:
                print(progress.line(step, step_loss), file=sys.stderr, flush=True)
            if step == self.faults.kill_controller_at:
                self.schedule.kill_controller()
            self._interval_steps += 1
            if step % cfg.eval.interval == 0 or step == t.steps:
                self._train_seconds = time.time() - self._interval_t0
                self._evaluate_and_observe(step)
                self._interval_t0, self._interval_steps = time.time(), 0
                # a signal that arrived during the evaluation stops the run now
                stop = stop or self._stop_requested()
            if (cfg.save.interval and step % cfg.save.interval == 0) or step == t.steps or stop:
                self._save(ckpt_root, step, stateful)
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
        reduced = sums.reduce(self.stop_signal).cpu().numpy()  # the step's one host synchronisation
        bad = reduced[2 * k] > 0
        if self.teacher is not None and not bad and reduced[k:2 * k].sum() > 0:
            # reported as the KL itself (the loss carries T², Hinton's gradient scale)
            self.state.add_kd(float(reduced[2 * k + 2] / reduced[k:2 * k].sum()) / self.teacher.temperature ** 2)
        if bad:
            return np.zeros(k), np.zeros(k), True, reduced[2 * k + 1] > 0
        return reduced[:k], reduced[k:2 * k], False, reduced[2 * k + 1] > 0

    def _check_skipped(self, step: int, ckpt_root: Path) -> None:
        if not getattr(self.ds_engine.optimizer, "overflow", False):
            raise TrainingStopped(f"step {step}: non-finite loss, and the optimizer did not skip the step; "
                                  "megadrp relies on ZeRO-3 (zero_optimization.stage 3) to skip such steps")
        st, t = self.state, self.cfg.train
        log.warning("step %d: non-finite loss; step skipped (%d in a row, %d in all)", step, st.bad_run, st.bad_total)
        if st.bad_run >= t.max_bad_steps:
            raise TrainingStopped(f"{st.bad_run} non-finite steps in a row at step {step}; stopping. "
                                  f"The last good checkpoint is in {ckpt_root}")

    def _lrs(self, step: int) -> dict[str, float]:
        t, p = self.cfg.train, self.cfg.prune
        return group_lrs(step, t.lr, p.mask_lr, p.lambda_lr, t.steps, t.warmup_steps, t.min_lr_ratio)

    def _set_lr(self, step: int) -> None:
        lrs = self._lrs(step)
        for g, name in zip(self.ds_engine.optimizer.param_groups, self.group_names):
            g["lr"] = lrs[name]

    def _save(self, root: Path, step: int, stateful: dict) -> None:
        self._check_room(root)
        if checkpoint.first_problem(None if zero3.weights_finite(self.ds_engine) else "non-finite weights",
                                    self.world) is not None:
            last = checkpoint.latest(root)
            self._finish("failed")
            raise TrainingStopped(f"step {step}: the model's weights are not finite; not saving them and not exporting. "
                                  f"The last good checkpoint is {last or 'none (no checkpoint was written)'}; lower "
                                  "train.lr or raise train.warmup_steps and resume from it")
        t0 = time.time()
        checkpoint.save(self.ds_engine, root, step, stateful, self.cfg.save.keep, self.faults.kill_in_save)
        self._save_seconds = time.time() - t0

    def _check_deadline(self, step: int) -> None:
        """Stop now (a checkpoint at this step) if the next step, an evaluation due after it and
        one save would not fit before the job ends. Every rank decides alone and the step's
        reduction makes any rank's stop everyone's."""
        if self.deadline.end is None or step >= self.cfg.train.steps:
            return
        save = self._save_seconds
        if save is None:
            save = max(5.0, count_parameters(self.plan.model_config) * 16 / 1e9)
        nxt = step + 1
        evaluation = self._eval_seconds if nxt % self.cfg.eval.interval == 0 else 0.0
        needed = self._step_seconds + evaluation + save
        if self.deadline.too_close(needed):
            self.stop.request(f"the job ends in {self.deadline.left():.0f} s ({self.deadline.source}); the next step, "
                              f"an evaluation due and a save need about {needed:.0f} s")

    # ---- evaluation and the domain schedule -----------------------------------------------
    def _evaluate_and_observe(self, step: int) -> None:
        cfg, t, st = self.cfg, self.cfg.train, self.state
        mode = ("final" if step == t.steps else "expected") if self.plan.pruning else None
        t0 = time.time()
        if mode == "final" and self.model.l0 is not None:  # score the masks the export keeps (collective)
            final_masks(self.model.l0)
        ev = self.evaluate(self.ds_engine, step, mode, self.teacher)
        eval_time = time.time() - t0
        self._eval_seconds = eval_time
        lambdas = zero3.lambdas(self.model, self.plan.zero3) if self.plan.pruning else None
        gathered = [None] * self.world
        dist.all_gather_object(gathered, getattr(self, "last_digest", None))
        digests = [digest_hex(g) if g is not None else None for g in gathered]
        # A domain not trained on yet has no moving average: its eval loss stands in.
        signal_loss = ev.loss if cfg.dro.signal == "eval" else np.where(np.isfinite(st.ema), st.ema, ev.loss)
        l0 = self.model.l0
        decision, waited = self.schedule.observe(
            step, signal_loss, st.tokens, ev.shape["sparsity"] if ev.shape else 0.0,
            l0.target_sparsity(step) if self.plan.pruning and l0 is not None else 0.0)
        if decision is not None:
            st.last_decision = decision
        kd_loss = st.take_kd()  # on every rank: the train state stays the same everywhere
        if self.rank == 0:
            self._write_metrics(step, ev, self.schedule.weights_after(step), digests, lambdas, eval_time, waited,
                                kd_loss)

    def _write_metrics(self, step: int, ev: EvalResult, weights: np.ndarray, digests: list, lambdas,
                       eval_time: float, waited: float, kd_loss: float | None) -> None:
        st, t = self.state, self.cfg.train
        lrs = self._lrs(max(step, 1))
        rec = evaluation_record(
            step, self.cfg.stage, self.world, self.plan.names, st, ev, weights, digests,
            controller_restarts=self.schedule.controller_restarts, lrs={g: lrs[g] for g in self.group_names},
            eval_seconds=eval_time, wait_seconds=waited, controller_cpu_seconds=self.schedule.controller_cpu_seconds,
            kd_loss=kd_loss, groups=self.plan.dro_groups)
        if self._interval_steps_done():
            rec["train_seconds"] = round(self._train_seconds, 3)
            rec["train_tokens_per_s"] = round(self._interval_steps * t.global_batch * t.seq_len / self._train_seconds, 1)
        if self.ds_engine.device.type == "cuda":  # since the start of this process: what the memory plan predicts
            rec["device_memory"] = {"peak_allocated": torch.cuda.max_memory_allocated(self.ds_engine.device),
                                    "peak_reserved": torch.cuda.max_memory_reserved(self.ds_engine.device),
                                    "total": torch.cuda.get_device_properties(self.ds_engine.device).total_memory}
        if self.plan.pruning:
            l0 = self.model.l0
            assert ev.shape is not None and l0 is not None
            rec.update(expected_shape={k: v for k, v in ev.shape.items() if k != "sparsity"},
                       target_shape=l0.target_shape(step), lagrangian=ev.lagrangian, lambdas=lambdas,
                       expected_sparsity=ev.shape["sparsity"], target_sparsity=l0.target_sparsity(step))
        assert self.metrics is not None
        self.metrics.write(rec)
        self.wandb.log({"eval_loss": rec["eval_loss"], "weights": rec["weights"]}, step)
        log.info("eval step %d: mean loss %.4f | %s", step, float(np.mean(ev.loss)),
                 " ".join(f"{n}={x:.3f}" for n, x in zip(self.plan.names, ev.loss)))

    def _interval_steps_done(self) -> int:
        return getattr(self, "_interval_steps", 0)
