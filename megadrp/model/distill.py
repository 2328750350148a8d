"""The losses of a student against a frozen teacher (docs/method.md §7): forward KL between the
teacher's and the student's next-token distributions on every token, beside the cross-entropy.

    loss = α · T² · KL(softmax(t / T) ‖ softmax(s / T)) + (1 − α) · CE(s, labels)

(T² keeps the KL's gradients at the scale of T = 1, Hinton et al.; Minitron's choice is α = 1,
T = 1.) The full-vocabulary logits are the memory of this loss: at a 32k vocabulary a micro-batch of
16k tokens holds 2 GB of fp32 logits a model, and their softmaxes and gradients several times that.
So the loss runs over chunks of tokens, each chunk's logits made from the final hidden states,
reduced to per-token numbers and dropped; the backward recomputes one chunk at a time (activation
checkpointing on the chunk). At most one chunk's logits of the two models live at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class Teacher:
    """What a student forward needs of its teacher for one micro-batch: the teacher's final
    (normed) hidden states, computed without gradients, and its LM head (a module, so ZeRO-3
    gathers its weight as it would in the teacher's own forward)."""

    hidden: torch.Tensor  # [B, T, d_teacher]
    head: nn.Module
    alpha: float = 1.0
    temperature: float = 1.0
    chunk_tokens: int = 1024


def _chunk(s_hidden: torch.Tensor, t_hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
           t_head: nn.Module, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = head(s_hidden).float()
    with torch.no_grad():
        t = t_head(t_hidden).float()
    ce = F.cross_entropy(s, labels, reduction="none")
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * (temperature * temperature)
    return ce, kl


def chunked_losses(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, teacher: Teacher
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and KL to the teacher, [B, T] each, in fp32."""
    b, t, _ = hidden.shape
    h, th, y = hidden.reshape(b * t, -1), teacher.hidden.reshape(b * t, -1), labels.reshape(b * t)
    ce, kl = [], []
    n = max(1, teacher.chunk_tokens)
    for i in range(0, b * t, n):
        args = (h[i:i + n], th[i:i + n], y[i:i + n], head, teacher.head, teacher.temperature)
        if torch.is_grad_enabled() and h.requires_grad:
            c, k = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            c, k = _chunk(*args)
        ce.append(c)
        kl.append(k)
    return torch.cat(ce).view(b, t), torch.cat(kl).view(b, t)
