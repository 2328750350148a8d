"""L0 structured masks with hard-concrete gates (Louizos et al. 2018), SPEC §2.

Pure tensor math, no process group: `L0Masks.forward` is called inside the model's
forward, so under ZeRO-3 its parameters are gathered like any other module's.

Mask sets and what they gate:
    layer         [L]       a whole block (attention and MLP outputs)
    head          [L, Hkv]  one key/value group with its query heads
    intermediate  [L, I]    one MLP channel
    hidden        [d]       one residual dimension everywhere

A set is active (has log α and λ's) only when it is allowed (config `prune.sets`,
default all four) and the target is smaller than the source in its dimension. The
multilingual recipe (SPEC §4) trains head, intermediate and hidden and keeps every layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from megadrp.errors import TargetShapeError

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

    KEYS = ("layers", "hidden", "heads", "kv_heads", "intermediate")  # field order; every shape dict's keys

    @classmethod
    def from_hf(cls, c) -> "Shape":
        """From anything with Hugging Face's names (a model config, the `prune.target` section)."""
        return cls(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
                   kv_heads=c.num_key_value_heads, intermediate=c.intermediate_size)

    def as_dict(self) -> dict[str, int]:
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.kv_heads, "intermediate": self.intermediate}


SETS = ("layer", "head", "intermediate", "hidden")
# The prune.target keys each mask set shrinks (head pruning shrinks both head counts).
SET_KEYS = {"layer": ("layers", "num_hidden_layers"), "head": ("kv_heads", "num_key_value_heads"),
            "intermediate": ("intermediate", "intermediate_size"), "hidden": ("hidden", "hidden_size")}


def check_sets(sets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`prune.sets` as a tuple in SETS order; unknown or repeated names are refused."""
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise TargetShapeError(f"prune.sets: {unknown[0]!r} is not a mask set; choose from {', '.join(SETS)}")
    if len(set(sets)) != len(sets):
        raise TargetShapeError(f"prune.sets: {list(sets)} names a set twice")
    return tuple(s for s in SETS if s in sets)


def check_target(source: Shape, target: Shape, sets: tuple[str, ...] | list[str] = SETS) -> None:
    """Refuse unreachable targets before any compute: a dimension below 1 or above the
    source, heads that are not whole key/value groups, or a dimension shrunk by a mask set
    that `prune.sets` leaves untrained (it would silently stay at the source size)."""
    sets = check_sets(sets)
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
    for m, (field, key) in SET_KEYS.items():
        s, t = getattr(source, field), getattr(target, field)
        if t < s and m not in sets:
            raise TargetShapeError(
                f"prune.target.{key}={t} is smaller than the source model's {s}, but prune.sets "
                f"({', '.join(sets) or 'empty'}) does not train the {m!r} masks; add {m!r} to prune.sets "
                f"or set prune.target.{key} to {s}")


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) = sigmoid(log α − β·log(−l/r))."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))


def sample_z(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def deterministic_z(log_alpha: torch.Tensor, keep: int | torch.Tensor) -> torch.Tensor:
    """Keep the `keep` units with the largest score in each row (the last dim); `keep` is
    one count for every row or a tensor of per-row counts. Kept entries carry their score
    (folded into the weights at export), the rest are 0."""
    score = torch.sigmoid(log_alpha / BETA * DETERMINISTIC_SHARPEN)
    keep_t = torch.as_tensor(keep, device=score.device).clamp(0, score.shape[-1])
    # rank of each unit in its row, largest score first (stable, so ties keep the lower index)
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(score.shape[-1], device=score.device)
                                            .expand_as(order).contiguous())
    return torch.where(rank < keep_t.unsqueeze(-1), score, torch.zeros_like(score))


class _ReverseGrad(torch.autograd.Function):
    """Identity forward, negated gradient: lets a minimising optimizer do gradient ascent
    on the Lagrange multipliers, with any optimizer and any ZeRO stage."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return -g


class L0Masks(nn.Module):
    def __init__(self, source: Shape, target: Shape, ramp_steps: int, head_dim: int = 1,
                 sets: tuple[str, ...] | list[str] = SETS, lambda2_init: float = 0.0, mlp_matrices: int = 3) -> None:
        """`head_dim` and `mlp_matrices` (3 for SwiGLU, 2 for GPT-NeoX's MLP) only weigh heads
        against channels in the parameter counts behind `expected_sparsity`; they never change
        which units are kept. `sets` (config
        `prune.sets`): the sets that may be trained; the others stay inactive (no log α,
        no λ) even where the target is smaller, and their dimension keeps the source size.
        `lambda2_init` (config `prune.lambda2_init`): every λ2's starting value, λ1 starts at 0."""
        super().__init__()
        self.sets = check_sets(sets)
        self.source, self.target, self.ramp_steps = source, target, max(1, ramp_steps)
        self.mlp_matrices = mlp_matrices
        self.head_dim = head_dim
        shapes = {
            "layer": (source.layers,),
            "head": (source.layers, source.kv_heads),
            "intermediate": (source.layers, source.intermediate),
            "hidden": (source.hidden,),
        }
        sizes = {"layer": (source.layers, target.layers), "head": (source.kv_heads, target.kv_heads),
                 "intermediate": (source.intermediate, target.intermediate), "hidden": (source.hidden, target.hidden)}
        # an untrained set keeps the source size everywhere (targets, ramps, the final shape)
        sizes = {m: (s, t if m in self.sets else s) for m, (s, t) in sizes.items()}
        self.active = [m for m in SETS if sizes[m][1] < sizes[m][0]]
        self.final_fraction = {m: sizes[m][1] / sizes[m][0] for m in SETS}
        self.keep = {m: sizes[m][1] for m in SETS}
        self.log_alpha = nn.ParameterDict({
            m: nn.Parameter(torch.full(shapes[m], LOG_ALPHA_INIT).clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX))
            for m in self.active
        })
        # λ1, λ2 per active set, maximised (see _ReverseGrad). At least one row: ZeRO-3 does not
        # partition empty parameters (a target equal to the source leaves no set active).
        self.lambdas = nn.Parameter(torch.zeros(max(1, len(self.active)), 2).index_fill_(1, torch.tensor([1]),
                                                                                        float(lambda2_init)))
        # The fp32 log α (by set) that 'final' masks are chosen from, when the engine has read
        # them from the optimizer's master copy: under bf16 the module's own 16-bit values
        # tie or reorder units, and the last evaluation must score the model that is exported.
        self.master_log_alpha: dict[str, torch.Tensor] | None = None

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
        """Expected kept fraction of each active set, for the Lagrangian (SPEC §2): per layer
        ([L]) for head and intermediate, from each layer's own masks (not nested with the
        layer mask), so a layer far from its target is penalised even when the mean is on
        target; a scalar for layer and hidden."""
        return {m: probs[m].mean(-1) for m in self.active}

    def target_fractions(self, step: int) -> dict[str, float]:
        """Each active set's own ramped target fraction."""
        return {m: self.target_fraction(m, step) for m in self.active}

    def _prunable_params(self, layer, kv_heads, intermediate, hidden):
        """Attention and MLP projection parameters of a model whose layer l is kept with
        (expected) weight layer[l] and holds kv_heads[l] key/value groups and intermediate[l]
        channels over `hidden` residual dimensions: nested products, as the reference counts.
        Tensors (on the masks' device) or plain numbers alike."""
        s = self.source
        per_kv_group = self.head_dim * (2 * (s.heads // s.kv_heads) + 2)  # q and o per query head, k and v
        return (layer * hidden * (kv_heads * per_kv_group + self.mlp_matrices * intermediate)).sum()

    def source_params(self) -> float:
        """The source's prunable parameters: arithmetic on the config, no tensor."""
        s = self.source
        per_kv_group = self.head_dim * (2 * (s.heads // s.kv_heads) + 2)
        return float(s.layers * s.hidden * (s.kv_heads * per_kv_group + self.mlp_matrices * s.intermediate))

    def expected_sparsity(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Expected fraction of the non-embedding prunable parameters removed (SPEC §3.1):
        what the pruning scaling law takes as s. A 0-d float64 tensor on the masks' device
        (no host synchronisation; the evaluator reads it once, after its all-reduce)."""
        s = self.source
        ones = torch.ones(s.layers, dtype=torch.float64, device=self.lambdas.device)
        layer = probs["layer"].double() if "layer" in probs else ones
        kv = probs["head"].double().sum(-1) if "head" in probs else ones * s.kv_heads
        inter = probs["intermediate"].double().sum(-1) if "intermediate" in probs else ones * s.intermediate
        hidden = probs["hidden"].double().sum() if "hidden" in probs else float(s.hidden)
        return 1.0 - self._prunable_params(layer, kv, inter, hidden) / self.source_params()

    def target_shape(self, step: int) -> dict[str, float]:
        """The ramped target of `step`, in the units of `expected_shape`."""
        s = self.source
        f = {m: self.target_fraction(m, step) for m in SETS}
        kv = s.kv_heads * f["head"]
        return {"layers": s.layers * f["layer"], "hidden": s.hidden * f["hidden"], "heads": kv * (s.heads // s.kv_heads),
                "kv_heads": kv, "intermediate": s.intermediate * f["intermediate"]}

    def target_sparsity(self, step: int) -> float:
        """The ramped target sparsity at `step`, what predictions use (SPEC §3.1): the target
        shape's sparsity times the ramp's progress, as the reference's `get_target_sparsity`
        ramps it (linearly from 0). Not the sparsity of the ramped shape: the nested products
        of per-set linear ramps run ahead of it mid-ramp (0.60 against 0.45 halfway in the test)."""
        t = self.target_shape(self.ramp_steps)
        kept = self._prunable_params(np.array([t["layers"]]), t["kv_heads"], t["intermediate"], t["hidden"])
        return min(1.0, step / self.ramp_steps) * (1.0 - float(kept) / self.source_params())

    def expected_shape(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The masks' expected shape and sparsity, SHAPE_STATS order (layers, hidden, heads,
        kv_heads, intermediate, sparsity), as one float64 tensor on the masks' device."""
        s = self.source
        dev = self.lambdas.device

        def const(x: float) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.float64, device=dev)

        layers = probs["layer"].double().sum() if "layer" in probs else const(s.layers)
        kv = probs["head"].double().sum(-1).mean() if "head" in probs else const(s.kv_heads)
        inter = (probs["intermediate"].double().sum(-1).mean() if "intermediate" in probs
                 else const(s.intermediate))
        hidden = probs["hidden"].double().sum() if "hidden" in probs else const(s.hidden)
        group = s.heads // s.kv_heads
        return torch.stack([layers, hidden, kv * group, kv, inter, self.expected_sparsity(probs)])

    def lagrangian(self, step: int, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ over sets of mean(λ1·gap + λ2·gap²), gap = expected − target fraction; the mean
        runs over layers for the per-layer sets (SPEC §2)."""
        lam = _ReverseGrad.apply(self.lambdas)
        if not self.active:
            return torch.zeros((), device=lam.device)
        expected, target = self.expected_fractions(probs), self.target_fractions(step)
        total = torch.zeros((), dtype=torch.float32, device=lam.device)
        for i, m in enumerate(self.active):
            gap = expected[m] - target[m]
            total = total + (lam[i, 0] * gap + lam[i, 1] * gap * gap).mean()
        return total

    # ---- masks --------------------------------------------------------------------------
    def sample(self, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """One hard-concrete draw per active set. The noise is drawn on the masks' device from
        `generator` (a generator of that device; None only where the device has none, e.g.
        `meta`): no host-to-device copy per forward."""
        z = {}
        for m in self.active:
            la = self.clamped(m)
            u = torch.rand(la.shape, generator=generator, dtype=torch.float32, device=la.device).clamp_(EPS, 1 - EPS)
            z[m] = sample_z(la, u)
        return z

    def deterministic(self, final: bool = True, log_alpha: dict[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
        """`final`: keep exactly the target count per row (the exported shape). Otherwise
        (evaluation while pruning) keep round(that row's expected kept count) per row, the
        reference's rule: the model as it stands now, which may be below the target.
        `log_alpha`: score these values (fp32, by set) instead of the module's own; only the
        counts and the active sets come from the module, so no parameter is read (ZeRO-3
        needs no gather)."""
        z = {}
        for m in self.active:
            la = (self.clamped(m) if log_alpha is None
                  else log_alpha[m].float().clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX))
            keep: int | torch.Tensor = self.keep[m]
            if not final:
                keep = torch.round(prob_nonzero(la).sum(-1)).long()
            z[m] = deterministic_z(la, keep)
        return z

    def forward(self, step: int, mode: str, generator: torch.Generator | None = None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """mode: 'sample' (training), 'expected' (deterministic, expected counts) or 'final'.
        Returns (masks, Lagrangian, expected shape and sparsity as a SHAPE_STATS tensor); the
        shape only when evaluating. Everything stays on the masks' device: no forward ever
        waits for the device (no `.item()`, no host tensor)."""
        probs = self.probs()
        if mode == "sample":
            return self.sample(generator), self.lagrangian(step, probs), None
        final = mode == "final"
        master = None
        if final and self.master_log_alpha is not None:
            master = {m: v.to(self.log_alpha[m].device) for m, v in self.master_log_alpha.items()}
        z = self.deterministic(final, master)
        lag = self.lagrangian(step, probs).detach()
        detached = {k: v.detach() for k, v in probs.items()}
        return z, lag, self.expected_shape(detached)
