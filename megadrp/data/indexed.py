"""Megatron-LM indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``): one reader, one writer.

The format is written down here once (SPEC §1) so that every other module talks about
"documents" and "tokens" only. Files we write are readable by
``megatron.core.datasets.indexed_dataset.IndexedDataset`` and we read the files it writes.

``.idx`` layout (all little-endian)::

    9 bytes  magic  b"MMIDIDX\\x00\\x00"
    u64      version (1)
    u8       dtype code (uint16 = 8, int32 = 4, ...)
    u64      sequence count N
    u64      document count D + 1 (the document index starts with a 0)
    i32[N]   sequence lengths (tokens)
    i64[N]   sequence byte offsets into .bin
    i64[D+1] document indices (sequence index where each document starts)

The reader validates every field and the ``.bin`` size before it hands out a single token,
so a truncated or corrupted shard is a clear error naming the file, never an
out-of-bounds read.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

from megadrp.errors import IndexedDatasetError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count

DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE: dict[type, int] = {v: k for k, v in DTYPE_CODES.items()}


def dtype_for_vocab(vocab_size: int) -> type:
    """Megatron's rule: uint16 while every id fits comfortably, else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.uint16 if vocab_size < 65500 else np.int32


def data_file(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def index_file(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


class IndexedDatasetWriter:
    """Streams documents into ``PREFIX.bin.tmp`` / ``PREFIX.idx.tmp``; ``finalize`` renames.

    Only ``finalize`` makes the shard visible, index last, so an interrupted writer never
    leaves a pair of files that looks whole. Memory holds 12 bytes per document, not the
    tokens.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type, vocab_size: int | None = None) -> None:
        if np.dtype(dtype).type not in CODE_OF_DTYPE:
            raise ValueError(f"unsupported token dtype {dtype}")
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.vocab_size = vocab_size
        self._max_id = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = Path(f"{self.prefix}.bin.tmp")
        self._idx_tmp = Path(f"{self.prefix}.idx.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[np.ndarray] = []
        self._pending: list[int] = []
        self.num_tokens = 0
        self.num_docs = 0
        self.max_token_id = -1  # recorded in the manifest: the vocabulary check before training
        self._closed = False

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError("a document is a 1-D sequence of token ids")
        if arr.size and self._max_id is not None:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > self._max_id:
                raise IndexedDatasetError(
                    f"{self._bin_tmp}: token id {hi if hi > self._max_id else lo} does not fit dtype "
                    f"{self.dtype.name}; use int32 shards for vocabularies of 65500 or more"
                )
            self.max_token_id = max(self.max_token_id, hi)
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._pending.append(arr.size)
        if len(self._pending) >= 65536:
            self._flush_lengths()
        self.num_tokens += int(arr.size)
        self.num_docs += 1

    def _flush_lengths(self) -> None:
        if self._pending:
            self._lengths.append(np.asarray(self._pending, dtype=np.int32))
            self._pending = []

    def finalize(self) -> None:
        """Write the index, fsync both files, then rename them into place (bin first)."""
        if self._closed:
            return
        self._flush_lengths()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        write_index(self._idx_tmp, lengths, self.dtype)
        os.replace(self._bin_tmp, data_file(self.prefix))
        os.replace(self._idx_tmp, index_file(self.prefix))
        self._closed = True

    def abort(self) -> None:
        """Drop the temporary files (used when preprocessing fails). Never raises: it runs
        while another error (often a full disk, which makes closing the buffered file fail
        again) is on its way out, and must not replace it or leave a ``.tmp`` behind."""
        try:
            if not self._bin.closed:
                self._bin.close()
        except OSError:
            pass
        for p in (self._bin_tmp, self._idx_tmp):
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass
        self._closed = True


def write_index(path: Path, lengths: np.ndarray, dtype: np.dtype) -> None:
    """One sequence per document: document indices are 0..N."""
    n = len(lengths)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    doc_idx = np.arange(n + 1, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[np.dtype(dtype).type], n, n + 1))
        f.write(lengths.astype(np.int32).tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_idx.tobytes(order="C"))
        f.flush()
        os.fsync(f.fileno())


class IndexedDataset:
    """Memory-mapped, validated reader for a ``.bin``/``.idx`` pair (ours or Megatron's)."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: int | None = None) -> None:
        """`vocab_size`: the model's; every window read is checked against it (a max over a
        few thousand ids, nothing beside a training step), so shards made with another
        tokenizer fail with the shard's name, not an IndexError deep in the embedding (a
        device-side assert on GPU)."""
        self.prefix = Path(prefix)
        self.vocab_size = vocab_size
        idx_path, bin_path = index_file(prefix), data_file(prefix)
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise IndexedDatasetError(f"{p}: shard file not found; run `megadrp preprocess` to create it")
        idx_size = idx_path.stat().st_size
        if idx_size < _HEADER.size:
            raise IndexedDatasetError(f"{idx_path}: index is {idx_size} bytes, shorter than its header; the file is truncated, re-run preprocessing")
        with open(idx_path, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise IndexedDatasetError(f"{idx_path}: wrong magic {magic!r} (expected {MAGIC!r}); not a Megatron indexed dataset")
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + 12 * n_seq + 8 * n_doc
        # Megatron's multimodal variant appends one int8 mode per sequence; accept it.
        if idx_size not in (expected, expected + n_seq) or n_doc < 1:
            raise IndexedDatasetError(
                f"{idx_path}: header says {n_seq} sequences and {n_doc} document entries "
                f"({expected} bytes) but the file has {idx_size} bytes; the index is corrupt or truncated"
            )
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        off = _HEADER.size
        self.lengths = np.frombuffer(idx, dtype=np.int32, count=n_seq, offset=off)
        off += 4 * n_seq
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=n_seq, offset=off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=n_doc, offset=off)
        self._validate(idx_path, bin_path)
        self.num_tokens = int(self.lengths.sum(dtype=np.int64))
        self.tokens = (
            np.memmap(bin_path, dtype=self.dtype, mode="r") if self.num_tokens else np.zeros(0, self.dtype)
        )

    def _validate(self, idx_path: Path, bin_path: Path) -> None:
        n = len(self.lengths)
        if n and int(self.lengths.min()) < 0:
            raise IndexedDatasetError(f"{idx_path}: negative sequence length; the index is corrupt")
        itemsize = self.dtype.itemsize
        ends = self.pointers.astype(np.int64) + self.lengths.astype(np.int64) * itemsize
        total = int(self.lengths.sum(dtype=np.int64)) * itemsize
        if n:
            contiguous = self.pointers[0] == 0 and np.array_equal(self.pointers[1:], ends[:-1])
            if not contiguous:
                raise IndexedDatasetError(f"{idx_path}: sequence pointers are not contiguous; the index is corrupt")
        bin_size = bin_path.stat().st_size
        if bin_size != total:
            raise IndexedDatasetError(
                f"{bin_path}: {bin_size} bytes but its index describes {total} bytes "
                f"({total // itemsize} {self.dtype.name} tokens); the data file is truncated or does not belong to this index"
            )
        d = self.document_indices
        if d[0] != 0 or d[-1] != n or (len(d) > 1 and bool(np.any(np.diff(d) < 0))):
            raise IndexedDatasetError(f"{idx_path}: document index must rise from 0 to {n}; the index is corrupt")

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({len(self)} sequences)")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.lengths[i])])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the concatenated stream, as int64."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"window [{start}, {start + length}) outside {self.prefix} ({self.num_tokens} tokens)")
        out = np.asarray(self.tokens[start : start + length], dtype=np.int64)
        if self.vocab_size is not None and out.size:
            hi, lo = int(out.max()), int(out.min())
            if hi < self.vocab_size and lo >= 0:
                return out
            bad = hi if hi >= self.vocab_size else lo
            raise IndexedDatasetError(
                f"{data_file(self.prefix)}: token id {bad} near token {start} is outside the model's vocabulary "
                f"of {self.vocab_size}; the shards were made with another tokenizer: re-run "
                "`megadrp preprocess` with the model's tokenizer")
        return out
