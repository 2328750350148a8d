"""Reference losses measured from a model (docs/method.md §3): the source model, unmasked,
before the first step of a prune; or another model (`dro.reference_loss: model:<dir>`, the
source a continue stage recovers toward) on this stage's eval windows. Measured once and cached
in RUN_DIR/reference_losses.json with the windows they were measured on, so a resumed run, and a
continue stage on the same windows, read them instead of measuring again.
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np

from megadrp.engine import zero3
from megadrp.engine.evaluator import Evaluator
from megadrp.plan import RunPlan, read_reference_cache, reference_key
from megadrp.runtime.files import atomic_write_text
from megadrp.runtime.run_dir import RunDir

log = logging.getLogger("megadrp")


def _model(plan: RunPlan) -> str:
    return str(plan.cfg.model.init if plan.reference_from_engine else plan.reference_model)


def cached(plan: RunPlan, run_dir: RunDir) -> list[float] | None:
    """This run's own earlier measurement of the same model on the same windows."""
    hit = read_reference_cache(run_dir.reference_losses, reference_key(plan.cfg, plan.names), model=_model(plan))
    return None if hit is None else [float(x) for x in hit["losses"]]


def save(plan: RunPlan, run_dir: RunDir, model: str, losses: np.ndarray, seconds: float, rank: int) -> None:
    if rank != 0:
        return
    record = {"model": model, "role": "source" if plan.reference_from_engine else "reference",
              "windows": reference_key(plan.cfg, plan.names), "losses": [float(x) for x in losses],
              "by_domain": {n: float(x) for n, x in zip(plan.names, losses)}, "seconds": round(seconds, 2)}
    atomic_write_text(run_dir.reference_losses, json.dumps(record, indent=2) + "\n")


def measure(plan: RunPlan, evaluator: Evaluator, run_dir: RunDir, rank: int, ds_engine=None) -> list[float]:
    """The per-domain eval losses of the reference: `ds_engine` unmasked (the prune's source
    before any step, or the distillation teacher's engine), else `plan.reference_model` on an
    engine of its own. Collective."""
    hit = cached(plan, run_dir)
    if hit is not None:
        return hit
    t0 = time.time()
    model = _model(plan)
    if ds_engine is not None:
        training = ds_engine.training
        losses = evaluator(ds_engine, 0, None).loss
        ds_engine.train(training)
    else:
        engine = zero3.build_inference_engine(model, plan, rank)
        try:
            losses = evaluator(engine, 0, None).loss
        finally:
            zero3.release_engine(engine)
    seconds = time.time() - t0
    save(plan, run_dir, model, losses, seconds, rank)
    if rank == 0:
        log.info("reference losses (%s), %.1f s: %s", plan.reference_note, seconds,
                 " ".join(f"{n}={x:.3f}" for n, x in zip(plan.names, losses)))
    return [float(x) for x in losses]
