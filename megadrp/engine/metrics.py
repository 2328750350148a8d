"""What a run reports: metrics.jsonl (one object per evaluation), a console progress
line, and wandb (offline by default). Rank 0 only."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from megadrp.runtime.files import atomic_write_text, read_jsonl

log = logging.getLogger("megadrp")


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the resumed step are dropped so a
    resumed run's file equals a straight run's."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            if path.exists():
                path.unlink()
        elif path.exists():
            keep = [r for r in read_jsonl(path) if r["step"] <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
            f.flush()
            os.fsync(f.fileno())


def evaluation_record(step: int, stage: str, world: int, names: list[str], state, ev, weights, digests: list, *,
                      controller_restarts: int, lrs: dict[str, float], eval_seconds: float,
                      wait_seconds: float, controller_cpu_seconds: float, kd_loss: float | None = None,
                      groups=None) -> dict[str, Any]:
    """The metrics.jsonl object of one evaluation (the fields the README lists), from the
    loop's state (`TrainState`), the evaluation (`EvalResult`) and the weights now in force.
    With `groups` (data/groups.py, grouped), the controller's numbers (`weights`, references,
    ratios) are keyed by group; `domain_weights` adds what the sampler draws, and `group_eval_loss`
    the losses the controller saw."""
    from megadrp.data.mixture import weights_digest

    d = state.last_decision
    named = lambda xs: None if xs is None else {n: float(x) for n, x in zip(names, xs)}  # noqa: E731
    grouped = groups is not None and groups.grouped
    controller_names = groups.names if grouped else names
    by_group = lambda xs: None if xs is None else {n: float(x) for n, x in zip(controller_names, xs)}  # noqa: E731
    return {
        "step": step, "stage": stage, "world_size": world,
        "tokens": {n: int(x) for n, x in zip(names, state.tokens)},
        "eval_loss": named(ev.loss) if ev is not None else None,  # None: an update without a held-out evaluation
        "train_loss_ema": named(state.ema),
        "weights": by_group(groups.aggregate(weights)) if grouped else named(weights),
        "weights_digest": weights_digest(weights),
        "weights_digests": digests,
        **({"domain_weights": named(weights),
            "group_eval_loss": by_group(groups.loss(ev.loss)) if ev is not None else None} if grouped else {}),
        "reference_loss": by_group(d.reference_loss) if d else None,
        "reference_ratio": by_group(d.reference_ratio) if d else None,
        "controller": None if d is None else {"from_step": d.step, "fits": d.fits,
                                               "predicted_loss": d.predicted_loss, "reasons": d.reasons},
        "controller_restarts": controller_restarts,
        "lr": lrs.get("weights"),
        "lr_groups": lrs,
        "bad_steps": state.bad_total,
        "eval_seconds": round(eval_seconds, 3),
        "controller_wait_seconds": round(wait_seconds, 4),
        "controller_cpu_seconds": round(controller_cpu_seconds, 4),
        **({"eval_kd": named(ev.kd)} if getattr(ev, "kd", None) is not None else {}),
        **({"eval_windows": {n: int(x) for n, x in zip(names, ev.windows)},
            "eval_se": {n: float(x) if math.isfinite(x) else None for n, x in zip(names, ev.se)}}
           if getattr(ev, "windows", None) is not None else {}),
        **({"kd_loss": kd_loss} if kd_loss is not None else {}),
    }


class MetricsWriter:
    """Rank 0's metrics.jsonl and wandb: one record per evaluation, from the loop's state, the
    evaluation and the clock's seconds since the last record, and one `event: end` record when
    the process stops (the save and export after the last evaluation, so the rows' seconds sum
    to the run's wall-clock)."""

    def __init__(self, plan, run_dir, resume_step: int | None, wandb_config: dict) -> None:
        cfg = plan.cfg
        self.plan, self.cfg = plan, cfg
        self.log = MetricsLog(run_dir.metrics, resume_step)
        self.wandb = Wandb(cfg.wandb.mode, cfg.wandb.project, cfg.wandb.name, run_dir.root, wandb_config)

    def evaluation(self, step: int, world: int, state, ev, weights, digests: list, schedule, lrs: dict,
                   seconds: dict[str, float], steps: int, kd_loss: float | None, device, shape: dict | None) -> None:
        """`seconds`: the clock's `take()` since the last record, over `steps` optimizer steps;
        `shape`: the masks' expected and target shape, sparsity and λ's while pruning."""
        plan, t = self.plan, self.cfg.train
        rec = evaluation_record(
            step, self.cfg.stage, world, plan.names, state, ev, weights, digests,
            controller_restarts=schedule.controller_restarts, lrs=lrs, eval_seconds=seconds.get("eval_seconds", 0.0),
            wait_seconds=seconds.get("controller_wait_seconds", 0.0),
            controller_cpu_seconds=schedule.controller_cpu_seconds, kd_loss=kd_loss, groups=plan.dro_groups)
        rec.update(seconds)
        if steps and seconds.get("train_seconds"):
            rec["train_tokens_per_s"] = round(steps * t.global_batch * t.seq_len / seconds["train_seconds"], 1)
        if device.type == "cuda":  # since the start of this process: what the memory plan predicts
            import torch

            rec["device_memory"] = {"peak_allocated": torch.cuda.max_memory_allocated(device),
                                    "peak_reserved": torch.cuda.max_memory_reserved(device),
                                    "total": torch.cuda.get_device_properties(device).total_memory}
        if shape is not None:
            rec.update(shape)
        self.log.write(rec)
        if ev is not None:
            self.wandb.log({"eval_loss": rec["eval_loss"], "weights": rec["weights"]}, step)
            log.info("eval step %d: mean loss %.4f | %s", step, float(sum(ev.loss) / len(ev.loss)),
                     " ".join(f"{n}={x:.3f}" for n, x in zip(plan.names, ev.loss)))

    def end(self, step: int, status: str, seconds: dict[str, float], wall: float) -> None:
        self.log.write({"step": step, "stage": self.cfg.stage, "event": "end", "status": status, **seconds,
                        "wall_seconds": round(wall, 3)})
        self.wandb.finish()


def shape_record(l0, ev, step: int, lambdas: dict, sparsity: float) -> dict:
    """A prune's fields of a metrics record: the masks' expected shape (from the evaluation,
    where one ran), the ramped target, the Lagrangian and λ's, the expected and target sparsity."""
    rec = {"target_shape": l0.target_shape(step), "lambdas": lambdas, "expected_sparsity": sparsity,
           "target_sparsity": l0.target_sparsity(step)}
    if ev is not None:
        assert ev.shape is not None
        rec.update(expected_shape={k: v for k, v in ev.shape.items() if k != "sparsity"}, lagrangian=ev.lagrangian)
    return rec


def log_memory_plan(plan, device_bytes: int) -> None:
    """The memory plan in the log (rank 0), with a warning where it exceeds the device."""
    mem = plan.memory
    if mem is None:
        return
    log.info("%s", "\n".join(mem.lines()))
    if mem.total > device_bytes:
        name, size = mem.largest()
        log.warning("the memory plan (%.1f GiB per GPU) exceeds this device's %.1f GiB; its largest term is %s "
                    "(%.1f GiB). It is an estimate: the run goes on, but may run out of memory",
                    mem.total / 2**30, device_bytes / 2**30, name, size / 2**30)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def read_metrics(path: str | os.PathLike, events: bool = False) -> list[dict]:
    """Every evaluation record of a run's metrics.jsonl (with `events`, the `end` records of each
    process too); a malformed line is a DataError naming the file and line."""
    rows = read_jsonl(path)
    return rows if events else [r for r in rows if "event" not in r]


def prediction_accuracy(rows: list[dict], fractions: tuple[float, ...] = (0.25, 0.5, 0.75)) -> dict[str, dict]:
    """How well the fitted scaling laws foresaw a stage's end: for each fraction f, the
    controller's predicted end-of-stage loss at the last evaluation no later than f·steps,
    against the eval loss the stage reached at its end (absolute % error per domain, and
    their mean), beside the naive predictor's: the eval loss observed at that evaluation, as if
    nothing would change. Fractions at which no law had been fitted yet are left out.

    In a prune stage the controller predicts for the step's ramped target sparsity, not the
    final one, and clips a prediction to the lowest loss seen (SPEC §3.1): a prediction made
    during the ramp is for a less pruned model, so its error there mixes the law's accuracy
    with the pruning still to come. The continue stage's numbers measure the law alone."""
    evals = [r for r in rows if r.get("eval_loss")]
    if not evals:
        return {}
    final, total = evals[-1]["eval_loss"], evals[-1]["step"]
    out: dict[str, dict] = {}
    for f in fractions:
        at = [r for r in evals if r["step"] <= f * total and r.get("controller")
              and any(v is not None for v in r["controller"].get("predicted_loss", {}).values())]
        if not at:
            continue
        row = at[-1]
        err = {n: 100 * abs(p - final[n]) / final[n] for n, p in row["controller"]["predicted_loss"].items()
               if p is not None and n in final}
        naive = {n: 100 * abs(row["eval_loss"][n] - final[n]) / final[n] for n in err}
        out[f"{round(100 * f)}%"] = {"step": row["step"], "mape": float(sum(err.values()) / len(err)),
                                     "naive_mape": float(sum(naive.values()) / len(naive)),
                                     "per_domain": err, "naive_per_domain": naive}
    return out


class Progress:
    """One line per log interval: step, loss, tokens/s, ETA."""

    def __init__(self, total_steps: int, start_step: int, tokens_per_step: int) -> None:
        self.total, self.start, self.tps = total_steps, start_step, tokens_per_step
        self.t0 = time.time()

    def line(self, step: int, loss: float, extra: str = "") -> str:
        dt = max(time.time() - self.t0, 1e-9)
        done = step - self.start
        rate = done * self.tps / dt
        eta = (self.total - step) * dt / max(done, 1)
        return (f"step {step:>6}/{self.total} | loss {loss:.4f} | {rate:,.0f} tok/s | "
                f"ETA {_fmt(eta)}{' | ' + extra if extra else ''}")


def _fmt(sec: float) -> str:
    if not math.isfinite(sec):
        return "?"
    m, s = divmod(int(sec), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Wandb:
    def __init__(self, mode: str, project: str, name: str | None, run_dir: Path, config: dict) -> None:
        self.run = None
        if mode == "disabled":
            return
        try:
            import wandb

            # One wandb run per run directory: a requeued or resumed job appends to the same run.
            id_file = run_dir / "wandb_id"
            if id_file.is_file():
                run_id = id_file.read_text().strip()
            else:
                run_id = wandb.util.generate_id()
                atomic_write_text(id_file, run_id + "\n")
            self.run = wandb.init(project=project, name=name, mode=mode, dir=str(run_dir), config=config,
                                  id=run_id, resume="allow", reinit=True)
        except Exception as e:  # wandb must never stop training
            log.warning("wandb disabled: %s", e)

    def log(self, data: dict, step: int) -> None:
        if self.run is not None:
            flat = {}
            for k, v in data.items():
                if isinstance(v, dict):
                    flat.update({f"{k}/{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))})
                elif isinstance(v, (int, float)):
                    flat[k] = v
            self.run.log(flat, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


SHAPE_DIMS = ("layers", "hidden", "heads", "intermediate")


def pruning_control(rows: list[dict]) -> dict:
    """How closely a prune's expected shape followed its ramped target (a prune run's metrics
    rows): per dimension, the largest overshoot during the ramp (the masks ahead of the target)
    and the largest deviation after it, as a share of the amount the dimension must lose
    (source − final target); dimensions not pruned are skipped. Issue #20's goals: ≤ 0.25 and
    ≤ 0.10 (benchmarks/pruning_control.py)."""
    src, final = rows[0]["target_shape"], rows[-1]["target_shape"]
    rows = [r for r in rows if r.get("expected_shape")]  # updates that evaluated (all, with an eval signal)
    out = {}
    for k in SHAPE_DIMS:
        amount = src[k] - final[k]
        if amount <= 0:
            continue
        during = [max(0.0, r["target_shape"][k] - r["expected_shape"][k]) / amount
                  for r in rows if r["target_shape"][k] > final[k] + 1e-9]
        after = [abs(r["expected_shape"][k] - final[k]) / amount
                 for r in rows if r["target_shape"][k] <= final[k] + 1e-9]
        out[k] = {"ramp_overshoot": max(during, default=0.0), "post_ramp_deviation": max(after, default=0.0)}
    return out
