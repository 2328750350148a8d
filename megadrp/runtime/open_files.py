"""Which processes on this host have a file open: how megadrp tells a leftover of a killed
process (a build lock, a shared-memory segment) from one a live process still uses."""
from __future__ import annotations

import os


def _mapped_inodes(maps_path: str) -> set[tuple[int, int]]:
    """(major:minor, inode) pairs of the file mappings in one /proc/<pid>/maps, as
    (st_dev, st_ino) so they compare with os.stat."""
    out = set()
    with open(maps_path) as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) < 5 or fields[4] == "0":
                continue
            major, _, minor = fields[3].partition(":")
            out.add((os.makedev(int(major, 16), int(minor, 16)), int(fields[4])))
    return out


def snapshot(owner_uid: int, maps: bool = False, proc: str = "/proc") -> tuple[dict[tuple[int, int], list[int]], bool]:
    """({(st_dev, st_ino): pids on this host that have it open, or mapped when `maps`}, whether
    every process that could have created a file of `owner_uid` was inspected). Only a process
    of the file's owner created it, so another user's process we may not inspect leaves the
    answer known; a process of the owner we may not inspect (we are neither it nor root) does
    not. One pass over /proc, however many files are asked about."""
    me = os.geteuid()
    verifiable = me in (0, owner_uid) and os.path.isdir(proc)
    found: dict[tuple[int, int], list[int]] = {}
    try:
        entries = [e for e in os.scandir(proc) if e.name.isdigit()]
    except OSError:
        return {}, False
    for entry in entries:
        try:
            uid = os.stat(entry.path).st_uid
            fds = os.listdir(os.path.join(entry.path, "fd"))
        except FileNotFoundError:
            continue  # exited meanwhile
        except PermissionError:
            if uid == owner_uid:
                verifiable = False
            continue
        except OSError:
            continue
        held: set[tuple[int, int]] = set()
        if maps:  # a mapping outlives its fd; some sandboxes hide an init's maps even from root
            try:
                held = _mapped_inodes(os.path.join(entry.path, "maps"))
            except (OSError, ValueError):
                pass
        for fd in fds:
            try:
                st = os.stat(os.path.join(entry.path, "fd", fd))
            except OSError:
                continue
            held.add((st.st_dev, st.st_ino))
        for key in held:
            found.setdefault(key, []).append(int(entry.name))
    return found, verifiable


def holders(inode: tuple[int, int], owner_uid: int, maps: bool = False,
            proc: str = "/proc") -> tuple[tuple[int, ...], bool]:
    """(pids on this host with the file `inode` = (st_dev, st_ino) open, or mapped when `maps`;
    whether that answer is complete: see `snapshot`)."""
    found, verifiable = snapshot(owner_uid, maps, proc)
    return tuple(found.get(inode, ())), verifiable
