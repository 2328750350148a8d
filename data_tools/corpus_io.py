"""Reading domain corpora: .jsonl, .jsonl.gz and .txt (one document a line).

Raw lines are read in the main process (cheap) and parsed where the work is spread
(preprocessing workers), so parsing lives in `parse_line`, which names file and line in
every error.
"""
from __future__ import annotations

import glob
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator


class CorpusError(ValueError):
    """Input that cannot be turned into documents; names file and line."""


@dataclass(frozen=True)
class Document:
    text: str
    path: str
    line: int


def expand_inputs(pattern: str) -> list[Path]:
    """A file, or a glob of files; sorted so the document order is deterministic."""
    p = Path(pattern)
    if p.is_file():
        return [p]
    matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file())
    if not matches:
        raise CorpusError(f"{pattern}: no input file matches; give a .jsonl, .jsonl.gz or .txt file or a glob of them")
    for m in matches:
        kind_of(m)
    return matches


def kind_of(path: Path) -> str:
    name = path.name
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz") or name.endswith(".json"):
        return "jsonl"
    if name.endswith(".txt") or name.endswith(".txt.gz"):
        return "txt"
    raise CorpusError(f"{path}: unsupported file type; use .jsonl, .jsonl.gz or .txt")


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def iter_raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every non-blank line."""
    try:
        with _open(path) as f:
            for i, raw in enumerate(f, 1):
                if raw.strip():
                    yield i, raw
    except (OSError, EOFError) as e:
        raise CorpusError(f"{path}: cannot read ({e})") from e


def parse_line(path: str, line: int, raw: bytes, kind: str, json_key: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}:{line}: bytes that are not UTF-8 at column {e.start + 1}; "
                          "re-encode the file as UTF-8 or pass --skip-bad") from e
    if kind == "txt":
        return text.rstrip("\r\n")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{line}: malformed JSON ({e.msg} at column {e.colno}); "
                          "fix the line or pass --skip-bad") from e
    if not isinstance(obj, dict) or json_key not in obj:
        raise CorpusError(f"{path}:{line}: JSON object has no key {json_key!r}; "
                          "pass --json-key with the key that holds the text")
    value = obj[json_key]
    if not isinstance(value, str):
        raise CorpusError(f"{path}:{line}: key {json_key!r} holds {type(value).__name__}, not a string")
    return value


def iter_documents(path: Path, json_key: str = "text") -> Iterator[Document]:
    kind = kind_of(path)
    for line, raw in iter_raw_lines(path):
        yield Document(parse_line(str(path), line, raw, kind, json_key), str(path), line)
