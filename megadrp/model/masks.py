"""L0 structured masks with hard-concrete gates (Louizos et al. 2018), SPEC §2.

Pure tensor math, no process group: `L0Masks.forward` is called inside the model's
forward, so under ZeRO-3 its parameters are gathered like any other module's.

Mask sets and what they gate:
    layer         [L]       a whole block (attention and MLP outputs)
    head          [L, Hkv]  one key/value group with its query heads
    intermediate  [L, I]    one MLP channel
    hidden        [d]       one residual dimension everywhere

A set exists only when the target is smaller than the source in that dimension.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

LIMIT_L, LIMIT_R = -0.1, 1.1
BETA = 2.0 / 3.0
EPS = 1e-6
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)
LOG_ALPHA_INIT = 5.0
DETERMINISTIC_SHARPEN = 0.8  # Sheared-LLaMA's factor in sigmoid(log α / β · 0.8)


@dataclass(frozen=True)
class Shape:
    """The prunable dimensions of a Llama (kv heads are the unit of head pruning)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int

    def as_dict(self) -> dict[str, int]:
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.kv_heads, "intermediate": self.intermediate}


class TargetShapeError(ValueError):
    """A prune target that cannot be reached from the source model."""


def check_target(source: Shape, target: Shape) -> None:
    """Refuse unreachable targets before any compute."""
    for field in ("layers", "hidden", "heads", "kv_heads", "intermediate"):
        s, t = getattr(source, field), getattr(target, field)
        if t < 1:
            raise TargetShapeError(f"prune.target: {field}={t}; every dimension must keep at least 1")
        if t > s:
            raise TargetShapeError(f"prune.target: {field}={t} is larger than the source model's {s}")
    group = source.heads // source.kv_heads
    if target.heads != target.kv_heads * group:
        raise TargetShapeError(
            f"prune.target: num_attention_heads={target.heads} with num_key_value_heads={target.kv_heads}; "
            f"heads are pruned in whole key/value groups of {group}, so num_attention_heads must be "
            f"{target.kv_heads * group} (num_key_value_heads × {group})")


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) = sigmoid(log α − β·log(−l/r))."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))


def sample_z(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def deterministic_z(log_alpha: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep exactly `keep` units per row (the last dim), those with the largest score; the
    kept entries carry their score (folded into the weights at export)."""
    score = torch.sigmoid(log_alpha / BETA * DETERMINISTIC_SHARPEN)
    if keep >= score.shape[-1]:
        return score
    idx = torch.topk(score, keep, dim=-1).indices
    return torch.zeros_like(score).scatter(-1, idx, score.gather(-1, idx))


class _ReverseGrad(torch.autograd.Function):
    """Identity forward, negated gradient: lets a minimising optimizer do gradient ascent
    on the Lagrange multipliers, with any optimizer and any ZeRO stage."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return -g


SETS = ("layer", "head", "intermediate", "hidden")


class L0Masks(nn.Module):
    def __init__(self, source: Shape, target: Shape, ramp_steps: int) -> None:
        super().__init__()
        self.source, self.target, self.ramp_steps = source, target, max(1, ramp_steps)
        shapes = {
            "layer": (source.layers,),
            "head": (source.layers, source.kv_heads),
            "intermediate": (source.layers, source.intermediate),
            "hidden": (source.hidden,),
        }
        sizes = {"layer": (source.layers, target.layers), "head": (source.kv_heads, target.kv_heads),
                 "intermediate": (source.intermediate, target.intermediate), "hidden": (source.hidden, target.hidden)}
        self.active = [m for m in SETS if sizes[m][1] < sizes[m][0]]
        self.final_fraction = {m: sizes[m][1] / sizes[m][0] for m in SETS}
        self.keep = {m: sizes[m][1] for m in SETS}
        self.log_alpha = nn.ParameterDict({
            m: nn.Parameter(torch.full(shapes[m], LOG_ALPHA_INIT).clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX))
            for m in self.active
        })
        # λ1, λ2 per active set, maximised (see _ReverseGrad). At least one row: ZeRO-3 does not
        # partition empty parameters (a target equal to the source leaves no set active).
        self.lambdas = nn.Parameter(torch.zeros(max(1, len(self.active)), 2))

    # ---- targets and expectations -------------------------------------------------------
    def target_fraction(self, m: str, step: int) -> float:
        r = min(1.0, step / self.ramp_steps)
        return 1.0 - (1.0 - self.final_fraction[m]) * r

    def clamped(self, m: str) -> torch.Tensor:
        """log α in [log 0.01, log 100] in value, with the gradient passed straight through
        (the optimizer's master copy is clamped after each step, see `clamp_`)."""
        la = self.log_alpha[m].float()
        return la + (la.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX) - la).detach()

    def probs(self) -> dict[str, torch.Tensor]:
        return {m: prob_nonzero(self.clamped(m)) for m in self.active}

    def expected_fractions(self, probs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Expected kept fraction of each active set; heads and channels nest in layers."""
        out = {}
        p_layer = probs.get("layer")
        for m in self.active:
            p = probs[m]
            if m in ("head", "intermediate") and p_layer is not None:
                out[m] = (p.mean(-1) * p_layer).mean()
            else:
                out[m] = p.mean()
        return out

    def target_fractions(self, step: int) -> dict[str, float]:
        out = {}
        for m in self.active:
            t = self.target_fraction(m, step)
            if m in ("head", "intermediate") and "layer" in self.active:
                t *= self.target_fraction("layer", step)
            out[m] = t
        return out

    def expected_shape(self, probs: dict[str, torch.Tensor]) -> dict[str, float]:
        s = self.source
        layers = probs["layer"].sum().item() if "layer" in probs else float(s.layers)
        kv = probs["head"].sum(-1).mean().item() if "head" in probs else float(s.kv_heads)
        inter = probs["intermediate"].sum(-1).mean().item() if "intermediate" in probs else float(s.intermediate)
        hidden = probs["hidden"].sum().item() if "hidden" in probs else float(s.hidden)
        group = s.heads // s.kv_heads
        return {"layers": layers, "hidden": hidden, "heads": kv * group, "kv_heads": kv, "intermediate": inter}

    def lagrangian(self, step: int, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.active:
            return torch.zeros(())
        lam = _ReverseGrad.apply(self.lambdas)
        expected, target = self.expected_fractions(probs), self.target_fractions(step)
        total = torch.zeros((), dtype=torch.float32, device=lam.device)
        for i, m in enumerate(self.active):
            gap = expected[m] - target[m]
            total = total + lam[i, 0] * gap + lam[i, 1] * gap * gap
        return total

    # ---- masks --------------------------------------------------------------------------
    def sample(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        z = {}
        for m in self.active:
            la = self.clamped(m)
            u = torch.rand(la.shape, generator=generator, dtype=torch.float32).clamp_(EPS, 1 - EPS).to(la.device)
            z[m] = sample_z(la, u)
        return z

    def deterministic(self, final: bool = True) -> dict[str, torch.Tensor]:
        """`final`: keep exactly the target count per row. Otherwise keep the (rounded)
        expected count, never fewer than the target: the model as it stands now."""
        z = {}
        for m in self.active:
            la = self.clamped(m)
            keep = self.keep[m]
            if not final:
                keep = max(keep, int(round(prob_nonzero(la).sum(-1).mean().item())))
            z[m] = deterministic_z(la, keep)
        return z

    def forward(self, step: int, mode: str, generator: torch.Generator | None = None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
        """mode: 'sample' (training), 'expected' (deterministic, expected counts) or 'final'."""
        probs = self.probs()
        if mode == "sample":
            assert generator is not None
            z = self.sample(generator)
            lag = self.lagrangian(step, probs)
        else:
            z = self.deterministic(final=(mode == "final"))
            lag = self.lagrangian(step, probs).detach()
        return z, lag, self.expected_shape({k: v.detach() for k, v in probs.items()})

    @torch.no_grad()
    def clamp_(self) -> None:
        for p in self.log_alpha.values():
            p.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
