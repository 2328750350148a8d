"""Reading domain corpora: .jsonl (also .gz, .zst), .txt (also .gz, .zst, one document a
line) and .parquet (one document a row).

The real multilingual and English corpora ship as CulturaX parquet and SlimPajama
`.jsonl.zst`; both are read as streams (zstandard's stream reader; parquet one row group
at a time, only the text column), so memory does not grow with the file.

Raw records are read in the main process (cheap) and parsed where the work is spread
(preprocessing workers), so parsing lives in `parse_line`, which names the file and the
line (or, for parquet, the row) in every error.

Bounded memory: a line is never held whole once it passes `max_doc_bytes` (default
`MAX_DOC_BYTES`, 16 MiB). Reading goes through fixed 1 MiB blocks, and a longer line is
read to its end without being kept; the reader yields an `Oversized` marker in its place,
which `parse_line` refuses by file:line (or preprocess skips with --skip-bad). A file with
no newline at all (a binary blob, a corpus with CR line ends) thus costs 16 MiB, not its size.
"""
from __future__ import annotations

import glob
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Union

from megadrp.errors import CorpusError

FORMATS = ".jsonl, .jsonl.gz, .jsonl.zst, .txt (.gz, .zst) or .parquet"
PARQUET_BATCH = 1024  # rows handed out at a time; pyarrow decodes one row group at a time
MAX_DOC_BYTES = 16 << 20  # default cap on one line / cell (see the module docstring)
READ_BLOCK = 1 << 20  # bytes read (or decompressed) at a time


class Oversized(NamedTuple):
    """Stands for a line or cell longer than the cap, which was read past, not kept."""

    nbytes: int  # its length in bytes (without the newline)
    cap: int  # the cap it exceeded, for the message


# One raw record: the bytes of a line, or a parquet cell (str, bytes for a binary column,
# None for a null, which `parse_line` refuses), or an `Oversized` marker.
Raw = Union[bytes, str, None, Oversized]


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


def _zstd_chunks(path: Path, read_size: int = 64 << 10) -> Iterator[bytes]:
    """Decompressed bytes of a .zst file, frame after frame (a file made by concatenating
    .zst files is several frames). A file that ends inside a frame (a cut download) is an
    error: zstandard's stream reader would just stop there, and the corpus would lose its
    tail without a word. The decompressor cannot cap one call's output, so it is fed 64 KiB
    at a time: text (3-5x) gives blocks of a few hundred KiB; only a file of long runs of
    one byte gives more per call."""
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


def _blocks(path: Path) -> Iterator[bytes]:
    """The file's (decompressed) bytes in blocks of about READ_BLOCK: never a whole line,
    so a line without end costs one block, not its length."""
    if path.name.endswith(".zst"):
        yield from _zstd_chunks(path)
        return
    if path.name.endswith(".gz"):
        # read1: what one compressed read gave, so the lines before a corrupt spot are
        # handed out before its error (the error's "line N" is close to the spot)
        with gzip.open(path, "rb") as g:
            while block := g.read1(READ_BLOCK):
                yield block
        return
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            yield block


def _lines(chunks: Iterator[bytes], cap: int = MAX_DOC_BYTES) -> Iterator[bytes | Oversized]:
    """Lines (with their newline) of a stream of byte chunks; a line longer than `cap`
    bytes (newline not counted) is read to its end without being kept and comes out as
    `Oversized`."""
    rest: list[bytes] = []
    size = 0  # bytes in `rest`, or of the oversized line being skipped
    skipping = False
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            size += end - start
            if skipping or size > cap:
                yield Oversized(size, cap)
            else:
                rest.append(chunk[start:end + 1])
                yield b"".join(rest)
            rest, size, skipping, start = [], 0, False, end + 1
        if start < len(chunk):
            size += len(chunk) - start
            if skipping or size > cap:
                rest, skipping = [], True  # drop what was kept of this line: it is too long
            else:
                rest.append(chunk[start:])
    if skipping:
        yield Oversized(size, cap)
    elif rest:
        yield b"".join(rest)


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    """What a corrupt or truncated .gz / .zst raises while being read: zlib.error (a bad
    deflate block), EOFError (a cut stream), gzip.BadGzipFile (a bad header or CRC),
    zstandard.ZstdError."""
    errors: tuple[type[BaseException], ...] = (zlib.error, EOFError, gzip.BadGzipFile)
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


def count_records(path: Path, column: str = "text", max_doc_bytes: int = MAX_DOC_BYTES,
                  refuse_oversized: bool = False) -> int:
    """Records `iter_raw_lines` will yield: the row count from parquet metadata (no data
    read), otherwise the non-blank lines (a streaming pass, which also finds a corrupt
    compressed file before anything is written). With `refuse_oversized`, the first line
    above `max_doc_bytes` is an error here already, before preprocess writes anything."""
    if kind_of(path) == "parquet":
        return _parquet(path, column).metadata.num_rows
    n = 0
    for line, raw in iter_raw_lines(path, column, max_doc_bytes):
        if refuse_oversized and isinstance(raw, Oversized):
            parse_line(str(path), line, raw, kind_of(path), column)  # raises the refusal
        n += 1
    return n


def iter_raw_lines(path: Path, column: str = "text",
                   max_doc_bytes: int = MAX_DOC_BYTES) -> Iterator[tuple[int, Raw]]:
    """(1-based line number, raw bytes) of every non-blank line; for parquet (1-based row,
    the `column` cell) of every row, so that a row's number is its place in the file. A
    line or cell above `max_doc_bytes` comes as `Oversized` (see the module docstring).

    A read error names the file and the first line not read whole: a corrupt compressed
    file as "corrupt compressed data at line N", anything else as "cannot read". N is where
    reading stopped: decompressors work in blocks, and gzip's checksum is checked only at
    the end, so the damage itself may lie a block (or, for a checksum, anywhere) earlier."""
    if kind_of(path) == "parquet":
        yield from _iter_parquet(path, column, max_doc_bytes)
        return
    i = 0
    try:
        for i, raw in enumerate(_lines(_blocks(path), max_doc_bytes), 1):
            if isinstance(raw, Oversized) or raw.strip():
                yield i, raw
    except _corrupt_errors() as e:
        kind = "zlib.error" if isinstance(e, zlib.error) else type(e).__name__
        raise CorpusError(f"{path}: corrupt compressed data at line {i + 1} (reading stopped there; {kind}: {e}); "
                          "the file is damaged or truncated: re-download or re-create it") from e
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e.strerror or e}); check that the file is readable") from e


def _iter_parquet(path: Path, column: str, max_doc_bytes: int = MAX_DOC_BYTES) -> Iterator[tuple[int, Raw]]:
    import pyarrow as pa
    import pyarrow.compute as pc

    pf = _parquet(path, column)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=[column], use_threads=False):
            col = batch.column(0)
            sizes = pc.binary_length(col).to_pylist()
            for value, size in zip(col.to_pylist(), sizes):
                row += 1
                yield row, (Oversized(size, max_doc_bytes) if size is not None and size > max_doc_bytes
                            else value)
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{path}: cannot read after row {row} ({e})") from e


def parse_line(path: str, line: int, raw: Raw, kind: str, json_key: str) -> str:
    at = where(path, line, kind)
    if isinstance(raw, Oversized):
        raise CorpusError(f"{at}: document of {raw.nbytes:,} bytes is longer than --max-doc-bytes="
                          f"{raw.cap:,}; raise --max-doc-bytes, split the document, or pass --skip-bad")
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
