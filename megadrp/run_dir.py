"""Checks on the run directory, made before anything in it is written, and the way a check
made on rank 0 fails every rank together."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from megadrp.config import ConfigError


def on_rank0(check: Callable[[], None], rank: int, world: int) -> None:
    """Run `check` on rank 0 and raise its error on every rank, so that no rank is left
    waiting in a collective for one that failed."""
    msg = None
    if rank == 0:
        try:
            check()
        except (OSError, ConfigError) as e:
            msg = str(e)
    box = [msg]
    if dist.is_initialized() and world > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise ConfigError(box[0])


def check_run_dir(run_dir: Path, resume: str, overwrite: bool) -> None:
    """Writable, and not a finished run that `resume: none` would start over in (its metrics
    and model would be replaced) unless `overwrite: true` says so."""
    status = run_dir / "status.json"
    if resume == "none" and not overwrite and status.is_file():
        try:
            done = json.loads(status.read_text()).get("state") == "done"
        except (OSError, ValueError):
            done = False
        if done:
            raise ConfigError(f"run_dir {run_dir} holds a finished run ({status}: done) and resume=none would "
                              "start over in it; choose another run_dir, or pass overwrite=true to replace it")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir}: cannot write there ({e.strerror}); choose a writable run_dir") from e
