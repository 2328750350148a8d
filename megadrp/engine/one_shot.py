"""One-shot structured pruning (`prune.method: minitron | shortgpt`) and the importance warm start
of learned masks (`prune.init: importance`): the source model on a ZeRO-3 engine with no
optimizer, forward passes over each domain's calibration windows with model/importance.py's
hooks, one all-reduce, the masks of the target shape, and the export the L0 path uses.

Every rank runs the same forwards (its share of the windows, padded like the evaluator's), so
ZeRO-3 gathers each layer's parameters in step, and the all-reduced scores select the same units
on every rank and world size.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.distributed as dist

from megadrp.data.mixture import EvalWindows
from megadrp.engine import zero3
from megadrp.engine.evaluator import Evaluator, to_device
from megadrp.model.importance import Recorder, Scores, combine, keep_masks
from megadrp.model.llama import shape_of
from megadrp.model.masks import Shape
from megadrp.runtime.files import atomic_write_text


class Stopped(Exception):
    """A stop signal reached some rank while the importance was measured (there is no checkpoint:
    a one-shot prune starts over)."""


@torch.no_grad()
def domain_scores(engine, plan, rank: int, world: int, layer_loss: bool, stop=None) -> list[dict[str, torch.Tensor]]:
    """Each domain's batch-mean importance (model/importance.py) over its calibration windows.
    `layer_loss`: a layer's score is the loss increase when it is skipped (one more forward per
    layer), else its Block Influence. `stop` (a StopRequest): checked on every rank between
    domains (raises Stopped). Collective."""
    from megadrp.engine.collectives import any_rank

    cfg = plan.cfg
    model = engine.module
    source = shape_of(model.config)
    seq, mb = cfg.train.seq_len, cfg.eval.micro_batch
    engine.eval()
    out = []
    for d in plan.domains:
        if stop is not None and any_rank(stop.signum, engine.device).item() > 0:
            raise Stopped(stop.describe())
        windows = EvalWindows(d.train, seq, cfg.prune.calibration_tokens, d.name, model.config.vocab_size, "train")
        scores = Scores.zeros(source, engine.device)
        loss = torch.zeros(source.layers + 1, dtype=torch.float64, device=engine.device)  # [skip layer i…, none]
        rec = Recorder(model, scores, source.kv_heads)
        mine = list(range(rank, windows.n, world))
        try:
            for b in range(math.ceil(math.ceil(windows.n / world) / mb)):
                sel = mine[b * mb:(b + 1) * mb]
                real = len(sel)
                x = to_device(torch.from_numpy(np.stack([windows[i] for i in sel + [0] * (mb - real)])), engine.device)
                rec.real = real
                base = engine(x[:, :-1], x[:, 1:]).losses[:real].double().mean(1).sum()
                rec.real = 0  # the skipped-layer forwards score nothing but their loss
                loss[-1] += base
                scores.windows += real
                if layer_loss and source.layers > 1:
                    for i in range(source.layers):
                        skip = torch.ones(source.layers, device=engine.device)
                        skip[i] = 0.0
                        loss[i] += engine(x[:, :-1], x[:, 1:], masks={"layer": skip}).losses[:real].double().mean(1).sum()
        finally:
            rec.detach()
        flat = torch.cat([scores.flat(), loss])
        dist.all_reduce(flat)
        n = scores.flat().numel()
        scores.load_flat(flat[:n])
        mean = scores.mean()
        if layer_loss:
            loss = flat[n:]
            mean["layer"] = (loss[:-1] - loss[-1]) / scores.windows.clamp(min=1)  # the loss increase per window
        out.append({k: v.cpu() for k, v in mean.items()})
    engine.train()
    return out


def one_shot_masks(engine, plan, rank: int, world: int, method: str, stop=None) -> tuple[dict[str, torch.Tensor], dict]:
    """The masks a one-shot `method` keeps (`minitron`, or `shortgpt`: depth by Block Influence),
    measured on `engine` (the source, unmasked); and what the scores were, for the record.
    Collective."""
    cfg = plan.cfg
    source = shape_of(plan.model_config)
    # a layer's loss when skipped costs a forward a layer: only where depth is pruned (the cost ledger's rule)
    layer_loss = method == "minitron" and cfg.prune.layer_importance == "loss" and plan.target.layers < source.layers
    per_domain = domain_scores(engine, plan, rank, world, layer_loss, stop)
    combined = combine(per_domain, cfg.prune.importance_over_domains)
    target = plan.target
    if method == "shortgpt":
        target = Shape(layers=target.layers, hidden=source.hidden, heads=source.heads, kv_heads=source.kv_heads,
                       intermediate=source.intermediate)
    z = keep_masks(combined, source, target)
    return z, {"per_domain": [{k: v.tolist() for k, v in d.items()} for d in per_domain],
               "combined": {k: v.tolist() for k, v in combined.items()}}


class OneShotPrune:
    """`stage: prune` with `prune.method: minitron | shortgpt`: score, select, evaluate the pruned
    model on the eval windows (the record `megadrp eval` of the export must equal), export. No
    training step, no optimizer; seconds on the clock's `calibrate`, `eval` and `export`."""

    def __init__(self, cfg, info, clock, stop=None) -> None:
        from megadrp.plan import make_plan
        from megadrp.runtime.process_group import on_rank0
        from megadrp.runtime.run_dir import RunDir

        self.cfg, self.rank, self.world, self.clock, self.stop = cfg, info.rank, info.world_size, clock, stop
        self.run_dir = RunDir(cfg.run_dir)
        # a one-shot prune is quick and has no checkpoint: a finished one is replaced only with overwrite
        on_rank0(lambda: self.run_dir.check("none", cfg.overwrite or self.run_dir.state() != "done"), self.rank,
                 self.world)
        self.plan = make_plan(cfg, self.world, self.rank)
        from megadrp.engine.startup import check_start

        on_rank0(lambda: check_start(self.plan, self.world), self.rank, self.world)

    def run(self) -> int:
        from megadrp import cost_ledger
        from megadrp.config import dump_yaml
        from megadrp.engine.export import export
        from megadrp.engine.metrics import MetricsLog
        from megadrp.runtime import process_group

        plan, cfg = self.plan, self.cfg
        if self.rank == 0:
            atomic_write_text(self.run_dir.config, dump_yaml(cfg))
            atomic_write_text(self.run_dir.cost, json.dumps(cost_ledger.ledger(plan, self.world), indent=1) + "\n")
        engine = zero3.build_inference_engine(cfg.model.init, plan, self.rank)
        self.clock.end_startup()
        try:
            with self.clock.part("calibrate"):
                z, scores = one_shot_masks(engine, plan, self.rank, self.world, cfg.prune.method, self.stop)
        except Stopped as e:
            if self.rank == 0:
                import logging

                logging.getLogger("megadrp").warning("stopped (%s) while measuring importance; a one-shot prune has "
                                                     "no checkpoint: run it again", e)
                self.run_dir.write_state("interrupted")
            zero3.release_engine(engine)
            process_group.shutdown()
            return self.stop.exit_code
        z_dev = {k: v.to(engine.device) for k, v in z.items()}
        with self.clock.part("eval"):
            ev = Evaluator.for_plan(plan, self.rank, self.world)(_WithMasks(engine, z_dev), 0, None)
        with self.clock.part("export"):
            export(plan, engine, self.run_dir.hf, self.rank, z)
        if self.rank == 0:
            kept = {m: int(v.sum().item()) if v.dim() == 1 else int(v.sum(-1)[0].item()) for m, v in z.items()}
            metrics = MetricsLog(self.run_dir.metrics, None)
            metrics.write({"step": 0, "stage": "prune", "method": cfg.prune.method, "world_size": self.world,
                           "importance_over_domains": cfg.prune.importance_over_domains,
                           "eval_loss": dict(zip(plan.names, map(float, ev.loss))), "kept": kept,
                           "calibration_tokens": cfg.prune.calibration_tokens, **self.clock.take()})
            metrics.write({"step": 0, "stage": "prune", "event": "end", "status": "done", **self.clock.take(),
                           "wall_seconds": round(self.clock.wall(), 3)})
            atomic_write_text(self.run_dir.root / "importance.json", json.dumps(scores) + "\n")
            self.run_dir.write_state("done")
        zero3.release_engine(engine)
        process_group.shutdown()
        return 0


class _WithMasks:
    """An engine whose every forward applies fixed masks (the evaluator's view of the pruned model)."""

    def __init__(self, engine, masks: dict[str, torch.Tensor]) -> None:
        self.engine, self.masks, self.device = engine, masks, engine.device

    def eval(self):
        self.engine.eval()

    def train(self, mode: bool = True):
        self.engine.train(mode)

    def __call__(self, *args, **kwargs):
        kwargs.pop("mask_mode", None)
        return self.engine(*args, masks=self.masks, **kwargs)


def warm_start(plan, rank: int, world: int) -> dict[str, torch.Tensor]:
    """`prune.init: importance`: the L0 masks' starting log α from a one-shot minitron prune of
    model.init (model/importance.warm_log_alpha), measured on an engine of its own that is
    released before the training engine is built. Collective."""
    from megadrp.model.importance import warm_log_alpha
    from megadrp.model.masks import LOG_ALPHA_INIT, LOG_ALPHA_MAX

    engine = zero3.build_inference_engine(plan.cfg.model.init, plan, rank)
    try:
        z, _ = one_shot_masks(engine, plan, rank, world, "minitron")
    finally:
        zero3.release_engine(engine)
    return warm_log_alpha(z, min(LOG_ALPHA_INIT, LOG_ALPHA_MAX), plan.cfg.prune.init_gap)
