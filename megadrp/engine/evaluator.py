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
    windows: np.ndarray | None = None  # per domain: windows scored (they vary with tokens_per_domain: auto)
    se: np.ndarray | None = None  # per domain: standard error of the mean window loss


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch onto the device: from pinned memory without blocking the host where the
    device is an accelerator (the copy overlaps the work already queued)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def standard_error(sums: np.ndarray) -> np.ndarray:
    """Per domain, the standard error of the mean window loss from [.., 5] sums (columns 3, 4:
    Σ window mean, Σ window mean²; column 1 / seq_len windows, passed as column 5 here)."""
    n, s1, s2 = sums[:, 5], sums[:, 3], sums[:, 4]
    var = np.where(n > 1, (s2 - s1 * s1 / np.maximum(n, 1)) / np.maximum(n - 1, 1), np.inf)
    return np.sqrt(np.maximum(var, 0.0) / np.maximum(n, 1))


class Evaluator:
    def __init__(self, windows: list, seq_len: int, micro_batch: int, rank: int, world: int,
                 floor: int | None = None, target_se: float | None = None) -> None:
        """`windows`: one set of eval windows a domain (`EvalWindows`: `n`, `[i]`). With
        `target_se` (tokens_per_domain: auto), a domain is scored on its first `floor` windows,
        then twice as many, … until the standard error of its mean window loss is at most
        `target_se` or every window of its set is scored (the ceiling)."""
        self.sets, self.seq_len, self.micro_batch, self.rank, self.world = windows, seq_len, micro_batch, rank, world
        self.floor, self.target_se = floor, target_se
        self.reference: Evaluator = self
    @classmethod
    def for_domains(cls, domains, seq_len: int, tokens_per_domain: int, micro_batch: int, rank: int, world: int,
                    vocab_size: int | None = None, split: str = "eval", **auto) -> "Evaluator":
        """The first windows of each domain's `split`: eval (what runs evaluate), or train (the
        basis of a training-loss signal's references). Never test: no run opens it. `auto`:
        `floor` and `target_se` (tokens_per_domain: auto; `tokens_per_domain` is the ceiling)."""
        assert split in ("eval", "train"), split
        try:
            sets = [EvalWindows(getattr(d, split), seq_len, tokens_per_domain, d.name, vocab_size, split)
                    for d in domains]
        except ValueError as e:
            from megadrp.errors import ConfigError

            raise ConfigError(str(e)) from e
        return cls(sets, seq_len, micro_batch, rank, world, **auto)

    @classmethod
    def for_plan(cls, plan, rank: int, world: int) -> "Evaluator":
        """The run's evaluator, with `.reference`: the one its reference losses are measured by,
        on the basis of the signal the controller weighs (plan.reference_split)."""
        cfg = plan.cfg
        floor, ceiling = cfg.eval.token_bounds
        auto = ({"floor": max(1, floor // cfg.train.seq_len), "target_se": cfg.eval.target_se}
                if cfg.eval.tokens_per_domain == "auto" else {})
        make = lambda split: cls.for_domains(plan.domains, cfg.train.seq_len, ceiling,  # noqa: E731
                                             cfg.eval.micro_batch, rank, world, plan.model_config.vocab_size, split,
                                             **auto)
        ev = make("eval")
        ev.reference = ev if plan.reference_split == "eval" else make(plan.reference_split)
        return ev

    @torch.no_grad()
    def reduced_sums(self, engine, step: int, mask_mode: str | None, teacher=None,
                     ranges: list[tuple[int, int]] | None = None):
        """([domains, 6] float64 on the engine's device: token-loss sum, token count, KL sum to the
        teacher, Σ window mean loss, Σ its square, windows — summed over ranks — for windows
        lo … hi − 1 of each domain (`ranges`; default all); the last forward's output, whose
        Lagrangian and expected shape — the same on every forward — the result reports).
        `teacher`: a `TeacherEngine` (engine/distill.py) or None."""
        engine.eval()
        mb = self.micro_batch
        sums = torch.zeros(len(self.sets), 6, dtype=torch.float64, device=engine.device)
        out = None
        for d, ew in enumerate(self.sets):
            lo, hi = ranges[d] if ranges is not None else (0, ew.n)
            mine = list(range(lo + self.rank, hi, self.world))
            per_rank = math.ceil((hi - lo) / self.world)
            for b in range(math.ceil(per_rank / mb)):
                sel = mine[b * mb:(b + 1) * mb]
                real = len(sel)
                sel = sel + [0] * (mb - real)
                x = to_device(torch.from_numpy(np.stack([ew[i] for i in sel])), engine.device)
                extra = {} if teacher is None else {"teacher": teacher.for_batch(x[:, :-1])}
                out = engine(x[:, :-1], x[:, 1:], step=step, mask_mode=mask_mode, **extra)
                window = out.losses[:real].double().mean(dim=1)
                sums[d, 0] += out.losses[:real].double().sum()
                sums[d, 1] += real * self.seq_len
                if out.kd is not None:
                    sums[d, 2] += out.kd[:real].double().sum()
                sums[d, 3] += window.sum()
                sums[d, 4] += (window * window).sum()
                sums[d, 5] += real
        if out is None:  # nothing left to score on any domain: still one forward, for the result's shape
            x = to_device(torch.from_numpy(np.stack([self.sets[0][0]] * mb)), engine.device)
            out = engine(x[:, :-1], x[:, 1:], step=step, mask_mode=mask_mode)
        dist.all_reduce(sums)
        engine.train()
        return sums, out

    def __call__(self, engine, step: int, mask_mode: str | None, teacher=None) -> EvalResult:
        if self.target_se is None:
            sums, out = self.reduced_sums(engine, step, mask_mode, teacher)
            host = sums.cpu().numpy()
        else:
            host, out = self._adaptive(engine, step, mask_mode, teacher)
        lag = None if out.lagrangian is None else float(out.lagrangian.item())
        shape = None if out.expected_shape is None else dict(zip(SHAPE_STATS, out.expected_shape.tolist()))
        # the KL itself, at the distillation temperature (the training loss carries T² on top)
        kd = host[:, 2] / host[:, 1] / teacher.temperature ** 2 if teacher is not None else None
        return EvalResult(host[:, 0] / host[:, 1], shape, lag, kd, host[:, 5], standard_error(host))

    def _adaptive(self, engine, step: int, mask_mode: str | None, teacher):
        """tokens_per_domain: auto. Rounds of windows per domain (the floor, then doubling) until
        each domain's standard error is at most the target or its windows are spent. Every
        decision is made from all-reduced sums: every rank scores the same windows."""
        total, out = None, None
        done = [0] * len(self.sets)
        want = [min(self.floor, ew.n) for ew in self.sets]
        while any(w > d for w, d in zip(want, done)):
            sums, out = self.reduced_sums(engine, step, mask_mode, teacher, list(zip(done, want)))
            part = sums.cpu().numpy()
            total = part if total is None else total + part
            se = standard_error(total)
            done = list(want)
            want = [d if se[i] <= self.target_se else min(2 * d, ew.n) for i, (d, ew) in enumerate(zip(done, self.sets))]
        assert total is not None and out is not None
        return total, out
