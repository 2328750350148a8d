"""Reading domain corpora: .jsonl (also .gz, .zst), .txt (also .gz, .zst, one document a
line) and .parquet (one document a row).

The real multilingual and English corpora ship as CulturaX parquet and SlimPajama
`.jsonl.zst`; both are read as streams (zstandard's stream reader; parquet one row group
at a time, only the text column), so memory does not grow with the file.

Raw records are read in the main process (cheap) and parsed where the work is spread
(preprocessing workers), so parsing lives in `parse_line`, which names the file and the
line (or, for parquet, the row) in every error.
"""
from __future__ import annotations

import glob
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

# One raw record: the bytes of a line, or a parquet cell (str, bytes for a binary column,
# None for a null, which `parse_line` refuses).
Raw = Union[bytes, str, None]
FORMATS = ".jsonl, .jsonl.gz, .jsonl.zst, .txt (.gz, .zst) or .parquet"
PARQUET_BATCH = 1024  # rows handed out at a time; pyarrow decodes one row group at a time


class CorpusError(ValueError):
    """Input that cannot be turned into documents; names file and line (or row)."""


@dataclass(frozen=True)
class Document:
    text: str
    path: str
    line: int  # line, or 1-based row for parquet


def expand_inputs(pattern: str) -> list[Path]:
    """A file, or a glob of files; sorted so the document order is deterministic."""
    p = Path(pattern)
    if p.is_file():
        return [p]
    matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file())
    if not matches:
        raise CorpusError(f"{pattern}: no input file matches; give a {FORMATS} file or a glob of them")
    for m in matches:
        kind_of(m)
    return matches


def kind_of(path: Path) -> str:
    name = path.name
    if name.endswith(".parquet"):
        return "parquet"
    for ext in ("", ".gz", ".zst"):
        if name.endswith((".jsonl" + ext, ".json" + ext)):
            return "jsonl"
        if name.endswith(".txt" + ext):
            return "txt"
    raise CorpusError(f"{path}: unsupported file type; use {FORMATS}")


def where(path: str | Path, line: int, kind: str) -> str:
    """`file:line` for line formats, `file:row N` for parquet: what every error starts with."""
    return f"{path}:row {line}" if kind == "parquet" else f"{path}:{line}"


def _zstd_chunks(path: Path, read_size: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed bytes of a .zst file, frame after frame (a file made by concatenating
    .zst files is several frames). A file that ends inside a frame (a cut download) is an
    error: zstandard's stream reader would just stop there, and the corpus would lose its
    tail without a word."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame = dctx.decompressobj(), False
    with open(path, "rb") as fh:
        while data := fh.read(read_size):
            while data:
                out = dobj.decompress(data)
                in_frame = True
                if out:
                    yield out
                if not dobj.eof:
                    break
                data, dobj, in_frame = dobj.unused_data, dctx.decompressobj(), False
    if in_frame:
        raise EOFError("the file ends inside a zstd frame (truncated?)")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines (with their newline) of a stream of byte chunks."""
    rest: list[bytes] = []
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            rest.append(chunk[start:end + 1])
            yield b"".join(rest)
            rest, start = [], end + 1
        if start < len(chunk):
            rest.append(chunk[start:])
    if rest:
        yield b"".join(rest)


def _open_lines(path: Path) -> Iterator[bytes]:
    if path.name.endswith(".zst"):
        yield from _lines(_zstd_chunks(path))
        return
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
        yield from f


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a truncated or corrupt compressed file raises while being read."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _parquet(path: Path, column: str):
    """The open file, checked: the text column exists and holds strings."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise CorpusError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from e
    schema = pf.schema_arrow
    if column not in schema.names:
        raise CorpusError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); "
                          "pass --json-key with the column that holds the text")
    t = schema.field(column).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or getattr(pa.types, "is_string_view", lambda _: False)(t)):
        raise CorpusError(f"{path}: column {column!r} holds {t}, not text; pass --json-key with the column "
                          "that holds the text")
    return pf


def count_records(path: Path, column: str = "text") -> int:
    """Records `iter_raw_lines` will yield: the row count from parquet metadata (no data
    read), otherwise the non-blank lines (a streaming pass)."""
    if kind_of(path) == "parquet":
        return _parquet(path, column).metadata.num_rows
    return sum(1 for _ in iter_raw_lines(path, column))


def iter_raw_lines(path: Path, column: str = "text") -> Iterator[tuple[int, Raw]]:
    """(1-based line number, raw bytes) of every non-blank line; for parquet (1-based row,
    the `column` cell) of every row, so that a row's number is its place in the file."""
    if kind_of(path) == "parquet":
        yield from _iter_parquet(path, column)
        return
    try:
        for i, raw in enumerate(_open_lines(path), 1):
            if raw.strip():
                yield i, raw
    except _read_errors() as e:
        raise CorpusError(f"{path}: cannot read ({e})") from e


def _iter_parquet(path: Path, column: str) -> Iterator[tuple[int, Raw]]:
    import pyarrow as pa

    pf = _parquet(path, column)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=[column], use_threads=False):
            for value in batch.column(0).to_pylist():
                row += 1
                yield row, value
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{path}: cannot read after row {row} ({e})") from e


def parse_line(path: str, line: int, raw: Raw, kind: str, json_key: str) -> str:
    at = where(path, line, kind)
    if kind == "parquet":
        if raw is None:
            raise CorpusError(f"{at}: column {json_key!r} is null; drop the row or pass --skip-bad")
        if isinstance(raw, str):
            return raw
    assert isinstance(raw, bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{at}: bytes that are not UTF-8 at {'byte' if kind == 'parquet' else 'column'} "
                          f"{e.start + 1}; re-encode the file as UTF-8 or pass --skip-bad") from e
    if kind == "txt":
        return text.rstrip("\r\n")
    if kind == "parquet":
        return text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{at}: malformed JSON ({e.msg} at column {e.colno}); "
                          "fix the line or pass --skip-bad") from e
    if not isinstance(obj, dict) or json_key not in obj:
        raise CorpusError(f"{at}: JSON object has no key {json_key!r}; "
                          "pass --json-key with the key that holds the text")
    value = obj[json_key]
    if not isinstance(value, str):
        raise CorpusError(f"{at}: key {json_key!r} holds {type(value).__name__}, not a string")
    return value


def iter_documents(path: Path, json_key: str = "text") -> Iterator[Document]:
    kind = kind_of(path)
    for line, raw in iter_raw_lines(path, json_key):
        yield Document(parse_line(str(path), line, raw, kind, json_key), str(path), line)
