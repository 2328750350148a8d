"""DeepSpeed's shared-memory allreduce segments on CPU, unlinked so that no run leaves RAM
behind.

With the CPU accelerator and every rank on one node (the deepspeed launcher sets
LOCAL_SIZE), `deepspeed.init_distributed` has each rank create a 66 MiB POSIX shared-memory
segment, /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, and map
every peer's. DeepSpeed never unlinks them, so each run leaves world_size x 66 MiB in the
tmpfs, which is RAM, until the machine reboots: a day of test runs on a 24 GiB machine left
20 GiB there, and the next test suite ran out of memory and timed out.

The POSIX idiom fixes it: once every rank has mapped every segment (a barrier after init),
each rank unlinks its own name. The mappings stay valid, and the kernel frees the memory when
the last rank exits, however it exits, SIGKILL included. Segments that earlier runs (or a
rank killed between creating its segment and that barrier) left are removed at the next
start when no process on this host has them open or mapped.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from megadrp.runtime.open_files import snapshot

log = logging.getLogger("megadrp.shm_segments")

PREFIX = "deepspeed_allreduce_buffer"
SHM_DIR = Path("/dev/shm")


def job_prefix(env: Mapping[str, str] | None = None) -> str:
    """The name DeepSpeed gives this job's segments, less the rank (shm.cpp's shm_initialize)."""
    env = os.environ if env is None else env
    return f"{PREFIX}_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_"


def unlink_own(rank: int, env: Mapping[str, str] | None = None, shm_dir: Path = SHM_DIR) -> bool:
    """Unlink this rank's segment name; call it after a barrier that follows init, when every
    peer has mapped it. True when there was one (DeepSpeed makes none off a single node)."""
    try:
        os.unlink(shm_dir / f"{job_prefix(env)}{rank}")
        return True
    except FileNotFoundError:
        return False


def clear_stale(env: Mapping[str, str] | None = None, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove this user's DeepSpeed segments that no process on this host has open or mapped,
    except this job's own names (its peers may be creating and opening them right now; each
    rank unlinks its own after init). Returns what it removed; one log line says how much
    memory came back."""
    mine = f"{PREFIX}_{os.getuid()}_"
    own = job_prefix(env)
    removed, freed = [], 0
    try:
        names = sorted(n for n in os.listdir(shm_dir) if n.startswith(mine) and not n.startswith(own))
    except OSError:
        return []
    if not names:
        return []
    in_use, verifiable = snapshot(os.getuid(), maps=True)
    if not verifiable:
        return []
    for name in names:
        path = shm_dir / name
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) in in_use:
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
        freed += st.st_blocks * 512
    if removed:
        log.warning("removed %d shared-memory segments of DeepSpeed's CPU allreduce that earlier runs left in %s "
                    "(no process uses them): %.1f GiB of RAM back", len(removed), shm_dir, freed / 2**30)
    return removed
