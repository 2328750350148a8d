"""Bad input on the data side (issue #18): names that are not names, usage errors that must
be found before anything is written, filesystem and compression faults, huge documents,
Ctrl-C. Every case checks the exit code, the key words of its one-line message, and that
nothing that was there before changed: a sha256 of every file, and the name of every
folder, under the case's workspace (an existing DATA_DIR, a second DATA_DIR beside it, the
inputs) before and after. The same comparison proves that no temporary file or hidden
staging folder was left behind.

Most cases call `preprocess.main` in this process (the command line, minus the interpreter
start: a case costs a fraction of a second); the signal and file-size-limit cases run the
script as a child process, as a user would.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import PY, ROOT, run

from megadrp.data.corpus_io import Oversized, _lines, count_records
from megadrp.data.manifest import load_manifest
from megadrp.data.tokenizer import load_tokenizer
from megadrp.tools import preprocess as pp

IS_ROOT = os.geteuid() == 0
TEXTS = [f"document {i}: the quick brown fox jumps over {i} lazy dogs" for i in range(12)]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`: files by sha256, folders and links by kind."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _words(n_bytes: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    vocab = np.array("the of and a to in is was for on that with as by it at from this be or".split())
    return " ".join(vocab[rng.integers(0, len(vocab), n_bytes // 3)])[:n_bytes]


def _main(argv: list[str], capsys) -> tuple[int, str]:
    """The command line in this process: (exit code, stderr)."""
    try:
        code = pp.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def golden(tokenizer, tmp_path_factory) -> Path:
    """A complete DATA_DIR, copied into every case's workspace as the one to protect."""
    root = tmp_path_factory.mktemp("golden")
    src = _jsonl(root / "g.jsonl", TEXTS)
    assert pp.main(["--input", f"g={src}", "--tokenizer", str(tokenizer), "--out", str(root / "data"),
                    "--eval-docs", "2"]) == 0
    return root / "data"


@pytest.fixture
def ws(tmp_path, golden) -> Path:
    """The workspace: data/ (an existing DATA_DIR), other/ (a second one, where a name
    with '..' would write), corpus/a.jsonl (a good input)."""
    w = tmp_path / "ws"
    shutil.copytree(golden, w / "data")
    shutil.copytree(golden, w / "other")
    _jsonl(w / "corpus" / "a.jsonl", TEXTS)
    return w


# --- corrupt and odd inputs -----------------------------------------------------------------
LINES = "".join(json.dumps({"text": f"document number {i} " + "lorem ipsum dolor " * (i % 13)}) + "\n"
                for i in range(3000)).encode()


def _gz_corrupt(ws: Path) -> Path:
    b = bytearray(gzip.compress(LINES, mtime=0))
    b[40:60] = b"\xff" * 20  # a broken deflate block: zlib.error
    (f := ws / "corpus" / "c.jsonl.gz").write_bytes(bytes(b))
    return f


def _gz_crc(ws: Path) -> Path:
    b = bytearray(gzip.compress(LINES, mtime=0))
    k = len(b) // 2
    b[k:k + 200] = bytes(range(200))  # still a valid deflate stream, wrong bytes: the CRC fails
    (f := ws / "corpus" / "c.jsonl.gz").write_bytes(bytes(b))
    return f


def _gz_truncated(ws: Path) -> Path:
    b = gzip.compress(LINES, mtime=0)
    (f := ws / "corpus" / "c.jsonl.gz").write_bytes(b[: len(b) // 2])
    return f


def _zst_corrupt(ws: Path) -> Path:
    b = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(LINES))  # zstd's CLI default
    b[len(b) // 2:len(b) // 2 + 8] = b"\x00" * 8
    (f := ws / "corpus" / "c.jsonl.zst").write_bytes(bytes(b))
    return f


def _long_line(ws: Path) -> Path:
    return _jsonl(ws / "corpus" / "long.jsonl", TEXTS[:4] + [_words(3000)] + TEXTS[4:])


def _no_newline(ws: Path) -> Path:
    (f := ws / "corpus" / "blob.txt").write_bytes(b"x" * 5000)  # a file without any newline
    return f


def _bad_json_late(ws: Path) -> Path:
    f = _jsonl(ws / "corpus" / "late.jsonl", TEXTS)
    lines = f.read_text().splitlines(keepends=True)
    lines[6] = '{"text": broken\n'
    f.write_text("".join(lines))
    return f


def _parquet_big_cell(ws: Path) -> Path:
    f = ws / "corpus" / "big.parquet"
    pq.write_table(pa.table({"text": TEXTS[:2] + [_words(3000)] + TEXTS[2:]}), f)
    return f


def _blank(ws: Path) -> Path:
    (f := ws / "corpus" / "blank.jsonl").write_text("\n  \n\n")
    return f


def _unreadable(ws: Path) -> Path:
    f = _jsonl(ws / "corpus" / "secret.jsonl", TEXTS)
    f.chmod(0)
    return f


# --- read-only places: chmod for a user, a read-only bind mount for root ---------------------
def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    if not IS_ROOT:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield
        finally:
            for p, m in modes.items():
                p.chmod(m)
        return
    if not _mount("--bind", str(path), str(path)):
        pytest.skip("running as root and cannot bind-mount here: no way to make a read-only folder")
    try:
        if not _mount("-o", "remount,bind,ro", str(path)):
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def _ro_data(ws: Path) -> Path:
    (ro := ws / "ro").mkdir()
    shutil.copytree(ws / "data", ro / "data")
    return ro


# --- the table --------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    argv: Callable[[Path, Path], list]  # (workspace, tokenizer) → arguments
    words: list[str]  # in the message; {ws} is the workspace
    code: int = 2
    setup: Callable[[Path], object] | None = None
    context: Callable[[Path], object] | None = None  # e.g. read_only(ws / "ro")
    skip: str | None = None
    one_line: bool = True
    tags: list[str] = field(default_factory=list)


def _args(inputs: list[str], tok: Path, out: Path, *extra) -> list:
    return [a for spec in inputs for a in ("--input", spec)] + ["--tokenizer", tok, "--out", out,
                                                              "--eval-docs", "2", *extra]


def A(ws: Path) -> str:
    return f"{ws}/corpus/a.jsonl"


CASES = [
    # names are names
    Case("name-escapes-with-dotdot", lambda ws, t: _args([f"../other/a={A(ws)}"], t, ws / "data", "--overwrite"),
         ["--input '../other/a=", "not a plain name", "letters, digits"]),
    Case("name-absolute", lambda ws, t: _args([f"{ws}/other/a={A(ws)}"], t, ws / "data", "--overwrite"),
         ["--input '{ws}/other/a=", "not a plain name"]),
    Case("name-with-slash", lambda ws, t: _args([f"sub/a={A(ws)}"], t, ws / "data", "--overwrite"),
         ["--input 'sub/a=", "not a plain name"]),
    Case("name-dotdot", lambda ws, t: _args([f"..={A(ws)}"], t, ws / "data", "--overwrite"),
         ["--input '..=", "not '.' or '..'"]),
    Case("name-dot", lambda ws, t: _args([f".={A(ws)}"], t, ws / "data", "--overwrite"), ["--input '.=", "not a plain name"]),
    Case("name-empty", lambda ws, t: _args([f"={A(ws)}"], t, ws / "data", "--overwrite"), ["empty domain name"]),
    Case("name-with-space", lambda ws, t: _args([f"my web={A(ws)}"], t, ws / "data", "--overwrite"),
         ["'my web'", "not a plain name"]),
    Case("name-not-ascii", lambda ws, t: _args([f"naïve={A(ws)}"], t, ws / "data", "--overwrite"), ["'naïve'", "not a plain name"]),
    Case("name-too-long", lambda ws, t: _args([f"{'x' * 129}={A(ws)}"], t, ws / "data", "--overwrite"), ["at most 128"]),
    Case("name-twice-other-case", lambda ws, t: _args([f"web={A(ws)}", f"Web={A(ws)}"], t, ws / "data", "--overwrite"),
         ["'Web' given twice (as 'web')"]),
    Case("input-without-name", lambda ws, t: _args([A(ws)], t, ws / "data", "--overwrite"), ["expected NAME=PATH"]),
    # validate everything first
    Case("eval-docs-above-corpus", lambda ws, t: _args([f"a={A(ws)}"], t, ws / "data", "--overwrite", "--eval-docs", "50"),
         ["domain 'a': 12 documents", "--eval-docs=50", "lower --eval-docs"]),
    Case("tokenizer-missing", lambda ws, t: _args([f"a={A(ws)}"], ws / "no-tokenizer", ws / "data", "--overwrite"),
         ["{ws}/no-tokenizer: tokenizer directory not found"]),
    Case("tokenizer-not-a-tokenizer", lambda ws, t: _args([f"a={A(ws)}"], ws / "corpus", ws / "data", "--overwrite"),
         ["{ws}/corpus: cannot load a tokenizer"]),
    Case("glob-matches-nothing", lambda ws, t: _args([f"a={ws}/corpus/*.nothing"], t, ws / "data", "--overwrite"),
         ["no input file matches"]),
    Case("unsupported-file-type", lambda ws, t: _args([f"a={ws}/corpus/a.csv"], t, ws / "data", "--overwrite"),
         ["a.csv: unsupported file type"], setup=lambda ws: (ws / "corpus" / "a.csv").write_text("a,b\n")),
    Case("domain-without-documents", lambda ws, t: _args([f"e={ws}/corpus/blank.jsonl"], t, ws / "data", "--overwrite"),
         ["domain 'e'", "no documents"], setup=_blank),
    Case("unreadable-input", lambda ws, t: _args([f"a={ws}/corpus/secret.jsonl"], t, ws / "data", "--overwrite"),
         ["secret.jsonl: cannot read (Permission denied)"], setup=_unreadable,
         skip="root reads any file" if IS_ROOT else None),
    # the output folder
    Case("out-is-a-file", lambda ws, t: _args([f"a={A(ws)}"], t, ws / "corpus" / "a.jsonl", "--overwrite"),
         ["--out {ws}/corpus/a.jsonl: exists and is not a directory"]),
    Case("out-under-a-file", lambda ws, t: _args([f"a={A(ws)}"], t, ws / "corpus" / "a.jsonl" / "data"),
         ["{ws}/corpus/a.jsonl is a file, not a directory"]),
    Case("out-exists-without-overwrite", lambda ws, t: _args([f"a={A(ws)}"], t, ws / "data"),
         ["{ws}/data: already exists; pass --overwrite"]),
    Case("out-holds-other-files", lambda ws, t: _args([f"a={A(ws)}"], t, ws, "--overwrite"),
         ["--out {ws}: holds corpus, data", "which preprocess did not write", "choose another --out"]),
    Case("out-is-filesystem-root", lambda ws, t: _args([f"a={A(ws)}"], t, Path("/"), "--overwrite"),
         ["--out /: is a filesystem root"]),
    Case("out-read-only-existing", lambda ws, t: _args([f"a={A(ws)}"], t, ws / "ro" / "data", "--overwrite"),
         ["{ws}/ro/data", "choose a writable --out"], setup=_ro_data, context=lambda ws: read_only(ws / "ro")),
    Case("out-read-only-new", lambda ws, t: _args([f"a={A(ws)}"], t, ws / "ro" / "new" / "data"),
         ["cannot create files in {ws}/ro", "choose a writable --out"], setup=_ro_data,
         context=lambda ws: read_only(ws / "ro")),
    # compressed inputs corrupted mid-stream (found by the counting pass, before any write)
    Case("gzip-corrupt-block", lambda ws, t: _args([f"c={ws}/corpus/c.jsonl.gz"], t, ws / "data", "--overwrite"),
         ["c.jsonl.gz: corrupt compressed data at line 1 ", "zlib.error", "re-download"], setup=_gz_corrupt),
    Case("gzip-crc-mismatch", lambda ws, t: _args([f"c={ws}/corpus/c.jsonl.gz"], t, ws / "data", "--overwrite"),
         ["c.jsonl.gz: corrupt compressed data at line ", "CRC check failed"], setup=_gz_crc),
    Case("gzip-truncated", lambda ws, t: _args([f"c={ws}/corpus/c.jsonl.gz"], t, ws / "data", "--overwrite"),
         ["c.jsonl.gz: corrupt compressed data at line ", "EOFError"], setup=_gz_truncated),
    Case("zst-corrupt", lambda ws, t: _args([f"c={ws}/corpus/c.jsonl.zst"], t, ws / "data", "--overwrite"),
         ["c.jsonl.zst: corrupt compressed data at line ", "ZstdError"], setup=_zst_corrupt),
    # huge documents
    Case("line-above-max-doc-bytes", lambda ws, t: _args([f"l={ws}/corpus/long.jsonl"], t, ws / "data", "--overwrite",
                                                         "--max-doc-bytes", "1K"),
         ["long.jsonl:5: document of 3,012 bytes is longer than --max-doc-bytes=1,024", "--skip-bad"], setup=_long_line),
    Case("file-without-newline", lambda ws, t: _args([f"b={ws}/corpus/blob.txt"], t, ws / "data", "--overwrite",
                                                     "--max-doc-bytes", "4K"),
         ["blob.txt:1: document of 5,000 bytes is longer than --max-doc-bytes=4,096"], setup=_no_newline),
    Case("max-doc-bytes-zero", lambda ws, t: _args([f"a={A(ws)}"], t, ws / "data", "--max-doc-bytes", "0"),
         ["--max-doc-bytes", "expected a positive size"], one_line=False),
    # errors found while building: the half-built sibling is removed, DATA_DIR untouched
    Case("malformed-json-while-building", lambda ws, t: _args([f"j={ws}/corpus/late.jsonl"], t, ws / "data", "--overwrite"),
         ["late.jsonl:7: malformed JSON", "--skip-bad"], setup=_bad_json_late),
    Case("malformed-json-while-building-a-new-deep-out",
         lambda ws, t: _args([f"j={ws}/corpus/late.jsonl"], t, ws / "new" / "deep" / "data"),
         ["late.jsonl:7: malformed JSON"], setup=_bad_json_late),  # the folders it made are removed too
    Case("parquet-cell-above-cap-while-building",
         lambda ws, t: _args([f"p={ws}/corpus/big.parquet"], t, ws / "data", "--overwrite", "--max-doc-bytes", "1K"),
         ["big.parquet:row 3: document of 3,000 bytes is longer than --max-doc-bytes=1,024"], setup=_parquet_big_cell),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ws: Path, tokenizer: Path, capsys) -> None:
    if case.skip:
        pytest.skip(case.skip)
    if case.setup:
        case.setup(ws)
    before = snapshot(ws)
    with case.context(ws) if case.context else _nothing():
        code, err = _main(case.argv(ws, tokenizer), capsys)
    assert code == case.code, err
    for w in case.words:
        assert w.format(ws=ws) in err, f"{w.format(ws=ws)!r} not in {err!r}"
    if case.one_line:
        assert len(err.strip().splitlines()) == 1 and err.startswith("preprocess: error: "), err
    assert snapshot(ws) == before, "something in the workspace changed or was left behind"


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def test_the_command_line_exits_2_with_one_line(ws: Path, tokenizer: Path) -> None:
    """The same path through the real script (interpreter exit code, stderr)."""
    before = snapshot(ws)
    p = run([PY, "data_tools/preprocess.py", *map(str, _args([f"../other/a={A(ws)}"], tokenizer, ws / "data",
                                                             "--overwrite"))], check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not a plain name" in p.stderr, p.stderr
    assert snapshot(ws) == before


# --- what must still work ---------------------------------------------------------------------
def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((pp.STAGE_SUFFIX, pp.OLD_SUFFIX)))


def test_overwrite_builds_beside_and_swaps(ws: Path, tokenizer: Path, capsys) -> None:
    """--overwrite replaces DATA_DIR whole (old domains gone, new ones in), through a
    symlink too (the link stays, what it points to is replaced), and leaves no sibling."""
    f = _jsonl(ws / "corpus" / "b.jsonl", [t.upper() for t in TEXTS])
    code, err = _main(_args([f"b={f}"], tokenizer, ws / "data", "--overwrite"), capsys)
    assert code == 0, err
    m = load_manifest(ws / "data")
    assert set(m.domains) == {"b"} and not (ws / "data" / "g_train.bin").exists()
    assert _leftovers(ws) == []
    (ws / "link").symlink_to(ws / "other")
    code, err = _main(_args([f"b={f}"], tokenizer, ws / "link", "--overwrite"), capsys)
    assert code == 0, err
    assert (ws / "link").is_symlink() and set(load_manifest(ws / "other").domains) == {"b"}
    assert _leftovers(ws) == []
    assert snapshot(ws / "data") == snapshot(ws / "other")  # same inputs, same bytes


def test_swap_without_atomic_exchange(ws: Path, monkeypatch) -> None:
    """Where renameat2 is missing: old aside, new in; if the second rename fails, the old
    DATA_DIR is put back as it was."""
    monkeypatch.setattr(pp, "_exchange", lambda a, b: False)
    old_bytes = snapshot(ws / "data")
    stage = ws / ".data.x.preprocess-tmp"
    shutil.copytree(ws / "other", stage)
    (stage / "marker").write_text("new")
    real_rename, calls = os.rename, []

    def failing_second(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(errno.EIO, "injected", str(b))
        real_rename(a, b)

    monkeypatch.setattr(pp.os, "rename", failing_second)
    with pytest.raises(OSError, match="injected"):
        pp._swap_in(stage, ws / "data")
    assert snapshot(ws / "data") == old_bytes and stage.is_dir() and _leftovers(ws) == [stage.name]
    monkeypatch.setattr(pp.os, "rename", real_rename)
    old = pp._swap_in(stage, ws / "data")
    assert (ws / "data" / "marker").read_text() == "new" and old is not None and snapshot(old) == old_bytes


def test_exchange_is_atomic_here(tmp_path: Path) -> None:
    """On Linux filesystems with renameat2 the swap is one atomic call."""
    (a := tmp_path / "a").mkdir()
    (b := tmp_path / "b").mkdir()
    (a / "x").write_text("a")
    if not pp._exchange(a, b):
        pytest.skip("no RENAME_EXCHANGE on this platform or filesystem")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()


def test_oversized_skipped_with_skip_bad(ws: Path, tokenizer: Path, capsys, caplog) -> None:
    f = _long_line(ws)
    code, err = _main(_args([f"l={f}"], tokenizer, ws / "new", "--max-doc-bytes", "1K", "--skip-bad"), capsys)
    assert code == 0, err
    assert json.loads((ws / "new" / "manifest.json").read_text())["skipped_docs"] == 1
    assert f"{f}:5: document of 3,012 bytes" in caplog.text


def test_leftover_of_a_killed_run_is_named_not_deleted(ws: Path, tokenizer: Path, capsys, caplog) -> None:
    (stale := ws / ".data.abc12345.preprocess-tmp").mkdir()
    (ws / ".data.b.abc12345.preprocess-tmp").mkdir()  # domain data.b's, maybe running now: not named
    code, err = _main(_args([f"a={A(ws)}"], tokenizer, ws / "data", "--overwrite"), capsys)
    assert code == 0, err
    assert stale.is_dir() and f"{stale}: left by an earlier preprocess" in caplog.text
    assert caplog.text.count("left by an earlier preprocess") == 1


def test_unreadable_input_for_root_too(ws: Path, tokenizer: Path, capsys, monkeypatch) -> None:
    """The table's unreadable-input case needs a user that permissions stop; this one
    makes the open fail (EACCES) for anyone, root included."""
    from megadrp.data import corpus_io

    def denied(path, *a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(corpus_io, "open", denied, raising=False)
    before = snapshot(ws)
    code, err = _main(_args([f"a={A(ws)}"], tokenizer, ws / "data", "--overwrite"), capsys)
    assert code == 2 and f"{A(ws)}: cannot read (Permission denied); check that the file is readable" in err, err
    assert snapshot(ws) == before


def test_lines_are_bounded() -> None:
    """A line above the cap is read past (whatever the block boundaries), never kept."""
    data = b"ab\n" + b"x" * 10 + b"\n" + b"y" * 8 + b"\n" + b"z" * 25
    for block in (1, 3, 7, 64):
        chunks = [data[i:i + block] for i in range(0, len(data), block)]
        got = list(_lines(iter(chunks), cap=8))
        assert got == [b"ab\n", Oversized(10, 8), b"y" * 8 + b"\n", Oversized(25, 8)], block


def test_count_matches_iteration_with_oversized(tmp_path: Path) -> None:
    f = _long_line(tmp_path)
    assert count_records(f, max_doc_bytes=1024) == 13
    with pytest.raises(ValueError, match=r"long\.jsonl:5: document of 3,012 bytes"):
        count_records(f, max_doc_bytes=1024, refuse_oversized=True)


# --- huge documents: pieces, exactness, memory --------------------------------------------
def test_pieces_give_the_whole_documents_ids(tokenizer: Path, corpus: Path) -> None:
    """Cuts before a single space between non-spaces: the project's tokenizer gives the
    same ids piece by piece as for the whole text (small pieces, so many cuts)."""
    tok = load_tokenizer(tokenizer)
    assert pp._piece_safe(tok)
    texts = [json.loads(ln)["text"] for f in sorted(corpus.glob("*.jsonl")) if f.stem not in ("dna", "records")
             for ln in f.read_text().splitlines()[:15]]  # those two have 1 KiB runs without a space
    text = " ".join(texts)
    cuts = list(pp._piece_cuts(text, 2048))
    assert len(cuts) > 20 and all(exact for _, _, exact in cuts)
    assert "".join(text[a:b] for a, b, _ in cuts) == text
    pieces = tok.encode_batch([text[a:b] for a, b, _ in cuts])
    assert [i for p in pieces for i in p] == tok.encode_batch([text])[0]


def test_text_without_spaces_is_cut_and_said(tokenizer: Path) -> None:
    cuts = list(pp._piece_cuts("ACGT" * 3000, 4096))
    assert [(a, b) for a, b, _ in cuts] == [(0, 4096), (4096, 8192), (8192, 12000)]
    assert [e for _, _, e in cuts] == [False, False, True]


def test_long_documents_in_a_chunk(tokenizer: Path, corpus: Path, monkeypatch) -> None:
    """What a worker does with documents above PIECE_CHARS: prose gives the ids of whole
    encoding; a long run without spaces (DNA) is cut, and the note says where."""
    tok = load_tokenizer(tokenizer)
    monkeypatch.setattr(pp, "_TOK", tok)
    monkeypatch.setattr(pp, "_ARGS", ("text", False, tok.eod_id, np.uint16, True))
    monkeypatch.setattr(pp, "PIECE_CHARS", 4096)
    prose = " ".join(json.loads(ln)["text"] for ln in (corpus / "prose.jsonl").read_text().splitlines()[:40])
    dna = "".join(json.loads(ln)["text"].replace("\n", "") for ln in (corpus / "dna.jsonl").read_text().splitlines()[:30])
    assert len(prose) > 3 * 4096 and len(dna) > 3 * 4096
    lines = [(3, json.dumps({"text": prose}).encode()), (4, b'{"text": "short"}\n'),
             (5, json.dumps({"text": dna}).encode())]
    enc = pp._encode_chunk(pp.Chunk("m.jsonl", "jsonl", lines))
    n = enc.lengths.tolist()
    assert enc.flat[: n[0]].tolist() == tok.encode_batch([prose])[0] + [tok.eod_id]
    assert enc.flat[n[0]: n[0] + n[1]].tolist() == tok.encode_batch(["short"])[0] + [tok.eod_id]
    assert len(enc.notes) == 1 and enc.notes[0].startswith("m.jsonl:5: ") and "without a space" in enc.notes[0]


def test_a_tokenizer_that_is_not_piece_safe_is_detected() -> None:
    class PrefixEveryCall:
        def encode_batch(self, texts: list[str]) -> list[list[int]]:
            return [[1] + [ord(c) for c in t] for t in texts]

    assert not pp._piece_safe(PrefixEveryCall())  # type: ignore[arg-type]


MEMORY_PROBE = """
import json, resource, sys
import numpy as np
from megadrp.tools import preprocess as pp
pp._init_worker(sys.argv[1], "text", False, 2, np.uint16, True)
words = "the of and a to in is was for on that with as by it at from this be or".split()
text = " ".join(words[(i * 7919) % len(words)] for i in range(1_100_000))[:4_000_000]
chunk = pp.Chunk("x.jsonl", "jsonl", [(1, json.dumps({"text": text}).encode())])
del text
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
enc = pp._encode_chunk(chunk)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024, enc.flat.size)
"""


def test_memory_of_a_huge_document_is_bounded(tokenizer: Path) -> None:
    """A 4 MB document costs the worker tens of MiB above its start (its text a few times
    over and one piece's tokenizer state), not the ~120 bytes per character (~480 MiB) of
    encoding it whole; docs/reliability.md has the 50 MB figure."""
    p = run([PY, "-c", MEMORY_PROBE, str(tokenizer)])
    extra_mib, tokens = map(int, p.stdout.split())
    assert tokens > 500_000 and extra_mib < 128, p.stdout


# --- faults in a child process: file-size limit, full disk, signals ---------------------------
def _child(argv: list, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([PY, "data_tools/preprocess.py", *map(str, argv)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _limit_file_size(limit: int) -> Callable[[], None]:
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by SIGXFSZ
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_file_size_limit_mid_write(ws: Path, tokenizer: Path) -> None:
    """RLIMIT_FSIZE (what `ulimit -f` sets; a full disk without root): the shard write
    fails with EFBIG; the cleanup does not raise, no .tmp and no sibling remain, the old
    DATA_DIR is byte-identical."""
    f = _jsonl(ws / "corpus" / "big.jsonl", [_words(2000, i) for i in range(400)])
    before = snapshot(ws)
    p = _child(_args([f"big={f}"], tokenizer, ws / "data", "--overwrite"), preexec_fn=_limit_file_size(64 << 10))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("preprocess: error: ") and "File too large" in line and "size limit" in line, err
    assert "removed the unfinished" in line and f"{ws / 'data'} is unchanged" in line
    assert snapshot(ws) == before


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full(ws: Path, tokenizer: Path, tiny_tmpfs: Path, capsys) -> None:
    """ENOSPC on a 1 MiB tmpfs that holds the old DATA_DIR: same promise as above."""
    shutil.copytree(ws / "data", tiny_tmpfs / "data")
    f = _jsonl(ws / "corpus" / "big.jsonl", [_words(3000, i) for i in range(1000)])
    before = snapshot(tiny_tmpfs)
    code, err = _main(_args([f"big={f}"], tokenizer, tiny_tmpfs / "data", "--overwrite"), capsys)
    assert code == 2 and "No space left on device" in err and "free some space" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert snapshot(tiny_tmpfs) == before


@pytest.mark.parametrize("sig,code,group", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)],
                         ids=["ctrl-c-to-the-process-group", "sigterm-to-the-main-process"])
def test_signal_while_building(ws: Path, tokenizer: Path, sig: int, code: int, group: bool) -> None:
    """A signal while shards are being written (the hidden sibling exists and holds
    bytes): no temporary file or folder remains, the old DATA_DIR is byte-identical, stderr
    says so, exit 128+signal. Ctrl-C reaches the workers too (the whole process group)."""
    f = _jsonl(ws / "corpus" / "big.jsonl", [_words(4000, i) for i in range(2000)])  # 8 MB: seconds of work
    before = snapshot(ws)
    p = _child(_args([f"big={f}"], tokenizer, ws / "data", "--overwrite", "--workers", "2"), start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:
        if any(s.stat().st_size > 0 for s in ws.glob(f".data.*{pp.STAGE_SUFFIX}/big_*.bin.tmp")):
            break
        time.sleep(0.02)
    assert p.poll() is None, "preprocess ended before it could be interrupted"
    (os.killpg if group else os.kill)(p.pid, sig)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # say where it hangs: preprocess dumps its stacks on SIGUSR1
        os.kill(p.pid, signal.SIGUSR1)
        time.sleep(2)
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        pytest.fail(f"preprocess did not exit within 60 s of {signal.Signals(sig).name}; its stacks:\n{err[-8000:]}")
    assert p.returncode == code, err
    line = err.strip().splitlines()[-1]
    assert f"interrupted by {signal.Signals(sig).name}; removed the unfinished" in line, err
    assert f"{ws / 'data'} is unchanged" in line and "Traceback" not in err
    assert snapshot(ws) == before


def test_corpus_files_are_untouched_by_a_good_run(ws: Path, tokenizer: Path, capsys) -> None:
    """The positive twin of the table: with --overwrite on a good input, only data/ changes."""
    before = snapshot(ws)
    code, err = _main(_args([f"a={A(ws)}"], tokenizer, ws / "data", "--overwrite"), capsys)
    assert code == 0, err
    after = snapshot(ws)
    assert {k: v for k, v in after.items() if not k.startswith("data")} == \
        {k: v for k, v in before.items() if not k.startswith("data")}


if sys.platform != "linux":  # pragma: no cover - the suite runs on Linux
    pytestmark = pytest.mark.skip("Linux only (fork, RLIMIT_FSIZE, mounts)")


def test_a_pool_that_will_not_stop_is_left_in_bounded_time(tokenizer: Path) -> None:
    """The interrupted run's cleanup must end. Pool.terminate() can block for ever: a task
    handler that passed its last state check before the stop writes a large task into the pipe
    after the workers are gone, and terminate waits for it (CI met this, the workers dead and the
    main thread in the join). Here terminate stops the workers, then blocks the same way."""
    import multiprocessing as mp

    import numpy as np

    pool = pp._start_pool(2, (str(tokenizer), "text", False, 0, np.int32, False))
    workers = mp.active_children()
    assert len(workers) == 2
    real = pool.terminate
    pool.terminate = lambda: (real(), time.sleep(3600))
    t0 = time.time()
    pp._stop_pool(pool, timeout=0.5)
    assert time.time() - t0 < 15 and not mp.active_children()
    assert all(w.exitcode is not None for w in workers)
