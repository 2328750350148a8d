"""The training loop's own collectives, on the engine's device.

A process group serves the device types its backend serves: NCCL only CUDA tensors, gloo
host tensors. Every tensor here is made on the device the caller names (the engine's), so
the same loop runs on a CPU gloo group and a CUDA NCCL group; the values are read on the
host only after the reduction, once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class StepSums:
    """One step's per-domain loss sums and sample counts, its non-finite micro-batches and
    the stop flag, in one float64 tensor on the device: accumulated without a host
    synchronisation, reduced once at the end of the step.

    Layout: [loss sums (k) | sample counts (k) | non-finite micro-batches | stop flag | KL sum]."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.k = k
        self.t = torch.zeros(2 * k + 3, dtype=torch.float64, device=device)

    def add(self, token_losses: torch.Tensor, domains: torch.Tensor, loss: torch.Tensor,
            kd: torch.Tensor | None = None) -> None:
        """A micro-batch: its per-token losses [B, T], each sample's domain [B], its loss, and
        under distillation its per-token KL to the teacher [B, T]."""
        k = self.k
        self.t.index_add_(0, domains, token_losses.detach().mean(1).double())
        self.t.index_add_(0, domains + k, torch.ones_like(domains, dtype=torch.float64))
        self.t[2 * k] += (~torch.isfinite(loss.detach())).double()
        if kd is not None:
            self.t[2 * k + 2] += kd.detach().mean(1).double().sum()

    def reduce(self, stop_signal: int) -> torch.Tensor:
        """Sum over ranks (the stop flag: any rank's signal number, summed, non-zero if any)."""
        self.t[2 * self.k + 1] = float(stop_signal)
        dist.all_reduce(self.t)
        return self.t


def any_rank(value: float, device: torch.device) -> torch.Tensor:
    """The largest `value` over ranks, as a one-element tensor on `device`."""
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` over ranks (an integer, exact in float64 up to 2^53)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
