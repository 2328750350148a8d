"""What killed processes leave behind, told from what live ones use: torch's JIT build locks
(megadrp/build_locks.py) and DeepSpeed's CPU allreduce segments (megadrp/shm_segments.py).
Each leftover here is made the way the real one is (a child creates it, then is SIGKILLed),
and each live file is held by a child that is still running."""
from __future__ import annotations

import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megadrp.errors import ConfigError
from megadrp.runtime import build_locks, shm_segments
from megadrp.runtime.open_files import _mapped_inodes, holders

pytestmark = pytest.mark.unit

# A child that creates `path` as torch's FileBaton does (O_CREAT | O_EXCL), optionally sizes and
# maps it as DeepSpeed's shm_initialize does, says so, then waits to be killed.
_HOLD = r"""
import mmap, os, sys, time
path, size, mapped = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
if size:
    os.ftruncate(fd, size)
if mapped:
    m = mmap.mmap(fd, size)
print("ready", flush=True)
time.sleep(600)
"""


class Holder:
    """A live process holding `path` open (and mapped)."""

    def __init__(self, path: Path, size: int = 0, mapped: bool = False) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), str(size), "1" if mapped else "0"],
                                  stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "ready"

    def kill(self) -> None:
        self.p.kill()
        self.p.wait(timeout=30)


def left_by_killed_process(path: Path, size: int = 0, mapped: bool = False) -> Path:
    Holder(path, size, mapped).kill()
    assert path.exists()
    return path


def inode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


# ---- open_files.holders -----------------------------------------------------------------------
def test_holders_sees_an_open_fd_and_a_mapping_and_nothing_after_a_kill(tmp_path):
    opened, mapped = tmp_path / "opened", tmp_path / "mapped"
    a, b = Holder(opened), Holder(mapped, size=mmap.PAGESIZE, mapped=True)
    try:
        assert holders(inode(opened), os.getuid()) == ((a.p.pid,), True)
        # a mapping is seen as such (Python's mmap keeps a dup of the fd, C's mmap need not)
        assert inode(mapped) in _mapped_inodes(f"/proc/{b.p.pid}/maps")
        assert inode(opened) not in _mapped_inodes(f"/proc/{a.p.pid}/maps")
        assert holders(inode(mapped), os.getuid(), maps=True)[0] == (b.p.pid,)
    finally:
        a.kill()
        b.kill()
    assert holders(inode(opened), os.getuid()) == ((), True)
    assert holders(inode(mapped), os.getuid(), maps=True) == ((), True)


# ---- build locks ------------------------------------------------------------------------------
def test_fs_type_takes_the_longest_mount_prefix(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
                    "40 22 0:50 / /home rw,relatime shared:20 - nfs4 server:/home rw,vers=4.2\n"
                    "41 40 0:51 / /home/me/local\\040disk rw - xfs /dev/sdb rw\n"
                    "garbage line\n")
    assert build_locks.fs_type(Path("/opt/x"), str(info)) == "ext4"
    assert build_locks.fs_type(Path("/home/me/.cache/torch_extensions"), str(info)) == "nfs4"
    assert build_locks.fs_type(Path("/home/me/local disk/x"), str(info)) == "xfs"
    assert build_locks.fs_type(Path("/homework"), str(info)) == "ext4"  # a prefix of the name is not a mount
    assert build_locks.fs_type(Path("/x"), str(tmp_path / "missing")) is None


def test_stale_locks_are_removed_live_ones_kept(tmp_path, caplog):
    root = tmp_path / "torch_extensions"
    for op in ("fused_adam", "deepspeed_shm_comm"):
        (root / "py311_cpu" / op).mkdir(parents=True)
    dead = left_by_killed_process(root / "py311_cpu" / "fused_adam" / "lock")
    live_path = root / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    live = Holder(live_path)
    try:
        assert build_locks.find_locks(root) == sorted([dead, live_path])
        with caplog.at_level("WARNING", logger="megadrp.build_locks"):
            assert build_locks.clear_stale(root) == [dead]
        assert not dead.exists() and live_path.exists()
        assert str(dead) in caplog.text and "fused_adam" in caplog.text
    finally:
        live.kill()


def test_on_a_network_file_system_only_old_locks_are_stale(tmp_path, monkeypatch):
    """A holder on another node is invisible here: a young lock may be its build."""
    (tmp_path / "fused_adam").mkdir()
    lock = left_by_killed_process(tmp_path / "fused_adam" / "lock")
    monkeypatch.setattr(build_locks, "fs_type", lambda path: "nfs4")
    assert build_locks.clear_stale(tmp_path, stale_after_s=900) == []
    old = time.time() - 1000
    os.utime(lock, (old, old))
    assert build_locks.clear_stale(tmp_path, stale_after_s=900) == [lock]


def test_a_lock_taken_again_after_inspection_is_not_removed(tmp_path, monkeypatch):
    (tmp_path / "op").mkdir()
    lock = left_by_killed_process(tmp_path / "op" / "lock")
    real = build_locks.examine
    taken = {}

    def examine_then_retake(path, now=None):
        seen = real(path, now)
        os.unlink(path)  # the stale one goes, and a live process takes the lock again
        taken["holder"] = Holder(path)
        return seen

    monkeypatch.setattr(build_locks, "examine", examine_then_retake)
    try:
        assert build_locks.clear_stale(tmp_path) == [] and lock.exists()
    finally:
        taken["holder"].kill()


def test_watch_unblocks_torch_waiting_on_a_lock_a_peer_left(tmp_path):
    """The hang itself: torch's FileBaton.wait() polls for the file forever. A peer killed
    while the watch runs leaves the lock; the waiter goes on once the watcher removes it."""
    from torch.utils.file_baton import FileBaton

    (tmp_path / "py311_cpu" / "fused_adam").mkdir(parents=True)
    lock = tmp_path / "py311_cpu" / "fused_adam" / "lock"
    with build_locks.watch(interval_s=0.05, root=tmp_path):
        left_by_killed_process(lock)
        waiter = threading.Thread(target=FileBaton(str(lock)).wait, daemon=True)
        waiter.start()
        waiter.join(timeout=30)
        assert not waiter.is_alive() and not lock.exists()


def test_stale_after_must_be_seconds(monkeypatch):
    monkeypatch.setenv("MEGADRP_BUILD_LOCK_STALE_S", "soon")
    with pytest.raises(ConfigError, match="MEGADRP_BUILD_LOCK_STALE_S='soon'"):
        build_locks.network_stale_s()
    monkeypatch.setenv("MEGADRP_BUILD_LOCK_STALE_S", "60")
    assert build_locks.network_stale_s() == 60.0


# ---- shared-memory segments -------------------------------------------------------------------
def test_stale_segments_removed_live_and_this_jobs_kept(tmp_path):
    uid = os.getuid()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}
    name = f"{shm_segments.PREFIX}_{uid}_127.0.0.1_{{port}}_{{rank}}"
    dead = [left_by_killed_process(tmp_path / name.format(port=29001, rank=r), mmap.PAGESIZE, mapped=True)
            for r in (0, 1)]
    this_job = left_by_killed_process(tmp_path / name.format(port=29555, rank=1), mmap.PAGESIZE, mapped=True)
    other_user = tmp_path / f"{shm_segments.PREFIX}_{uid + 1}_127.0.0.1_29002_0"
    other_user.write_bytes(b"x")
    unrelated = tmp_path / "psm_something"
    unrelated.write_bytes(b"x")
    live = Holder(tmp_path / name.format(port=29003, rank=0), mmap.PAGESIZE, mapped=True)
    try:
        assert shm_segments.clear_stale(env, tmp_path) == dead
        assert this_job.exists() and other_user.exists() and unrelated.exists()
        assert (tmp_path / name.format(port=29003, rank=0)).exists()
    finally:
        live.kill()
    # each rank unlinks its own name after init; a mapping outlives its name
    m = Holder(this_job.with_name(name.format(port=29555, rank=0)), mmap.PAGESIZE, mapped=True)
    try:
        assert shm_segments.unlink_own(0, env, tmp_path) and not shm_segments.unlink_own(0, env, tmp_path)
        assert m.p.poll() is None
    finally:
        m.kill()
