"""One-shot structured importance: which layers, key/value head groups, MLP channels and hidden
dimensions a model needs, from its activations on calibration windows (forward passes only).

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation", §3): on calibration batches X of B sequences × S tokens,

    head i        ‖Attn(X)_i‖₂ over its head dimension       (a key/value group: the L2 norm of its query heads')
    MLP channel   |act(X W_gate) ⊙ (X W_up)|_i                (the input of down_proj; GPT-NeoX: act(X W_in))
    hidden dim    |Norm(h)|_i, summed over every norm of every layer
    layer         the loss increase when the layer is skipped (or Block Influence, below)

each aggregated with the L2 norm over the sequence and the mean over the batch. ShortGPT (Men
et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
§3.1): a layer's Block Influence is BI_i = 1 − mean over tokens of cos(x_i, x_{i+1}), its input
and output hidden states; the lowest-scoring layers go.

Over domains (megadrp's own): scores are measured per domain. `mean` averages them (Minitron
on a calibration set with every domain in equal measure); `worst` divides each domain's scores
by their mean over the units they compete with (a layer's heads, a layer's channels, the hidden
dimensions, the layers) and keeps a unit by its largest normalised score over the domains, so
a unit one domain needs is not cut because the others do not use it.

Scores are accumulated in float64 from forward hooks (the activations a ZeRO-3 forward has
anyway, its parameters gathered layer by layer) and all-reduced: every rank, on any world size,
selects the same units. `keep_masks` turns scores into 0/1 masks of exactly the target shape
(uniform across layers), in the format of the L0 masks' final masks, so the same export
(model/prune.py) slices them into the family's own class.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from megadrp.model.masks import SETS, Shape

LAYER_IMPORTANCE = ("loss", "block_influence")


@dataclass
class Scores:
    """Per-set importance sums over windows (float64) and the window count; `mean()` gives
    the batch means."""

    head: torch.Tensor  # [L, n_kv]
    intermediate: torch.Tensor  # [L, I]
    hidden: torch.Tensor  # [d]
    layer: torch.Tensor  # [L]: Block Influence, or the loss increase when skipped
    windows: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))

    @classmethod
    def zeros(cls, source: Shape, device: torch.device) -> "Scores":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(source.layers, source.kv_heads), z(source.layers, source.intermediate), z(source.hidden),
                   z(source.layers), z(()))

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"head": self.head, "intermediate": self.intermediate, "hidden": self.hidden, "layer": self.layer}

    def flat(self) -> torch.Tensor:
        return torch.cat([t.flatten() for t in (*self.as_dict().values(), self.windows[None])])

    def load_flat(self, flat: torch.Tensor) -> None:
        i = 0
        for t in (*self.as_dict().values(), self.windows):
            t.copy_(flat[i:i + t.numel()].view_as(t))
            i += t.numel()

    def mean(self) -> dict[str, torch.Tensor]:
        return {k: v / self.windows.clamp(min=1) for k, v in self.as_dict().items()}


def _seq_l2_batch_sum(a: torch.Tensor) -> torch.Tensor:
    """[B, T, n] → [n]: the L2 norm over the sequence, summed over the batch (divided by the
    window count later: the batch mean)."""
    return a.double().pow(2).sum(1).sqrt().sum(0)


class Recorder:
    """Forward hooks on a `MaskedLlama` that add one batch's activations to `Scores`. Attach,
    run unmasked forwards, detach."""

    def __init__(self, model, scores: Scores, n_kv: int) -> None:
        self.scores, self.handles = scores, []
        self.real: int | None = None  # rows of the batch that count (the rest pad a rank's shard)
        from megadrp.model.llama import head_dim_of

        heads = model.config.num_attention_heads
        group = heads // n_kv
        hd = head_dim_of(model.config)
        for i, block in enumerate(model.decoder.layers):

            def attn(mod, args, i=i, hd=hd):
                y = args[0][:self.real]  # o_proj's input: the heads' outputs [B, T, H·hd]
                per_head = y.view(*y.shape[:2], heads, hd).double().norm(dim=-1)  # [B, T, H]
                s = per_head.pow(2).sum(1).sqrt()  # [B, H]: L2 over the sequence
                self.scores.head[i] += s.view(s.shape[0], n_kv, group).pow(2).sum(-1).sqrt().sum(0)

            def mlp(mod, args, i=i):
                self.scores.intermediate[i] += _seq_l2_batch_sum(args[0][:self.real])

            def norm(mod, args, out):
                self.scores.hidden.add_(_seq_l2_batch_sum(out[:self.real]))

            def block_influence(mod, args, out, i=i):
                cos = F.cosine_similarity(args[0][:self.real].double(), out[:self.real].double(), dim=-1)  # [B, T]
                self.scores.layer[i] += (1.0 - cos).mean(1).sum()

            self.handles += [block.attn_out.register_forward_pre_hook(attn),
                             block.mlp_out.register_forward_pre_hook(mlp),
                             *(n.register_forward_hook(norm) for n in block.norms),
                             block.register_forward_hook(block_influence)]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()


def combine(per_domain: list[dict[str, torch.Tensor]], over_domains: str) -> dict[str, torch.Tensor]:
    """One score per unit from each domain's batch means: `mean` or `worst` (module docstring)."""
    if over_domains == "mean":
        return {k: torch.stack([d[k] for d in per_domain]).mean(0) for k in per_domain[0]}
    if over_domains != "worst":
        raise ValueError(f"prune.importance_over_domains={over_domains!r}: mean or worst")
    out = {}
    for k in per_domain[0]:
        normed = []
        for d in per_domain:
            v = d[k]
            # per-layer sets compete within their layer; the others across the whole set. The scale
            # is the mean magnitude: a layer's loss increase when skipped can be negative
            scale = v.abs().mean(-1, keepdim=True) if v.dim() == 2 else v.abs().mean()
            normed.append(v / scale.clamp(min=torch.finfo(v.dtype).tiny))
        out[k] = torch.stack(normed).max(0).values
    return out


def keep_masks(score: dict[str, torch.Tensor], source: Shape, target: Shape) -> dict[str, torch.Tensor]:
    """0/1 float masks keeping exactly the target's count of the highest-scoring units: the
    layers, then in every layer the same number of key/value groups and of MLP channels (a
    standard checkpoint is uniform across layers), and the hidden dimensions. Only the sets the
    target shrinks; ties go to the lower index (deterministic)."""
    def top(v: torch.Tensor, k: int) -> torch.Tensor:
        # stable: sort by descending score, then ascending index
        order = torch.sort(v, dim=-1, descending=True, stable=True).indices[..., :k]
        return torch.zeros_like(v, dtype=torch.float32).scatter_(-1, order, 1.0)

    z = {}
    if target.layers < source.layers:
        z["layer"] = top(score["layer"], target.layers)
    if target.kv_heads < source.kv_heads:
        z["head"] = top(score["head"], target.kv_heads)
    if target.intermediate < source.intermediate:
        z["intermediate"] = top(score["intermediate"], target.intermediate)
    if target.hidden < source.hidden:
        z["hidden"] = top(score["hidden"], target.hidden)
    assert set(z) <= set(SETS)
    return z


def warm_log_alpha(z: dict[str, torch.Tensor], high: float, gap: float) -> dict[str, torch.Tensor]:
    """L0 log α from one-shot masks (`prune.init: importance`): a unit the one-shot prune keeps
    starts at `high` (the cold start's value), the others `gap` below it."""
    return {m: high - gap * (1.0 - v) for m, v in z.items()}
