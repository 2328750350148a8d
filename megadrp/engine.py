"""The training loop over a DeepSpeed engine: one class, the stages differ only in how the
model is built, whether masks are sampled, and what is exported at the end.

Data flow per step: every rank's DataLoader workers draw the step's windows from the
shared weights table → forward/backward on the DeepSpeed engine (gradient accumulation to
`train.global_batch`) → optimizer step (lr per group) → at evaluation steps: per-domain
eval losses (sharded, all-reduced), rank 0 hands them to the controller process,
broadcasts the decided weights, and every rank publishes them to its table.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megadrp import checkpoint
from megadrp.config import Config, ConfigError, dump_yaml, to_dict
from megadrp.data.manifest import load_manifest
from megadrp.data.mixture import (
    BatchLayout,
    DomainSampler,
    EvalWindows,
    MixtureDataset,
    WeightsTable,
    digest_hex,
    weights_digest,
)
from megadrp.distributed import DistInfo
from megadrp.dro.controller import ControllerSettings, Decision, Observation
from megadrp.dro.service import ControllerService
from megadrp.metrics import MetricsLog, Progress, Wandb
from megadrp.model.hf_io import export_hf, load_hf_config, load_weights
from megadrp.model.llama import SHAPE_STATS, MaskedLlama, count_parameters, shape_of
from megadrp.model.masks import L0Masks, Shape, check_target
from megadrp.model.prune import prune_state_dict
from megadrp.optim import group_lrs, param_groups

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
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ema_update(ema: np.ndarray, loss_sums: np.ndarray, counts: np.ndarray, decay: float = 0.9) -> np.ndarray:
    """ℓ ← 0.9·ℓ + 0.1·(this batch's mean loss) for each domain in the batch (SPEC §3, the
    `train_ema` signal); a domain's first batch sets ℓ; domains not in the batch keep theirs."""
    seen = counts > 0
    batch_loss = np.where(seen, loss_sums / np.maximum(counts, 1), np.nan)
    first = seen & ~np.isfinite(ema)
    return np.where(first, batch_loss, np.where(seen, decay * ema + (1 - decay) * batch_loss, ema))


def fp32_master(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each parameter's value from the optimizer's fp32 master copy, whole, on the CPU (a
    collective under ZeRO: every rank calls it). The final masks are chosen from these: under
    bf16 the module's 16-bit copy rounds log α to 8 bits of mantissa, which ties or reorders
    units that the fp32 values tell apart (SPEC §2)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in params.items():
        full = safe_get_full_fp32_param(p)  # None when there is no separate fp32 master
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    return out


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.rank, self.world = info.rank, info.world_size
        self.run_dir = Path(cfg.run_dir)
        self._check_run_dir()
        self.manifest = load_manifest(cfg.data_dir)
        self.domains = self.manifest.select(cfg.domains)
        self.names = [d.name for d in self.domains]
        self.k = len(self.names)
        self.layout = BatchLayout(cfg.train.global_batch, cfg.train.micro_batch, self.world, self.rank)
        self.pruning = cfg.stage == "prune"
        self.model_config = self._model_config()
        self.target = self._target()
        self.ds_config = self._ds_config()
        self.p0 = self._initial_proportion()
        self.stop_signal = 0
        self.metrics = None
        self._build_engine()
        self.eval_sets = [EvalWindows(d.eval, cfg.train.seq_len, cfg.eval.tokens_per_domain, d.name) for d in self.domains]

    # ---- setup ------------------------------------------------------------------------------
    def _on_rank0(self, check) -> None:
        """Run `check` on rank 0 and raise its error on every rank, so that no rank is left
        waiting in a collective for one that failed."""
        msg = None
        if self.rank == 0:
            try:
                check()
            except (OSError, ConfigError) as e:
                msg = str(e)
        box = [msg]
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise ConfigError(box[0])

    def _check_run_dir(self) -> None:
        def check() -> None:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                probe = self.run_dir / ".write-probe"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                raise ConfigError(f"run_dir {self.run_dir}: cannot write there ({e.strerror}); "
                                  "choose a writable run_dir") from e

        self._on_rank0(check)

    def _checkpoint_bytes(self) -> int:
        per_param = 16 if "optimizer" in self.ds_config else 4  # fp32 weights, master and Adam moments
        return self.source_params * per_param

    def _model_config(self):
        cfg = self.cfg
        if cfg.stage == "pretrain":
            from transformers import LlamaConfig

            s = cfg.model.shape
            assert s is not None
            vocab = s.vocab_size or self.manifest.vocab_size
            mc = LlamaConfig(vocab_size=vocab, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                             num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
                             num_key_value_heads=s.num_key_value_heads,
                             head_dim=s.head_dim or s.hidden_size // s.num_attention_heads,
                             max_position_embeddings=s.max_position_embeddings, rms_norm_eps=s.rms_norm_eps,
                             tie_word_embeddings=s.tie_word_embeddings, rope_theta=s.rope_theta,
                             bos_token_id=1, eos_token_id=self.manifest.eod_id)
        else:
            assert cfg.model.init is not None
            if not Path(cfg.model.init).is_dir():
                raise ConfigError(f"model.init {cfg.model.init}: directory does not exist")
            mc = load_hf_config(cfg.model.init)
        if mc.vocab_size < self.manifest.vocab_size:
            raise ConfigError(f"model vocab_size {mc.vocab_size} is smaller than the data's vocabulary "
                              f"({self.manifest.vocab_size}, {self.manifest.data_dir}/manifest.json)")
        if self.cfg.train.seq_len > mc.max_position_embeddings:
            log.warning("train.seq_len %d exceeds max_position_embeddings %d", self.cfg.train.seq_len,
                        mc.max_position_embeddings)
        return mc

    def _target(self) -> Shape | None:
        if not self.pruning:
            return None
        t = self.cfg.prune.target
        assert t is not None
        target = Shape(layers=t.num_hidden_layers, hidden=t.hidden_size, heads=t.num_attention_heads,
                       kv_heads=t.num_key_value_heads, intermediate=t.intermediate_size)
        try:
            check_target(shape_of(self.model_config), target)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return target

    def _ds_config(self) -> dict:
        p = Path(self.cfg.deepspeed)
        if not p.is_file():
            raise ConfigError(f"deepspeed {p}: DeepSpeed JSON not found (see ds_configs/)")
        try:
            ds = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from e
        t = self.cfg.train
        ds["train_micro_batch_size_per_gpu"] = t.micro_batch
        ds["gradient_accumulation_steps"] = self.layout.accumulation
        ds["train_batch_size"] = t.global_batch
        ds["gradient_clipping"] = t.grad_clip
        ds["steps_per_print"] = 10**9
        ds["wall_clock_breakdown"] = False
        opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
        opt.setdefault("params", {}).update(lr=t.lr, betas=[t.beta1, t.beta2], eps=t.eps, weight_decay=t.weight_decay)
        return ds

    def _per_domain(self, value, key: str) -> list[float] | None:
        """A per-domain setting given as a list (in manifest order) or a {domain: value}
        mapping, in the order of `self.names`; None when it is neither (a keyword)."""
        if isinstance(value, dict):
            missing = [n for n in self.names if n not in value]
            if missing:
                raise ConfigError(f"{key} has no entry for domain {missing[0]!r}")
            return [float(value[n]) for n in self.names]
        if isinstance(value, list):
            if len(value) != self.k:
                raise ConfigError(f"{key} has {len(value)} values for {self.k} domains ({', '.join(self.names)})")
            return [float(x) for x in value]
        return None

    def _initial_proportion(self) -> np.ndarray:
        ip = self.cfg.dro.initial_proportion
        given = self._per_domain(ip, "dro.initial_proportion")
        if given is not None:
            p = np.array(given, dtype=np.float64)
        elif ip in (None, "uniform"):
            p = np.ones(self.k)
        elif ip in ("tokens", "tokens^0.3"):
            tok = np.array([d.train_tokens for d in self.domains], dtype=np.float64)
            p = tok ** (0.3 if ip == "tokens^0.3" else 1.0)
        else:
            raise ConfigError(f"dro.initial_proportion={ip!r}: give a list, a mapping, 'uniform', 'tokens' or 'tokens^0.3'")
        if np.any(p <= 0) or not np.all(np.isfinite(p)):
            raise ConfigError("dro.initial_proportion values must be positive")
        return p / p.sum()

    def _reference_loss(self) -> list[float] | None:
        ref = self.cfg.dro.reference_loss
        given = self._per_domain(ref, "dro.reference_loss")
        if given is None and ref != "auto":
            raise ConfigError(f"dro.reference_loss={ref!r}: give a list, a mapping or 'auto'")
        return given

    def _build_engine(self) -> None:
        import deepspeed

        cfg = self.cfg
        zero3 = self.ds_config.get("zero_optimization", {}).get("stage", 0) == 3
        ramp = max(1, int(round(cfg.prune.ramp_fraction * cfg.train.steps)))
        if cfg.stage == "pretrain":
            # Small from-scratch models: build whole, identically seeded on every rank;
            # deepspeed.initialize partitions them.
            torch.manual_seed(cfg.seed)
            model = MaskedLlama(self.model_config, activation_checkpointing=cfg.model.activation_checkpointing)
            model.init_weights()
        else:
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=zero3):
                model = MaskedLlama(self.model_config, self.target, ramp, cfg.model.activation_checkpointing)
            load_weights(model, cfg.model.init, zero3=zero3, rank=self.rank)
        self.zero3 = zero3
        self.source_params = count_parameters(self.model_config)
        groups = param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.prune.mask_lr, cfg.prune.lambda_lr)
        self.group_names = [g["name"] for g in groups]
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=self.ds_config)
        self.model = self.engine.module

    # ---- pieces of the loop -----------------------------------------------------------------
    def _lrs(self, step: int) -> dict[str, float]:
        t, p = self.cfg.train, self.cfg.prune
        return group_lrs(step, t.lr, p.mask_lr, p.lambda_lr, t.steps, t.warmup_steps, t.min_lr_ratio)

    def _set_lr(self, step: int, zero: bool = False) -> dict[str, float]:
        lrs = self._lrs(step)
        for g, name in zip(self.engine.optimizer.param_groups, self.group_names):
            g["lr"] = 0.0 if zero else lrs[name]
        return lrs

    def _clamp_masks(self) -> None:
        if self.model.l0 is None:
            return
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        for p in self.model.l0.log_alpha.values():
            v = safe_get_local_fp32_param(p) if self.zero3 else p.data
            if v is None or v.numel() == 0:
                continue
            clamped = v.clamp(math.log(1e-2), math.log(1e2))
            if self.zero3:
                safe_set_local_fp32_param(p, clamped)
            else:
                p.data.copy_(clamped)

    def _gather_lambdas(self) -> dict[str, list[float]]:
        """{mask set: [λ1, λ2]} (a collective under ZeRO-3: every rank calls it)."""
        import deepspeed

        l0 = self.model.l0
        assert l0 is not None
        with deepspeed.zero.GatheredParameters([l0.lambdas], enabled=self.zero3):
            lam = l0.lambdas.detach().float().cpu().tolist()
        return {m: lam[i] for i, m in enumerate(l0.active)}

    def _allreduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=op)
        return t

    @torch.no_grad()
    def evaluate(self, step: int, mode: str | None) -> tuple[np.ndarray, dict | None, float | None]:
        """Mean token loss per domain over the fixed eval windows, identical on every rank,
        with the expected shape and Lagrangian when pruning."""
        self.engine.eval()
        mb, seq = self.cfg.eval.micro_batch, self.cfg.train.seq_len
        sums = torch.zeros(self.k, 2, dtype=torch.float64)
        for d, ew in enumerate(self.eval_sets):
            mine = ew.shard(self.rank, self.world)
            per_rank = math.ceil(ew.n / self.world)
            for b in range(math.ceil(per_rank / mb)):
                sel = mine[b * mb:(b + 1) * mb]
                real = len(sel)
                sel = sel + [0] * (mb - real)  # every rank runs the same number of forwards (ZeRO-3 gathers)
                x = torch.from_numpy(np.stack([ew[i] for i in sel])).to(self.engine.device)
                out = self.engine(x[:, :-1], x[:, 1:], step=step, mask_mode=mode)
                sums[d, 0] += out.losses[:real].double().sum().cpu()
                sums[d, 1] += real * seq
        sums = self._allreduce(sums)
        self.engine.train()
        lag = None if out.lagrangian is None else float(out.lagrangian.item())
        shape = None if out.expected_shape is None else dict(zip(SHAPE_STATS, out.expected_shape.tolist()))
        return (sums[:, 0] / sums[:, 1]).numpy(), shape, lag

    def _controller(self, saved: dict | None) -> ControllerService | None:
        if self.rank != 0:
            return None
        settings = ControllerSettings.from_config(
            self.cfg.dro, domains=self.names, p0=self.p0.tolist(), total_steps=self.cfg.train.steps,
            reference_loss=self._reference_loss(), pruning=self.pruning, seed=self.cfg.seed)
        pid = self.run_dir / "controller.pid"
        if saved is not None:
            return ControllerService.restore(settings, saved, pid)
        return ControllerService(settings, None, pid)

    def _on_signal(self, signum: int, _frame) -> None:
        self.stop_signal = signum
        log.warning("received signal %d: will save a checkpoint and exit after this step", signum)

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._on_signal)
        ckpt_root = self.run_dir / "checkpoints"
        self._on_rank0(lambda: checkpoint.check_room(ckpt_root, self._checkpoint_bytes()))
        resume_from = self._resume_path(ckpt_root)
        try:
            saved = checkpoint.load(self.engine, resume_from) if resume_from else None
        except ValueError as e:
            raise ConfigError(str(e)) from e
        step = saved["step"] if saved else 0
        if self.rank == 0:
            tmp = self.run_dir / ".config.yaml.tmp"
            tmp.write_text(dump_yaml(cfg))
            os.replace(tmp, self.run_dir / "config.yaml")
            self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", step if saved else None)
            self.wandb = Wandb(cfg.wandb.mode, cfg.wandb.project, cfg.wandb.name, self.run_dir, to_dict(cfg))
            if saved:
                log.info("resumed from %s at step %d", resume_from, step)
        table = WeightsTable(self.p0, max_rows=t.steps // cfg.eval.interval + 8)
        sampler = DomainSampler(cfg.seed, self.k, t.global_batch)
        self.tokens = np.zeros(self.k)
        # Training-loss moving average per domain, updated at every step for the step's
        # domains (SPEC §3); NaN until a domain has been trained on. Same on every rank.
        self.ema = np.full(self.k, np.nan)
        self.last_decision: Decision | None = None
        self.bad_total = self.bad_run = 0
        if saved:
            table.load_state_dict(saved["table"])
            sampler = DomainSampler(cfg.seed, self.k, t.global_batch, saved["sampler"]["step"], saved["sampler"]["counts"])
            if self.rank == 0:
                self.tokens = np.asarray(saved["tokens"], dtype=np.float64)
            if saved["ema"] is not None:
                self.ema = np.asarray(saved["ema"], dtype=np.float64)
            self.last_decision = saved["last_decision"]
            self.bad_total = saved["bad_total"]
        self.controller = self._controller(saved["controller"] if saved else None)
        try:
            if not saved:
                table.publish(1, None, final_through=0)
                if cfg.eval.at_start:
                    self._evaluate_and_update(0, table, sampler)
                else:
                    table.publish(1, None, final_through=min(cfg.eval.interval, t.steps))
            status = self._train(step, table, sampler, ckpt_root)
        finally:
            if self.controller is not None:
                self.controller.close()
        if status == "done":
            self._export()
        if self.rank == 0:
            self._write_status(status)
            self.wandb.finish()
        return 0

    def _resume_path(self, root: Path) -> Path | None:
        r = self.cfg.resume
        if r == "none":
            return None
        if r == "auto":
            return checkpoint.latest(root)
        p = Path(r)
        if not (p / checkpoint.STATE_FILE).is_file():
            raise ConfigError(f"resume {p}: not a complete megadrp checkpoint (no {checkpoint.STATE_FILE})")
        return p

    def _train(self, step: int, table: WeightsTable, sampler: DomainSampler, ckpt_root: Path) -> str:
        cfg, t = self.cfg, self.cfg.train
        ds = MixtureDataset([d.train for d in self.domains], t.seq_len, self.layout, table, cfg.seed, t.steps,
                            start_step=step, start_counts=sampler.counts, names=self.names)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=t.num_workers,
            prefetch_factor=t.prefetch_factor if t.num_workers > 0 else None,
            worker_init_fn=_ignore_signals_in_worker if t.num_workers > 0 else None)
        batches = iter(loader)
        try:
            return self._loop(step, batches, table, sampler, ckpt_root)
        finally:
            table.close()
            _stop_loader(batches)

    def _loop(self, step: int, batches, table: WeightsTable, sampler: DomainSampler, ckpt_root: Path) -> str:
        cfg, t = self.cfg, self.cfg.train
        progress = Progress(t.steps, step, t.global_batch * t.seq_len)
        self._interval_t0, self._interval_steps = time.time(), 0
        # Fault injection for the reliability tests (documented in docs/reliability.md).
        fault_nan = {int(x) for x in os.environ.get("MEGADRP_FAULT_NAN_STEPS", "").split(",") if x}
        fault_signal_at = int(os.environ.get("MEGADRP_FAULT_SIGNAL_AT", "0"))
        fault_kill_controller_at = int(os.environ.get("MEGADRP_FAULT_KILL_CONTROLLER_AT", "0"))
        mode = "sample" if self.pruning else None
        device = self.engine.device
        self.engine.train()
        while step < t.steps:
            step += 1
            sampler.draw(step, table.weights_at(step))
            self._set_lr(step)
            bad = False
            # Per-domain sums of per-sample losses and sample counts of this step, kept on the
            # device and reduced once per step together with the stop flag.
            step_sums = torch.zeros(2 * self.k + 1, dtype=torch.float64, device=device)
            for accum in range(self.layout.accumulation):
                batch = next(batches)
                assert batch["step"] == step and batch["accum"] == accum, "data stream out of step with the trainer"
                x = batch["input_ids"].to(device)
                # One hard-concrete draw per micro-batch, keyed by its place in the global batch.
                out = self.engine(x[:, :-1], x[:, 1:], step=step, mask_mode=mode, mask_seed=cfg.seed,
                                  mask_draw=self.layout.micro_index(accum))
                loss = out.losses.mean()
                if out.lagrangian is not None:
                    loss = loss + out.lagrangian.to(loss.dtype)
                if step in fault_nan and self.rank == 0:
                    loss = loss * float("nan")
                finite = self._allreduce(torch.tensor([float(torch.isfinite(loss).item())]), dist.ReduceOp.MIN)
                if finite.item() < 1:
                    # Zero gradient for this micro-batch and no update for the step (lr 0 below).
                    loss, bad = torch.nan_to_num(loss, 0.0, 0.0, 0.0) * 0.0, True
                    self._set_lr(step, zero=True)
                else:
                    dom = batch["domain"].to(device)
                    step_sums.index_add_(0, dom, out.losses.detach().mean(1).double())
                    step_sums.index_add_(0, dom + self.k, torch.ones_like(dom, dtype=torch.float64))
                    np.add.at(self.tokens, batch["domain"].numpy(), t.seq_len)
                self.engine.backward(loss)
                self.engine.step()
                self.last_digest = batch["weights_digest"]
            if step == fault_signal_at and self.rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            step_sums[-1] = float(self.stop_signal)
            reduced = self._allreduce(step_sums).cpu().numpy()  # the step's one host synchronisation
            stop = reduced[-1] > 0
            step_loss = self._update_ema(reduced[:self.k], reduced[self.k:2 * self.k], bad)
            if self.pruning:
                self._clamp_masks()
            if bad:
                self.bad_total += 1
                self.bad_run += 1
                log.warning("step %d: non-finite loss; step skipped (%d in a row, %d in all)", step, self.bad_run, self.bad_total)
                if self.bad_run >= t.max_bad_steps:
                    raise TrainingStopped(f"{self.bad_run} non-finite steps in a row at step {step}; stopping. "
                                          f"The last good checkpoint is in {ckpt_root}")
            else:
                self.bad_run = 0
            if self.rank == 0 and (step % t.log_interval == 0 or step == t.steps) and step_loss is not None:
                print(progress.line(step, step_loss), file=sys.stderr, flush=True)
            if step == fault_kill_controller_at and self.controller is not None:
                os.kill(self.controller._proc.pid, signal.SIGKILL)
            self._interval_steps += 1
            if step % cfg.eval.interval == 0 or step == t.steps:
                self._train_seconds = time.time() - self._interval_t0
                self._evaluate_and_update(step, table, sampler)
                self._interval_t0, self._interval_steps = time.time(), 0
                # a signal that arrived during the evaluation stops the run now
                stop = stop or self._allreduce(torch.tensor([float(self.stop_signal)]), dist.ReduceOp.MAX).item() > 0
            if (cfg.save.interval and step % cfg.save.interval == 0) or step == t.steps or stop:
                self._save(ckpt_root, step, table, sampler)
            if stop and step < t.steps:
                if self.rank == 0:
                    log.warning("stopped at step %d on signal; checkpoint saved, resume with resume=auto", step)
                return "interrupted"
        return "done"

    def _update_ema(self, loss_sums: np.ndarray, counts: np.ndarray, bad: bool) -> float | None:
        """Fold this step into the moving average; the step's mean training loss (None for a
        skipped step)."""
        if bad or counts.sum() == 0:
            return None
        self.ema = ema_update(self.ema, loss_sums, counts)
        return float(loss_sums.sum() / counts.sum())

    def _evaluate_and_update(self, step: int, table: WeightsTable, sampler: DomainSampler) -> None:
        cfg, t = self.cfg, self.cfg.train
        mode = None
        if self.pruning:
            mode = "final" if step == t.steps else "expected"
        t0 = time.time()
        eval_loss, shape, lagrangian = self.evaluate(step, mode)
        eval_time = time.time() - t0
        tokens = self._allreduce(torch.from_numpy(self.tokens.copy())).numpy()
        if self.pruning:
            self._lambda_values = self._gather_lambdas()
        gathered = [None] * self.world
        dist.all_gather_object(gathered, getattr(self, "last_digest", None))
        digests = [digest_hex(g) if g is not None else None for g in gathered]
        # A domain not trained on yet has no moving average: its eval loss stands in.
        signal_loss = eval_loss if cfg.dro.signal == "eval" else np.where(np.isfinite(self.ema), self.ema, eval_loss)
        decision, waited = None, 0.0
        if self.rank == 0:
            assert self.controller is not None
            sparsity = shape["sparsity"] if shape else 0.0
            target_sparsity = self.model.l0.target_sparsity(step) if self.pruning and self.model.l0 else 0.0
            self.controller.submit(Observation(step, signal_loss.tolist(), tokens.tolist(), sparsity, target_sparsity))
            # Lag 0 (the default, SPEC §3 Timing): this evaluation's decision drives steps
            # step+1 … step+interval, so the step waits for it; lag 1 defers it an interval.
            t_wait = time.time()
            lag = 0 if step == t.steps else cfg.dro.update_lag
            while len(self.controller.pending) > lag:
                decision = self.controller.result() or decision
            waited = time.time() - t_wait
        box = [decision]
        dist.broadcast_object_list(box, src=0)
        decision = box[0]
        if decision is not None:
            self.last_decision = decision
        final_through = min(step + cfg.eval.interval, t.steps)
        # Step 0 makes no decision (SPEC §3 Timing): steps 1 … interval keep p0.
        keep = decision is None or step == 0
        table.publish(step + 1, None if keep else np.asarray(decision.q), final_through)
        if self.rank == 0:
            self._write_metrics(step, eval_loss, tokens, table.weights_at(step + 1, wait=False), digests,
                                shape, lagrangian, eval_time, waited)

    def _write_metrics(self, step, eval_loss, tokens, weights, digests, shape, lagrangian, eval_time,
                       waited) -> None:
        d = self.last_decision
        named = lambda xs: None if xs is None else {n: float(x) for n, x in zip(self.names, xs)}  # noqa: E731
        rec = {
            "step": step, "stage": self.cfg.stage, "world_size": self.world,
            "tokens": {n: int(x) for n, x in zip(self.names, tokens)},
            "eval_loss": named(eval_loss),
            "train_loss_ema": named(self.ema),
            "weights": named(weights),
            "weights_digest": weights_digest(weights),
            "weights_digests": digests,
            "reference_loss": named(d.reference_loss) if d else None,
            "reference_ratio": named(d.reference_ratio) if d else None,
            "controller": None if d is None else {"from_step": d.step, "fits": d.fits,
                                                   "predicted_loss": d.predicted_loss, "reasons": d.reasons},
            "controller_restarts": self.controller.restarts if self.controller else 0,
            "lr": self._lrs(max(step, 1))["weights"],
            "lr_groups": {g: self._lrs(max(step, 1))[g] for g in self.group_names},
            "bad_steps": self.bad_total,
            "eval_seconds": round(eval_time, 3),
            "controller_wait_seconds": round(waited, 4),
        }
        steps_done = getattr(self, "_interval_steps", 0)
        if steps_done:
            secs = self._train_seconds
            rec["train_seconds"] = round(secs, 3)
            rec["train_tokens_per_s"] = round(steps_done * self.cfg.train.global_batch * self.cfg.train.seq_len / secs, 1)
        if self.pruning:
            assert shape is not None and self.model.l0 is not None
            rec["expected_shape"] = {k: v for k, v in shape.items() if k != "sparsity"}
            rec["target_shape"] = self.model.l0.target_shape(step)
            rec["lagrangian"] = lagrangian
            rec["lambdas"] = self._lambda_values
            rec["expected_sparsity"] = shape["sparsity"]
            rec["target_sparsity"] = self.model.l0.target_sparsity(step)
        assert self.metrics is not None
        self.metrics.write(rec)
        self.wandb.log({"eval_loss": rec["eval_loss"], "weights": rec["weights"]}, step)
        mean = float(np.mean(eval_loss))
        print(f"eval step {step}: mean loss {mean:.4f} | " + " ".join(f"{n}={x:.3f}" for n, x in zip(self.names, eval_loss)),
              file=sys.stderr, flush=True)

    def _save(self, root: Path, step: int, table: WeightsTable, sampler: DomainSampler) -> None:
        tokens = self._allreduce(torch.from_numpy(self.tokens.copy())).numpy()
        state = {
            "step": step, "table": table.state_dict(), "sampler": sampler.state_dict(),
            "controller": self.controller.state_dict() if self.controller else None,
            "tokens": tokens.tolist(), "ema": self.ema.tolist(),
            "last_decision": self.last_decision, "bad_total": self.bad_total, "world_size": self.world,
        }
        self._on_rank0(lambda: checkpoint.check_room(root, self._checkpoint_bytes()))
        checkpoint.save(self.engine, root, step, state, self.cfg.save.keep)

    def _full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.zero3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}
        return sd if self.rank == 0 else None

    def _export(self) -> None:
        sd = self._full_state_dict()
        log_alpha = fp32_master(dict(self.model.l0.log_alpha.items())) if self.pruning and self.model.l0 else {}
        if self.rank == 0:
            assert sd is not None
            sd = {k: v.detach().cpu() for k, v in sd.items()}
            weights = {k: v for k, v in sd.items() if not k.startswith("l0.")}
            config = self.model_config
            if self.pruning:
                masks = L0Masks(shape_of(config), self.target, 1)
                masks.load_state_dict({**{k[3:]: v.float() for k, v in sd.items() if k.startswith("l0.")},
                                       **{f"log_alpha.{m}": v for m, v in log_alpha.items()}})
                with torch.no_grad():
                    z = masks.deterministic(final=True)
                weights, config = prune_state_dict(weights, config, z)
            out = export_hf(weights, config, self.run_dir / "hf", self.manifest.tokenizer)
            (out / "megadrp.json").write_text(json.dumps({
                "stage": self.cfg.stage, "steps": self.cfg.train.steps, "source": self.cfg.model.init,
                "parameters": count_parameters(config), "source_parameters": self.source_params,
                "domains": self.names}, indent=2) + "\n")
            log.info("exported %s (%s parameters)", out, f"{count_parameters(config):,}")
            print(f"exported model: {out}", file=sys.stderr, flush=True)
        dist.barrier()

    def _write_status(self, status: str) -> None:
        tmp = self.run_dir / ".status.json.tmp"
        tmp.write_text(json.dumps({"state": status, "time": time.time()}) + "\n")
        os.replace(tmp, self.run_dir / "status.json")
