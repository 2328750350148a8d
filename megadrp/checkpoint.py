"""Tagged checkpoints that become visible only when complete.

Layout: RUN_DIR/checkpoints/step00000040/ holds DeepSpeed's files (every rank's
partitions) and `megadrp_state.pt` (sampler, weights table, controller, counters). It is
written as `.tmp-step00000040/` and renamed by rank 0 after every rank has finished, so a
kill at any moment leaves either the old set of checkpoints or the old set plus one whole
new one. `resume: auto` takes the highest complete step.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

STATE_FILE = "megadrp_state.pt"
_TAG = re.compile(r"^step(\d{8})$")


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _TAG.match(d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def check_room(root: Path, needed_bytes: int) -> None:
    """Fail with a clear message, before writing, when the disk cannot hold a checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if needed_bytes > free:
        raise OSError(f"{root}: {free / 2**30:.2f} GiB free, a checkpoint needs about {needed_bytes / 2**30:.2f} GiB; "
                      "free space or point run_dir elsewhere (the last complete checkpoint is kept)")


def save(engine, root: Path, step: int, state: dict, keep: int) -> Path:
    """Collective: every rank calls it."""
    rank = dist.get_rank()
    tag, tmp_tag = tag_of(step), f".tmp-{tag_of(step)}"
    tmp = root / tmp_tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    if os.environ.get("MEGADRP_FAULT_KILL_IN_SAVE") == str(step):  # reliability tests: die mid-save
        os.kill(os.getpid(), 9)
    if rank == 0:
        f = tmp / f".{STATE_FILE}.tmp"
        torch.save(state, f)
        os.replace(f, tmp / STATE_FILE)
        _fsync_dir(tmp)
    dist.barrier()
    final = root / tag
    if rank == 0:
        if final.exists():  # a re-save of the same step (resume then immediate save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(engine, path: Path) -> dict:
    """Collective. Returns megadrp's own state; the engine's is loaded in place."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    world = dist.get_world_size()
    if state.get("world_size", world) != world:
        raise ValueError(f"{path}: written by {state['world_size']} ranks, resuming with {world}; ZeRO-3 partitions "
                         "are per rank: resume with the same number of ranks (or start fresh with resume=none)")
    engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                           load_optimizer_states=True, load_lr_scheduler_states=False)
    return state


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
