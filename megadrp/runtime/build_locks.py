"""Stale build locks of torch's JIT-compiled extensions, found and removed while DeepSpeed
loads its ops.

DeepSpeed builds FusedAdam (and, on CPU, its shared-memory allreduce) with
`torch.utils.cpp_extension.load`. Every process that loads such an op takes torch's
FileBaton: it creates `<build dir>/lock` with O_CREAT|O_EXCL, runs ninja (a rebuild when
the sources, flags or install paths changed, else a no-op of about a second) and removes the
file in a `finally`. A process killed inside that window (Slurm's SIGKILL after the
preemption grace period, the OOM killer, a launcher tearing down a failed job, a test's
timeout) leaves the file behind, and every later load on that file system polls for it
forever and prints nothing: the "hangs at Loading extension module fused_adam" of many issue
threads, which users fix by deleting ~/.cache/torch_extensions by hand.

The creator of a torch build lock keeps it open until it removes it (the baton's fd), so a
lock that no process on this host has open, on a local file system, was left by a dead one.
On a network file system (a home directory shared by the nodes) a process on another node
may hold it; there a lock is treated as stale only once it is older than any build takes
(`MEGADRP_BUILD_LOCK_STALE_S`, default 900 s). Holders in another PID namespace (containers
sharing one cache directory) cannot be seen: set TORCH_EXTENSIONS_DIR per container there.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from megadrp.errors import ConfigError
from megadrp.runtime.open_files import holders

log = logging.getLogger("megadrp.build_locks")

# File systems whose every user is on this host: a lock with no holder here is stale.
LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs", "bcachefs",
                      "tmpfs", "ramfs", "overlay"})
DEFAULT_NETWORK_STALE_S = 900.0
WAIT_REPORT_S = 60.0  # a live holder for longer than this is named in the log, once


@dataclass(frozen=True)
class BuildLock:
    path: Path
    identity: tuple[int, int, int]  # (st_dev, st_ino, st_ctime_ns): a new lock at the path (which may
    # reuse the inode number) is not the one inspected
    age_s: float
    holders: tuple[int, ...]  # pids on this host that have it open
    verifiable: bool  # every process that could have created it was inspected
    local_fs: bool

    def stale(self, network_stale_s: float) -> bool:
        if self.holders:
            return False
        if self.verifiable and self.local_fs:
            return True
        return self.age_s > network_stale_s


def pin_extensions_dir(env=None) -> str:
    """Give this Python environment its own JIT-extension folder where the user set none
    (TORCH_EXTENSIONS_DIR): torch's default, ~/.cache/torch_extensions/py311_cpu, is shared by
    every environment of one Python version, so two environments (a venv and a CI checkout's, two
    torch or DeepSpeed versions) rebuild each other's DeepSpeed ops on every start (60–120 s each).
    The folder is named by the interpreter's prefix, the torch and DeepSpeed versions and the ninja
    that builds. Two ninjas alternating in one folder (a venv's pip `ninja` 1.13 and the system's
    1.11, as an activated and a plain shell find them) read each other's build log as changed
    commands and rebuild every time: where the environment has its own ninja, it is put first on
    PATH, so every rank and tool this process starts builds with it. Returns the folder in force."""
    import hashlib
    import shutil
    import sys
    from importlib import metadata

    env = os.environ if env is None else env
    own = Path(sys.executable).parent
    if (own / "ninja").is_file() and not env.get("PATH", "").startswith(str(own) + os.pathsep):
        env["PATH"] = os.pathsep.join([str(own), env.get("PATH", "")])
    if env.get("TORCH_EXTENSIONS_DIR"):
        return env["TORCH_EXTENSIONS_DIR"]
    ninja = shutil.which("ninja", path=env.get("PATH"))
    versions = [str(Path(ninja).resolve()) if ninja else "-"]
    for dist in ("torch", "deepspeed"):
        try:
            versions.append(metadata.version(dist))
        except metadata.PackageNotFoundError:
            versions.append("-")
    key = hashlib.sha256("|".join([sys.prefix, *versions]).encode()).hexdigest()[:10]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
    env["TORCH_EXTENSIONS_DIR"] = str(base / f"megadrp-{key}")
    return env["TORCH_EXTENSIONS_DIR"]


def extensions_root() -> Path:
    """Where torch builds JIT extensions: TORCH_EXTENSIONS_DIR, else its default cache dir."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as \040 \011 \012 \134
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def fs_type(path: Path, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The file-system type of the mount holding `path` (longest mount-point prefix), or
    None where /proc/self/mountinfo cannot be read."""
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, best_len = None, -1
    for line in lines:
        pre, sep, post = line.partition(" - ")
        fields = pre.split()
        if not sep or len(fields) < 5 or not post:
            continue
        mount = _unescape(fields[4])
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > best_len:
            best, best_len = post.split()[0], len(mount)
    return best


def find_locks(root: Path) -> list[Path]:
    """torch's build locks under `root`: <root>/<op>/lock, and <root>/<py_cu>/<op>/lock, the
    layout torch uses under TORCH_EXTENSIONS_DIR or its cache dir."""
    if not root.is_dir():
        return []
    return sorted(p for pattern in ("*/lock", "*/*/lock") for p in root.glob(pattern) if p.is_file())


def examine(path: Path, now: float | None = None) -> BuildLock | None:
    """What is known of one lock, or None if it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    pids, verifiable = holders((st.st_dev, st.st_ino), st.st_uid)
    age = max(0.0, (time.time() if now is None else now) - st.st_mtime)
    return BuildLock(path, (st.st_dev, st.st_ino, st.st_ctime_ns), age, pids, verifiable, fs_type(path) in LOCAL_FS)


def network_stale_s() -> float:
    raw = os.environ.get("MEGADRP_BUILD_LOCK_STALE_S")
    if not raw:
        return DEFAULT_NETWORK_STALE_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"MEGADRP_BUILD_LOCK_STALE_S={raw!r}: must be a number of seconds") from None
    if value < 0:
        raise ConfigError(f"MEGADRP_BUILD_LOCK_STALE_S={raw!r}: must not be negative")
    return value


def clear_stale(root: Path | None = None, stale_after_s: float | None = None,
                reported: set[Path] | None = None) -> list[Path]:
    """Remove every stale build lock under `root` (default: torch's extensions dir) and name
    each in the log; name a lock a live process has held for over a minute once (in
    `reported`), so a long first build is not mistaken for a hang. Returns what it removed."""
    root = extensions_root() if root is None else root
    limit = network_stale_s() if stale_after_s is None else stale_after_s
    removed = []
    for path in find_locks(root):
        lock = examine(path)
        if lock is None:
            continue
        if not lock.stale(limit):
            if lock.holders and lock.age_s > WAIT_REPORT_S and reported is not None and path not in reported:
                reported.add(path)
                log.info("build lock %s has been held by pid %s for %.0f s: DeepSpeed is building %s (a first "
                         "build takes minutes); the ranks wait for it", path, ",".join(map(str, lock.holders)),
                         lock.age_s, path.parent.name)
            continue
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino, st.st_ctime_ns) != lock.identity:
                continue  # released and taken again since it was inspected: a live lock now
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
        why = ("no process on this host holds it" if lock.verifiable and lock.local_fs else
               f"no process on this host holds it and it is {lock.age_s:.0f} s old, older than any build "
               f"(MEGADRP_BUILD_LOCK_STALE_S={limit:.0f})")
        log.warning("removed the stale build lock %s of DeepSpeed's %s op: %s; a process killed while it "
                    "built or loaded the op left it, and every later load would have waited for it forever",
                    path, path.parent.name, why)
    return removed


@contextmanager
def watch(enabled: bool = True, interval_s: float = 2.0, root: Path | None = None) -> Iterator[None]:
    """Clear stale build locks now and every `interval_s` while the body runs (where DeepSpeed
    loads its ops: `deepspeed.init_distributed`, `deepspeed.initialize`), so a lock left by a
    peer killed a moment ago does not hang this start either. One watcher per node is enough
    (local rank 0); the others' loads go on once the file is gone."""
    if not enabled:
        yield
        return
    root = extensions_root() if root is None else root
    limit = network_stale_s()
    reported: set[Path] = set()
    clear_stale(root, limit, reported)
    done = threading.Event()

    def loop() -> None:
        while not done.wait(interval_s):
            try:
                clear_stale(root, limit, reported)
            except Exception as e:  # a watcher must never take the run down
                log.debug("build lock watcher: %s", e)

    t = threading.Thread(target=loop, name="megadrp-build-locks", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
