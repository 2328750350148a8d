"""The training DataLoader: the domain mixture every worker reads, how the workers treat the
job's signals and how they are stopped."""
from __future__ import annotations

import signal

import torch


def make_loader(plan, schedule, start_step: int, device: torch.device) -> torch.utils.data.DataLoader:
    """The stage's batches from step `start_step` + 1 on, drawn from `schedule`'s shared weights
    table and replaying its sampler's counts (a resume draws what a straight run would)."""
    from megadrp.data.mixture import MixtureDataset

    cfg, t = plan.cfg, plan.cfg.train
    ds = MixtureDataset([d.train for d in plan.domains], t.seq_len, plan.layout, schedule.table, cfg.seed, t.steps,
                        start_step=start_step, start_counts=schedule.sampler.counts, names=plan.names,
                        vocab_size=plan.model_config.vocab_size)
    return torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=t.num_workers,
        prefetch_factor=t.prefetch_factor if t.num_workers > 0 else None,
        worker_init_fn=ignore_signals_in_worker if t.num_workers > 0 else None,
        pin_memory=device.type == "cuda")  # so the step's copies to the device need not block


def stop_loader(batches) -> None:
    """Shut the DataLoader's workers down on any exit path. They ignore SIGTERM (job signals
    are the trainer's), so the DataLoader's own shutdown, which ends in SIGTERM, cannot stop
    one that is still busy: such a worker is killed."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in getattr(batches, "_workers", []):
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


def ignore_signals_in_worker(_: int) -> None:
    # The trainer handles SIGTERM/SIGUSR1 (checkpoint, then exit); workers must not die first.
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
