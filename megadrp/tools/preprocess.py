"""Domain corpora → Megatron indexed shards (train + eval per domain) + manifest.json.

    megadrp preprocess --input NAME=PATH [--input NAME=PATH ...] \\
        --tokenizer DIR --out DATA_DIR [--workers N] [--eval-docs N] [--test-docs N] [--json-key text] \\
        [--overwrite] [--skip-bad] [--seed N] [--max-doc-bytes 16MiB]

PATH is a file or a glob of .jsonl / .jsonl.gz / .jsonl.zst / .txt / .parquet files
(--json-key names the JSON key, or the parquet column, that holds the text). NAME is the
domain's name and the start of its shard files: letters, digits, '_', '.', '-'.
Streaming: the main process reads raw lines (parquet: rows, one row group at a time) and
writes shards; N worker processes parse and tokenize chunks in order, so the output is
identical for any N and memory does not grow with the corpus.

Hold-outs: --eval-docs documents per domain, chosen by a seeded draw over the
domain's non-blank lines and parquet rows (a cheap first pass counts them; parquet
files from their metadata), so the split is deterministic
and not biased toward the start of the corpus. --test-docs draws a third, disjoint set
from the documents left (a draw of its own, so the eval split is the same with or
without it): the test split, which results are reported on and no training run opens.
The eval split is what a run evaluates and its domain schedule steers by; a result
scored there is scored on its own feedback.

Validate, then build beside, then swap: every usage error (names, tokenizer, inputs,
corrupt compressed files, --eval-docs against the corpus, DATA_DIR) is found before
anything is written. The new DATA_DIR is built in a hidden sibling folder
(`.NAME.XXXX.preprocess-tmp`, same filesystem) and takes DATA_DIR's place only when
complete, so an error, a full disk or Ctrl-C leaves an existing DATA_DIR byte-identical and
no temporary files. Every user error exits 2 with one line; SIGINT exits 130, SIGTERM 143.

Huge documents: a line (or parquet cell) above --max-doc-bytes is refused by file:line
(skipped and counted with --skip-bad) and never held whole in memory; documents above
PIECE_CHARS characters are tokenized in pieces, so raising the cap does not raise memory
with the document (docs/reliability.md has the figures).
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import faulthandler
import hashlib
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from megadrp.data.corpus_io import (
    MAX_DOC_BYTES,
    Raw,
    count_records,
    expand_inputs,
    iter_raw_lines,
    kind_of,
    parse_line,
    where,
)
from megadrp.data.indexed import IndexedDatasetWriter, dtype_for_vocab
from megadrp.data.manifest import MANIFEST, SPLITS, write_manifest
from megadrp.data.tokenizer import Tokenizer, fingerprint, load_tokenizer
from megadrp.errors import CorpusError, PreprocessError, TokenizerError
from megadrp.runtime.files import fsync_dir

log = logging.getLogger("megadrp.preprocess")
CHUNK = 256  # lines per worker task: large enough to amortise IPC, small enough to stream
CHUNK_BYTES = 4 << 20  # ... and at most this many bytes of raw text (one longer line alone)
PIECE_CHARS = 1 << 18  # documents longer than this are tokenized in pieces of at most this
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
NAME_MAX = 128  # leaves room for "_train.bin.tmp" and the staging prefix in a 255-byte file name
STAGE_SUFFIX = ".preprocess-tmp"  # hidden sibling the new DATA_DIR is built in
OLD_SUFFIX = ".preprocess-old"  # hidden sibling the old DATA_DIR waits in before deletion
# What preprocess writes into a DATA_DIR: --overwrite replaces a folder only if it holds
# nothing else, so `--out ~ --overwrite` cannot delete a home directory.
OURS_RE = re.compile(r"(manifest\.json|\.manifest\.json\.tmp|tokenizer|\.tokenizer\.tmp"
                     r"|[A-Za-z0-9_.-]+_(train|eval)\.(bin|idx)(\.tmp)?)")
EXIT_USAGE = 2


class Interrupted(BaseException):
    """SIGINT or SIGTERM: a BaseException so that no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.note = "nothing was written"


@dataclass
class _SignalState:
    """While `defer` is set (the swap, the cleanup), a signal is recorded, not raised: a
    half-done swap or a half-done cleanup would be exactly what the signal must not leave."""

    defer: bool = False
    pending: int | None = None


_SIGNALS = _SignalState()


def _on_signal(signum: int, _frame: object) -> None:
    if _SIGNALS.defer:
        _SIGNALS.pending = _SIGNALS.pending or signum
        return
    raise Interrupted(signum)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    before = _SIGNALS.defer
    _SIGNALS.defer = True
    try:
        yield
    finally:
        _SIGNALS.defer = before


def _raise_pending() -> None:
    """Deliver a signal that waited in `_signals_deferred` (when work may still stop)."""
    if _SIGNALS.pending and not _SIGNALS.defer:
        signum, _SIGNALS.pending = _SIGNALS.pending, None
        raise Interrupted(signum)


@dataclass
class Chunk:
    path: str
    kind: str
    lines: list[tuple[int, Raw]]  # (line or parquet row, raw record)


@dataclass
class _Encoded:
    """A chunk's documents back to back (each with its end-of-document id, already in the
    shard dtype: one buffer to pickle, not one per document), their lengths (-1 for a bad
    line skipped with --skip-bad), the skip reasons and notes for the log."""

    flat: np.ndarray
    lengths: np.ndarray
    bad: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_TOK: Tokenizer | None = None
_ARGS: tuple[str, bool, int, type, bool] = ("text", False, 0, np.int32, False)


def _init_worker(tokenizer_dir: str, json_key: str, skip_bad: bool, eod: int, dtype: type,
                 pieces: bool) -> None:
    """Workers leave signals to the main process: Ctrl-C reaches the whole process group,
    and a worker's KeyboardInterrupt would only print a traceback; SIGTERM (how the pool
    stops them) kills. The main process forks them with both signals blocked (see
    `_start_pool`), so nothing arrives before these handlers are set."""
    global _TOK, _ARGS
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    _TOK = load_tokenizer(tokenizer_dir)
    _ARGS = (json_key, skip_bad, eod, dtype, pieces)


def _piece_cuts(text: str, size: int = PIECE_CHARS) -> Iterator[tuple[int, int, bool]]:
    """(start, end, exact) of consecutive pieces of at most `size` characters. A cut is put
    before a single space between two non-space characters, in the second half of the
    window, where a SentencePiece (Metaspace) or byte-level BPE tokenizer starts a new
    pre-token anyway, so the pieces' ids are the whole text's ids (`_piece_safe` checks
    the tokenizer agrees). A window with no such space (DNA, a base64 blob) is cut where it
    ends: `exact` is False, and the ids at that cut may differ from whole-text encoding."""
    start, n = 0, len(text)
    while n - start > size:
        lo, j, cut = start + size // 2, start + size, -1
        while (j := text.rfind(" ", lo, j)) > lo:
            if not text[j - 1].isspace() and not text[j + 1].isspace():
                cut = j
                break
        yield (start, cut, True) if cut > 0 else (start, start + size, False)
        start = cut if cut > 0 else start + size
    yield start, n, True


PROBE = ("Hello world, this is a test of 12345 numbers and x=y+1; done.",
         "def f(x):\n    return x + 1  # tab\tand  two  spaces here",
         "Привет мир, это проверка. 中文 文本 混合 text with émigré café naïve.",
         "ACGTTGCA ACGT 3.14159 a b c (x) [y] {z} ‘quoted’ — dash … end")


def _piece_safe(tok: Tokenizer) -> bool:
    """Whether encoding at every `_piece_cuts` cut point of some sample text gives the
    ids of the whole text: true for SentencePiece-Metaspace and byte-level BPE tokenizers
    (the ones megadrp targets), false for one that adds a prefix space to every call, say.
    A tokenizer that fails is given documents whole (the --max-doc-bytes cap bounds them)."""
    for text in PROBE:
        whole = tok.encode_batch([text])[0]
        cuts = [j for j in range(1, len(text) - 1)
                if text[j] == " " and not text[j - 1].isspace() and not text[j + 1].isspace()]
        parts = [text[:j] for j in cuts] + [text[j:] for j in cuts]
        enc = tok.encode_batch(parts)
        for k in range(len(cuts)):
            if enc[k] + enc[len(cuts) + k] != whole:
                return False
    return True


def _as_shard(ids: list[int], path: str) -> np.ndarray:
    """Token ids in the shard dtype, checked to fit it (cast at once: a huge document's ids
    are not held as int64 while the rest of it is encoded)."""
    dtype = _ARGS[3]
    a = np.asarray(ids, dtype=np.int64)
    if a.size and int(a.max()) > np.iinfo(dtype).max:
        raise CorpusError(f"{path}: token id {int(a.max())} does not fit the shard dtype "
                          f"{np.dtype(dtype).name}; the tokenizer's vocabulary is larger than it reports")
    return a.astype(dtype)


def _encode_doc(text: str, path: str, at: str) -> tuple[list[np.ndarray], str | None]:
    """A document above PIECE_CHARS, piece by piece: the tokenizer's working memory (about
    100 bytes a character for one BPE "word") is that of one piece, not of the document."""
    assert _TOK is not None
    out, inexact = [], 0
    for start, end, exact in _piece_cuts(text, PIECE_CHARS):
        out.append(_as_shard(_TOK.encode_batch([text[start:end]])[0], path))
        inexact += not exact
    note = (f"{at}: {inexact} piece cut(s) of a {len(text):,}-character document fell inside "
            f"a run of {PIECE_CHARS // 2:,}+ characters without a space; ids there may differ from "
            "encoding it whole") if inexact else None
    return out, note


def _encode_chunk(chunk: Chunk) -> _Encoded:
    """Parse and tokenize one chunk (in a worker)."""
    json_key, skip_bad, eod, dtype, pieces = _ARGS
    assert _TOK is not None
    texts: list[str] = []
    lengths = np.full(len(chunk.lines), -1, dtype=np.int64)
    good_rows: list[int] = []
    result = _Encoded(np.zeros(0, dtype), lengths)
    for row, (line, raw) in enumerate(chunk.lines):
        try:
            texts.append(parse_line(chunk.path, line, raw, chunk.kind, json_key))
            good_rows.append(row)
        except CorpusError as e:
            if not skip_bad:
                raise
            result.bad.append(str(e))
        chunk.lines[row] = (line, None)  # the raw bytes are parsed: do not hold a huge line twice
    docs: list[list[np.ndarray]] = [[] for _ in texts]
    short = [k for k, t in enumerate(texts) if not pieces or len(t) <= PIECE_CHARS]
    for k, ids in zip(short, _TOK.encode_batch([texts[k] for k in short]) if short else []):
        docs[k] = [_as_shard(ids, chunk.path)]
    for k in sorted(set(range(len(texts))) - set(short)):
        at = where(chunk.path, chunk.lines[good_rows[k]][0], chunk.kind)
        docs[k], note = _encode_doc(texts[k], chunk.path, at)
        texts[k] = ""  # the parsed text is no longer needed: free it before the next one
        if note:
            result.notes.append(note)
    end = np.full(1, eod, dtype=dtype)
    parts = [a for d in docs for a in (*d, end)]
    if parts:
        result.flat = np.concatenate(parts)
    for row, d in zip(good_rows, docs):
        lengths[row] = sum(a.size for a in d) + 1
    return result


def _raw_size(raw: Raw) -> int:
    return len(raw) if isinstance(raw, (bytes, str)) else 0


def _chunks(files: list[Path], json_key: str, max_doc_bytes: int) -> Iterator[Chunk]:
    """Tasks of at most CHUNK lines and CHUNK_BYTES bytes (a longer line goes alone), so
    that what waits in the pool's pipes stays small whatever the documents' sizes."""
    for path in files:
        kind = kind_of(path)
        buf: list[tuple[int, Raw]] = []
        size = 0
        for item in iter_raw_lines(path, json_key, max_doc_bytes):
            n = _raw_size(item[1])
            if buf and size + n > CHUNK_BYTES:
                yield Chunk(str(path), kind, buf)
                buf, size = [], 0
            buf.append(item)
            size += n
            if len(buf) == CHUNK:
                yield Chunk(str(path), kind, buf)
                buf, size = [], 0
        if buf:
            yield Chunk(str(path), kind, buf)


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(":".join(map(str, key)).encode()).digest()[:8], "little"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _eval_ordinals(name: str, n_docs: int, eval_docs: int, seed: int) -> np.ndarray:
    return np.sort(_rng(seed, name).choice(n_docs, size=eval_docs, replace=False))


def holdout_splits(name: str, n_docs: int, eval_docs: int, test_docs: int, seed: int) -> dict[int, str]:
    """Ordinal → 'eval' or 'test' for a domain's held-out documents (the rest train). The test
    draw comes from its own stream over what the eval draw left, so adding a test split leaves
    the eval split as it was, and no document is in two splits."""
    held = {int(i): "eval" for i in _eval_ordinals(name, n_docs, eval_docs, seed)}
    if test_docs:
        rest = np.setdiff1d(np.arange(n_docs), np.fromiter(held, dtype=np.int64), assume_unique=True)
        held.update((int(i), "test") for i in _rng(seed, name, "test").choice(rest, size=test_docs, replace=False))
    return held


def check_domain_name(name: str, spec: str | None = None) -> str:
    """A domain's name becomes the start of its shard files, so it must be a plain file
    name: a '/', '..' or an absolute path would write outside DATA_DIR."""
    flag = f"--input {spec!r}" if spec is not None else f"domain {name!r}"
    if not name:
        raise PreprocessError(f"{flag}: empty domain name; use NAME=PATH, NAME of letters, digits, '_', '.', '-'")
    if name in (".", "..") or not NAME_RE.fullmatch(name):
        raise PreprocessError(f"{flag}: domain name {name!r} is not a plain name; use letters, digits, "
                              "'_', '.', '-' (not '/', not '.' or '..')")
    if len(name) > NAME_MAX:
        raise PreprocessError(f"{flag}: domain name is {len(name)} characters; use at most {NAME_MAX}")
    return name


def parse_inputs(specs: list[str]) -> dict[str, list[Path]]:
    """`--input NAME=GLOB` values → {name: files}; every name is checked before any glob
    is expanded, so a bad name is reported even when its files are missing."""
    pairs: list[tuple[str, str, str]] = []
    seen: dict[str, str] = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not sep or not pattern:
            raise PreprocessError(f"--input {spec!r}: expected NAME=PATH (for example web=data/web/*.jsonl)")
        check_domain_name(name, spec)
        if name.lower() in seen:  # case-insensitive filesystems would merge their files
            raise PreprocessError(f"--input {spec!r}: domain {name!r} given twice"
                                  + ("" if seen[name.lower()] == name else f" (as {seen[name.lower()]!r})"))
        seen[name.lower()] = name
        pairs.append((spec, name, pattern))
    return {name: expand_inputs(pattern) for _, name, pattern in pairs}


def parse_size(text: str) -> int:
    """'16MiB', '64M', '1G', '1048576' → bytes (K, M, G are binary)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive size such as 16MiB, 500K or 1048576")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def _inside(root: Path, path: Path) -> Path:
    """`path` itself, once proven to resolve inside `root` (symlinks followed): every file
    preprocess writes goes through here first."""
    r, p = root.resolve(), path.resolve()
    if p == r or r not in p.parents:
        raise PreprocessError(f"{path}: would be written outside {root}; refusing (check the domain names)")
    return path


def _why(e: OSError) -> str:
    """What an OSError means for the user, and what to do."""
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what}: free some space or choose --out on another filesystem"
    if e.errno == errno.EFBIG:
        return f"{what}: a file hit the size limit (ulimit -f, or the filesystem's); raise it or choose another --out"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}: choose a writable --out"
    return what


def _writable(path: Path) -> str | None:
    """None if files can be created and deleted in `path`; else why not."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError as e:
        return e.strerror or str(e)
    return None if os.access(path, os.W_OK | os.X_OK) else "permission denied"


def check_out(out: Path, overwrite: bool) -> Path:
    """The folder DATA_DIR will be, resolved (a symlinked DATA_DIR is replaced where it
    points), after every check that needs no write: not a file, not a folder of other
    things, not existing without --overwrite, a writable place to build beside it."""
    target = out.resolve()
    if target.parent == target:
        raise PreprocessError(f"--out {out}: is a filesystem root; give a folder to create")
    if target.exists():
        if not target.is_dir():
            raise PreprocessError(f"--out {out}: exists and is not a directory; give a folder path for DATA_DIR")
        entries = sorted(target.iterdir())
        if entries and not overwrite:
            raise FileExistsError(f"{out}: already exists; pass --overwrite to replace its shards")
        foreign = [e.name for e in entries if not OURS_RE.fullmatch(e.name)]
        if foreign:
            raise PreprocessError(f"--out {out}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                                  "which preprocess did not write; --overwrite replaces the whole folder, so "
                                  "choose another --out or move them")
        for d in [target, *(e for e in entries if e.is_dir() and not e.is_symlink())]:
            if (why := _writable(d)) is not None:
                raise PreprocessError(f"--out {out}: {d} cannot be changed ({why}); choose a writable --out")
    anchor = target.parent
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise PreprocessError(f"--out {out}: {anchor} is a file, not a directory; give a folder path for DATA_DIR")
    if (why := _writable(anchor)) is not None:
        raise PreprocessError(f"--out {out}: cannot create files in {anchor} ({why}); choose a writable --out")
    return target


def _leftovers(target: Path) -> list[Path]:
    """Siblings an earlier run on this --out left (only SIGKILL leaves one). mkdtemp's part is
    8 characters, so domain `a`'s pattern does not take `a.b`'s (a Slurm array runs both)."""
    return sorted(p for suffix in (STAGE_SUFFIX, OLD_SUFFIX)
                  for p in target.parent.glob(f".{_glob_escape(target.name)}.{'?' * 8}{suffix}"))


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _remove_tree(path: Path | None) -> list[str]:
    """Delete a folder we made; never raises (this runs while another error is on its way
    out), returns what could not be removed."""
    failed: list[str] = []
    if path is None or not os.path.lexists(path):
        return failed

    def onerror(_fn: object, p: str, exc: tuple) -> None:
        failed.append(f"{p} ({exc[1].strerror if isinstance(exc[1], OSError) else exc[1]})")

    try:
        shutil.rmtree(path, onerror=onerror)
    except Exception as e:  # noqa: BLE001 - cleanup must not raise
        failed.append(f"{path} ({e})")
    return failed


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE), so DATA_DIR never
    disappears, even for a moment. False where the call or the filesystem lacks it."""
    if sys.platform != "linux":
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(stage: Path, target: Path) -> Path | None:
    """Put the finished `stage` at `target`; returns where the old DATA_DIR now is (to be
    deleted), None if there was none. Without an atomic exchange: old aside, new in, and
    on a failure of the second rename the old one back."""
    if not os.path.lexists(target):
        os.rename(stage, target)
        return None
    if _exchange(stage, target):
        return stage
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=OLD_SUFFIX, dir=target.parent))
    os.rename(target, old)  # a folder may be renamed over an empty one (POSIX): no window for a name clash
    try:
        os.rename(stage, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


def _stop_pool(pool, timeout: float = 15.0) -> None:
    """Stops the workers of an interrupted run, in bounded time. `Pool.terminate()` can block for
    ever: a task handler that passed its last state check before the stop may write a large task
    (several documents) into the pipe after the workers are gone, and terminate joins it (seen in
    CI: workers dead, a thread in a pipe write, the main thread in the join). A cleanup that never
    ends would leave the hidden folder behind and never exit. So terminate runs in a helper
    thread; past `timeout` every worker left is killed (they only tokenize: nothing of theirs
    needs saving) and the pool is abandoned, its exit-time finalizer cancelled, since it would
    block the same way. The stuck handler is a daemon thread: it does not hold up the exit."""
    t = threading.Thread(target=lambda: (pool.terminate(), pool.join()), name="pool-stop", daemon=True)
    t.start()
    t.join(timeout)
    if not t.is_alive():
        return
    log.warning("the worker pool did not stop in %.0fs; killing its workers", timeout)
    for child in mp.active_children():
        child.kill()
        child.join(5)
    finalizer = getattr(pool, "_terminate", None)
    if finalizer is not None and hasattr(finalizer, "cancel"):
        finalizer.cancel()


def _start_pool(workers: int, initargs: tuple):
    """A pool forked with SIGINT and SIGTERM blocked: its workers and its helper threads
    inherit the mask (the workers unblock after setting their own handlers), so no signal
    lands in a half-made worker, and the main thread gets every signal."""
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        return ctx.Pool(max(1, workers), initializer=_init_worker, initargs=initargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class _Progress:
    """One progress bar over all domains: documents/s and tokens/s."""

    def __init__(self, total_docs: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_docs, unit="doc", dynamic_ncols=True, mininterval=1.0,
                        disable=None, file=sys.stderr)
        self.t0 = time.time()
        self.tokens = 0

    def update(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(docs)
        self.bar.set_postfix_str(f"{self.tokens / max(time.time() - self.t0, 1e-9):,.0f} tok/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def preprocess(domains: dict[str, list[Path]], tokenizer_dir: Path, out: Path, workers: int = 1,
               eval_docs: int = 100, json_key: str = "text", overwrite: bool = False,
               skip_bad: bool = False, seed: int = 0, max_doc_bytes: int = MAX_DOC_BYTES,
               test_docs: int = 0) -> dict:
    """Validate everything, build the new DATA_DIR in a hidden sibling, swap it in.

    Nothing at `out` is touched before the swap; any failure or signal before it removes
    the sibling (it is `Interrupted.note` / the error that says so)."""
    # -- 1. validate: nothing is written in this part --------------------------------------
    for name in domains:
        check_domain_name(name)
    target = check_out(Path(out), overwrite)
    tok = load_tokenizer(tokenizer_dir)
    vocab, eod = tok.vocab_size, tok.eod_id
    dtype = dtype_for_vocab(vocab)
    pieces = _piece_safe(tok)
    if not pieces:
        log.warning("%s: encoding in pieces changes this tokenizer's ids; documents are encoded whole "
                    "(memory about 100 bytes per character of the longest, up to --max-doc-bytes)", tokenizer_dir)
    counts = {name: sum(count_records(f, json_key, max_doc_bytes, refuse_oversized=not skip_bad) for f in files)
              for name, files in domains.items()}
    for name, n in counts.items():
        if n == 0:
            raise CorpusError(f"domain {name!r} ({', '.join(map(str, domains[name]))}): no documents; "
                              "check the files or leave the domain out")
        if n <= eval_docs + test_docs:
            held = f"--eval-docs={eval_docs}" + (f" + --test-docs={test_docs}" if test_docs else "")
            raise CorpusError(f"domain {name!r}: {n} documents, need more than {held} "
                              f"(lower {'them' if test_docs else '--eval-docs'} or add data)")
    for p in _leftovers(target):
        log.warning("%s: left by an earlier preprocess that was killed; delete it when no preprocess runs", p)

    # -- 2. build beside ---------------------------------------------------------------------
    splits = ("train", "eval", "test") if test_docs else ("train", "eval")
    manifest: dict = {"tokenizer": "tokenizer", "vocab_size": vocab, "eod_id": eod,
                      "dtype": np.dtype(dtype).name, "domains": {},
                      "holdout": {"seed": seed, "eval_docs": eval_docs, "test_docs": test_docs},
                      "tokenizer_fingerprint": fingerprint(tok.hf)}
    stage: Path | None = None
    pool = progress = None
    writers: dict[str, IndexedDatasetWriter] = {}
    committed = False
    made = [d for d in (target.parent, *target.parent.parents) if not d.exists()]  # removed again on failure
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _signals_deferred():  # the folder exists only once `stage` names it, for the cleanup
            stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=STAGE_SUFFIX, dir=target.parent))
            os.chmod(stage, 0o777 & ~_umask())  # mkdtemp's 0700 would lock a shared cluster's teammates out
        _raise_pending()
        progress = _Progress(sum(counts.values()))
        with _signals_deferred():  # likewise the pool: `pool` must name it for the cleanup to stop it
            pool = _start_pool(workers, (str(tokenizer_dir), json_key, skip_bad, eod, dtype, pieces))
        _raise_pending()
        skipped_total = 0
        for name, files in domains.items():
            held_out = holdout_splits(name, counts[name], eval_docs, test_docs, seed)
            writers = {s: IndexedDatasetWriter(_inside(stage, stage / f"{name}_{s}"), dtype, vocab)
                       for s in splits}
            stats = {f"{s}_{what}": 0 for s in splits for what in ("tokens", "docs")}
            ordinal = skipped = 0
            for enc in pool.imap(_encode_chunk, _chunks(files, json_key, max_doc_bytes), chunksize=1):
                offset = 0
                for n in enc.lengths.tolist():
                    split = held_out.get(ordinal, "train")
                    ordinal += 1
                    if n < 0:
                        continue
                    writers[split].add_document(enc.flat[offset:offset + n])
                    offset += n
                    stats[f"{split}_tokens"] += n
                    stats[f"{split}_docs"] += 1
                for msg in enc.bad:
                    log.warning("skipped: %s", msg)
                for msg in enc.notes:
                    log.warning("%s", msg)
                skipped += len(enc.bad)
                progress.update(len(enc.lengths), int(enc.flat.size))
            empty = [s for s in splits if stats[f"{s}_docs"] == 0]
            if empty:
                raise CorpusError(f"domain {name!r}: no usable documents left in the {empty[0]} split after "
                                  "skipping bad lines; fix the lines or lower --eval-docs/--test-docs")
            stats["max_token_id"] = max(w.max_token_id for w in writers.values())
            for w in writers.values():
                w.finalize()
            writers = {}
            skipped_total += skipped
            manifest["domains"][name] = {**{s: f"{name}_{s}" for s in splits}, **stats,
                                         "skipped_docs": skipped, "sources": [str(f) for f in files]}
        pool.close()
        pool.join()
        pool = None
        tok.hf.save_pretrained(str(_inside(stage, stage / "tokenizer")))
        manifest["skipped_docs"] = skipped_total
        write_manifest(_inside(stage, stage / MANIFEST).parent, manifest)
        for p in stage.rglob("*"):  # what save_pretrained wrote too: no link out of DATA_DIR
            _inside(stage, p)
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(stage)
        # -- 3. swap in: signals wait until DATA_DIR is the old or the new one, whole --------
        with _signals_deferred():
            old = _swap_in(stage, target)
            stage, committed = None, True
            for failed in _remove_tree(old):
                log.warning("could not delete the replaced DATA_DIR's %s; delete it by hand", failed)
            fsync_dir(target.parent)
    except BaseException as e:
        if committed:  # DATA_DIR is the new one, whole; only the fsync of its parent failed
            raise
        with _signals_deferred():  # a second Ctrl-C must not cut the cleanup short
            for w in writers.values():
                w.abort()
            if pool is not None:
                _stop_pool(pool)
            failed = _remove_tree(stage)
            for d in made:  # deepest first: folders --out needed and this run created
                try:
                    d.rmdir()
                except OSError:
                    break
            gone = "" if stage is None else (
                f"removed the unfinished {stage}" if not failed
                else f"could not remove {', '.join(failed[:3])}: delete it by hand")
            untouched = f"{out} is unchanged" if os.path.lexists(target) else f"{out} was not created"
            if isinstance(e, Interrupted):
                e.note = f"{gone}; {untouched}" if gone else f"nothing was written; {untouched}"
            elif isinstance(e, OSError) and not isinstance(e, FileExistsError):
                at = f", writing {e.filename}" if e.filename else ""
                raise PreprocessError(f"--out {out}: cannot write the new DATA_DIR ({_why(e)}{at}); "
                                      f"{gone + '; ' if gone else ''}{untouched}") from e
        raise
    finally:
        if progress is not None:
            progress.close()
    return manifest


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) if "\n" in str(e) else str(e)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", action="append", required=True, metavar="NAME=PATH",
                    help="a domain and its file or glob; repeat for every domain")
    ap.add_argument("--tokenizer", required=True, type=Path, help="tokenizer directory (Hugging Face format)")
    ap.add_argument("--out", required=True, type=Path, help="DATA_DIR to create")
    ap.add_argument("--workers", type=int, default=1, help="tokenizer worker processes (default 1)")
    ap.add_argument("--eval-docs", type=int, default=100,
                    help="documents held out per domain for the runs' evaluations (default 100)")
    ap.add_argument("--test-docs", type=int, default=0,
                    help="documents held out per domain for reported results, never opened by a run (default 0: "
                    "no test split; `megadrp eval` then scores the eval split and says so)")
    ap.add_argument("--json-key", default="text",
                    help="JSON key (or parquet column) that holds the text (default 'text')")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing DATA_DIR (built beside it, swapped in when complete)")
    ap.add_argument("--skip-bad", action="store_true", help="skip malformed lines, counting them, instead of stopping")
    ap.add_argument("--seed", type=int, default=0, help="seed of the eval hold-out draw")
    ap.add_argument("--max-doc-bytes", type=parse_size, default=MAX_DOC_BYTES, metavar="SIZE",
                    help="refuse (with --skip-bad: skip) a line or cell longer than this (default 16MiB)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")  # not torch's INFO at exit
    log.setLevel(logging.INFO)
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    if args.eval_docs < 1:
        ap.error("--eval-docs must be at least 1")
    if args.test_docs < 0:
        ap.error("--test-docs must be 0 (no test split) or more")
    _SIGNALS.defer, _SIGNALS.pending = False, None
    on_main = threading.current_thread() is threading.main_thread()
    if on_main and hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID`: every thread's stack to stderr, to see a hang
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (OSError, ValueError):  # a stderr without a file descriptor (an in-process caller's capture)
            pass
    before = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if on_main else {}
    t0 = time.time()
    try:
        domains = parse_inputs(args.input)
        manifest = preprocess(domains, args.tokenizer, args.out, args.workers, args.eval_docs,
                              args.json_key, args.overwrite, args.skip_bad, args.seed, args.max_doc_bytes,
                              args.test_docs)
    except Interrupted as e:
        print(f"preprocess: interrupted by {signal.Signals(e.signum).name}; {e.note}", file=sys.stderr)
        return 128 + e.signum
    except (CorpusError, TokenizerError, PreprocessError, ValueError, OSError) as e:
        print(f"preprocess: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    dt = time.time() - t0
    total = sum(d.get(f"{s}_tokens", 0) for d in manifest["domains"].values() for s in SPLITS)
    for name, d in manifest["domains"].items():
        print(f"{name:>14}: " + ", ".join(f"{s} {d[s + '_docs']:,} docs / {d[s + '_tokens']:,} tokens"
                                          for s in SPLITS if s in d)
              + (f", skipped {d['skipped_docs']}" if d["skipped_docs"] else ""))
    print(f"preprocess: wrote {args.out / MANIFEST} ({total:,} tokens, {manifest['dtype']}) in {dt:.1f}s "
          f"({total / max(dt, 1e-9):,.0f} tokens/s)")
    if _SIGNALS.pending:
        print(f"preprocess: {signal.Signals(_SIGNALS.pending).name} arrived while the finished DATA_DIR "
              f"was being put in place; {args.out} is complete", file=sys.stderr)
        return 128 + _SIGNALS.pending
    return 0


if __name__ == "__main__":
    sys.exit(main())
