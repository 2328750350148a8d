"""Parameter groups and learning-rate schedules.

Three groups: model weights (the main lr), L0 mask log-alphas (`prune.mask_lr`), Lagrange
multipliers (`prune.lambda_lr`; their gradient is reversed in the model, so the optimizer's
descent is ascent on λ). One warmup + cosine multiplier scales all three, as the reference
code schedules every parameter group (SPEC §2).
"""
from __future__ import annotations

import math

from torch import nn

GROUPS = ("weights", "masks", "lambdas")


def param_groups(model: nn.Module, lr: float, weight_decay: float, mask_lr: float, lambda_lr: float) -> list[dict]:
    buckets: dict[str, list] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("l0.log_alpha"):
            buckets["masks"].append(p)
        elif name.startswith("l0.lambdas"):
            buckets["lambdas"].append(p)
        else:
            buckets["weights"].append(p)
    settings = {"weights": (lr, weight_decay), "masks": (mask_lr, 0.0), "lambdas": (lambda_lr, 0.0)}
    return [{"params": buckets[g], "lr": settings[g][0], "weight_decay": settings[g][1], "name": g}
            for g in GROUPS if buckets[g]]


def cosine_lr(step: int, base: float, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to `base`, then cosine to `base·min_ratio` at `total`. `step` is 1-based."""
    if warmup > 0 and step <= warmup:
        return base * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def group_lrs(step: int, lr: float, mask_lr: float, lambda_lr: float, total: int, warmup: int,
              min_ratio: float) -> dict[str, float]:
    """Every group's lr at `step` (1-based): each base lr times the same multiplier."""
    m = cosine_lr(step, 1.0, total, warmup, min_ratio)
    return {"weights": lr * m, "masks": mask_lr * m, "lambdas": lambda_lr * m}
