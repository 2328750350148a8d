"""Files written so that a crash never leaves a torn one, and read so that a bad one is named.

Writes go beside the target, are flushed and fsynced, then renamed over it: a reader or a
crash sees the old file or the new one. A directory is fsynced after a rename in it so the
rename itself survives a power loss. JSON is read in one place, so every malformed file is
reported the same way: its path, the line, and what to do.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from megadrp.errors import DataError, UserError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kw: Any) -> Iterator[IO]:
    """Open `.NAME.tmp` beside `path` for writing; on a clean exit flush, fsync and rename it
    over `path`; on an exception remove it and leave `path` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of a directory (a rename into it) durable. File systems that cannot
    fsync a directory are left as they are."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike, error: type[UserError] = DataError, missing: str | None = None) -> Any:
    """The parsed JSON of `path`. Malformed JSON raises `error` naming the file and line; a
    missing file raises `error` with `missing` (what to do) where given, else FileNotFoundError."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        if missing is None:
            raise
        raise error(f"{p}: not found; {missing}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{p}:{e.lineno}: malformed JSON ({e.msg}); fix the file or write it again") from None


def read_jsonl(path: str | os.PathLike, error: type[UserError] = DataError) -> list[Any]:
    """One JSON value a non-empty line (JSON Lines); a malformed line raises `error` naming the
    file and the line number."""
    p = Path(path)
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise error(f"{p}:{n}: malformed JSON line ({e.msg})") from None
    return out
