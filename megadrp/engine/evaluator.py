"""Per-domain evaluation on fixed windows, sharded over ranks and all-reduced.

Every rank runs the same number of forwards (short shards are padded with window 0 and the
padding is not counted), because under ZeRO-3 each forward gathers parameters collectively.
The windows are the ones `megadrp eval` scores, so an exported model can be checked
against the trainer's last evaluation. Sums stay on the engine's device until the one
all-reduce; the host reads them once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megadrp.data.mixture import EvalWindows
from megadrp.model.llama import SHAPE_STATS


@dataclass
class EvalResult:
    loss: np.ndarray  # per domain: mean token loss (same on every rank)
    shape: dict[str, float] | None  # the masks' expected shape and sparsity (pruning)
    lagrangian: float | None
    kd: np.ndarray | None = None  # per domain: mean token KL to the teacher (distillation)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch onto the device: from pinned memory without blocking the host where the
    device is an accelerator (the copy overlaps the work already queued)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class Evaluator:
    def __init__(self, windows: list, seq_len: int, micro_batch: int, rank: int, world: int) -> None:
        """`windows`: one set of eval windows a domain (`EvalWindows`: `n`, `shard`, `[i]`)."""
        self.sets, self.seq_len, self.micro_batch, self.rank, self.world = windows, seq_len, micro_batch, rank, world
        self.reference: Evaluator = self

    @classmethod
    def for_domains(cls, domains, seq_len: int, tokens_per_domain: int, micro_batch: int, rank: int, world: int,
                    vocab_size: int | None = None, split: str = "eval") -> "Evaluator":
        """The first windows of each domain's `split`: eval (what runs evaluate), or train (the
        basis of a training-loss signal's references). Never test: no run opens it."""
        assert split in ("eval", "train"), split
        try:
            sets = [EvalWindows(getattr(d, split), seq_len, tokens_per_domain, d.name, vocab_size, split)
                    for d in domains]
        except ValueError as e:
            from megadrp.errors import ConfigError

            raise ConfigError(str(e)) from e
        return cls(sets, seq_len, micro_batch, rank, world)

    @classmethod
    def for_plan(cls, plan, rank: int, world: int) -> "Evaluator":
        """The run's evaluator, with `.reference`: the one its reference losses are measured by,
        on the basis of the signal the controller weighs (plan.reference_split)."""
        cfg = plan.cfg
        make = lambda split: cls.for_domains(plan.domains, cfg.train.seq_len, cfg.eval.tokens_per_domain,  # noqa: E731
                                             cfg.eval.micro_batch, rank, world, plan.model_config.vocab_size, split)
        ev = make("eval")
        ev.reference = ev if plan.reference_split == "eval" else make(plan.reference_split)
        return ev

    @torch.no_grad()
    def reduced_sums(self, engine, step: int, mask_mode: str | None, teacher=None):
        """([domains, 3] float64 on the engine's device: token-loss sum, token count and KL sum to
        the teacher, summed over ranks; the last forward's output, whose Lagrangian and expected
        shape — the same on every forward — the result reports). `teacher`: a `TeacherEngine`
        (engine/distill.py) or None."""
        engine.eval()
        mb = self.micro_batch
        sums = torch.zeros(len(self.sets), 3, dtype=torch.float64, device=engine.device)
        out = None
        for d, ew in enumerate(self.sets):
            mine = ew.shard(self.rank, self.world)
            per_rank = math.ceil(ew.n / self.world)
            for b in range(math.ceil(per_rank / mb)):
                sel = mine[b * mb:(b + 1) * mb]
                real = len(sel)
                sel = sel + [0] * (mb - real)
                x = to_device(torch.from_numpy(np.stack([ew[i] for i in sel])), engine.device)
                extra = {} if teacher is None else {"teacher": teacher.for_batch(x[:, :-1])}
                out = engine(x[:, :-1], x[:, 1:], step=step, mask_mode=mask_mode, **extra)
                sums[d, 0] += out.losses[:real].double().sum()
                sums[d, 1] += real * self.seq_len
                if out.kd is not None:
                    sums[d, 2] += out.kd[:real].double().sum()
        dist.all_reduce(sums)
        engine.train()
        assert out is not None
        return sums, out

    def __call__(self, engine, step: int, mask_mode: str | None, teacher=None) -> EvalResult:
        sums, out = self.reduced_sums(engine, step, mask_mode, teacher)
        lag = None if out.lagrangian is None else float(out.lagrangian.item())
        shape = None if out.expected_shape is None else dict(zip(SHAPE_STATS, out.expected_shape.tolist()))
        sums = sums.cpu()
        # the KL itself, at the distillation temperature (the training loss carries T² on top)
        kd = (sums[:, 2] / sums[:, 1]).numpy() / teacher.temperature ** 2 if teacher is not None else None
        return EvalResult((sums[:, 0] / sums[:, 1]).numpy(), shape, lag, kd)
