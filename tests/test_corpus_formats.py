"""Corpus formats of the real datasets: CulturaX parquet and SlimPajama .jsonl.zst give
the same shards as the same documents in .jsonl, and bad records are named by file and
line (row for parquet)."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import PY, run

from megadrp.data.corpus_io import count_records, iter_documents
from megadrp.data.manifest import load_manifest
from megadrp.errors import CorpusError

TEXTS = [f"документ {i}: 文本 {i} — text number {i} " + "word " * (i % 7) for i in range(40)]


def _parquet(path, values, column="text", row_group_size=7, type_=None):
    table = pa.table({"id": list(range(len(values))), column: pa.array(values, type=type_)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _zst(path, lines: list[str], frames: int = 1):
    """`frames` > 1 writes concatenated zstd frames (what `cat a.zst b.zst` gives)."""
    data = "".join(lines).encode()
    cut = len(data) // frames
    parts = [data[i * cut:(i + 1) * cut if i < frames - 1 else len(data)] for i in range(frames)]
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(p) for p in parts))
    return path


def _prep(tmp_path, inputs, tokenizer, *extra, out="out", check=False):
    args = [a for name, path in inputs for a in ("--input", f"{name}={path}")]
    return run([PY, "data_tools/preprocess.py", *args, "--tokenizer", str(tokenizer), "--out",
                str(tmp_path / out), "--eval-docs", "4", *extra], check=check)


def test_parquet_and_zst_give_the_jsonl_shards(tmp_path, tokenizer):
    """Same documents in three formats → byte-identical shards (same order, same eval
    hold-out); the parquet file has 6 row groups, the .zst two frames. The .zst run also
    reads a second language from a glob of parquet files (CulturaX ships several per
    language) whose text column, like the .zst key, is named by --json-key."""
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    parquet = _parquet(tmp_path / "a.parquet", TEXTS)
    assert pq.ParquetFile(parquet).num_row_groups == 6
    zst = _zst(tmp_path / "a.jsonl.zst", [json.dumps({"content": t, "meta": {"src": "x"}}) + "\n" for t in TEXTS], 2)
    (tmp_path / "ru").mkdir()
    _parquet(tmp_path / "ru" / "ru_part_00000.parquet", TEXTS[:20], column="content")
    _parquet(tmp_path / "ru" / "ru_part_00001.parquet", TEXTS[20:31], column="content")
    assert count_records(parquet) == count_records(zst) == len(TEXTS)
    assert [d.text for d in iter_documents(parquet)] == [d.text for d in iter_documents(zst, "content")] == TEXTS
    _prep(tmp_path, [("x", jsonl)], tokenizer, out="j", check=True)
    _prep(tmp_path, [("x", parquet)], tokenizer, out="p", check=True)
    p = _prep(tmp_path, [("x", zst), ("ru", f"{tmp_path}/ru/*.parquet")], tokenizer, "--json-key", "content",
              "--workers", "2", out="z", check=True)
    for f in ("x_train.bin", "x_train.idx", "x_eval.bin", "x_eval.idx"):
        ref = (tmp_path / "j" / f).read_bytes()
        assert (tmp_path / "p" / f).read_bytes() == ref and (tmp_path / "z" / f).read_bytes() == ref, f
    m = load_manifest(tmp_path / "z")
    assert m.domains["x"].train_docs + m.domains["x"].eval_docs == len(TEXTS)
    assert m.domains["ru"].train_docs + m.domains["ru"].eval_docs == 31
    assert "tokens/s" in p.stdout


def test_bad_parquet_row_named_and_skippable(tmp_path, tokenizer):
    """A null cell is named file:row; --skip-bad skips and counts it (without it, the
    same message stops the run: see test_format_errors_name_the_file)."""
    values = TEXTS[:12]
    values[8] = None
    f = _parquet(tmp_path / "n.parquet", values)
    p = _prep(tmp_path, [("x", f)], tokenizer, "--skip-bad")
    assert p.returncode == 0, p.stderr
    assert f"{f}:row 9: column 'text' is null" in p.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped_docs"] == 1


def test_format_errors_name_the_file(tmp_path):
    f = _parquet(tmp_path / "a.parquet", TEXTS[:5])
    with pytest.raises(CorpusError, match=r"a\.parquet: no column 'content' \(columns: id, text\); pass --json-key"):
        count_records(f, "content")
    with pytest.raises(CorpusError, match=r"a\.parquet: column 'id' holds int64, not text"):
        list(iter_documents(f, "id"))
    b = _parquet(tmp_path / "b.parquet", [t.encode() for t in TEXTS[:3]] + [b"\xff\xfe"], type_=pa.binary())
    with pytest.raises(CorpusError, match=r"b\.parquet:row 4: bytes that are not UTF-8"):
        list(iter_documents(b))
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match=r"c\.parquet: not a readable parquet file"):
        count_records(tmp_path / "c.parquet")
    z = _zst(tmp_path / "d.jsonl.zst", ['{"text": "a"}\n', "\n", '{"text": broken\n'])
    with pytest.raises(CorpusError, match=r"d\.jsonl\.zst:3: malformed JSON"):
        list(iter_documents(z))
    whole = _zst(tmp_path / "e.jsonl.zst", [json.dumps({"text": t}) + "\n" for t in TEXTS]).read_bytes()
    (tmp_path / "e.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorpusError, match=r"e\.jsonl\.zst: corrupt compressed data at line \d+ .*re-download"):
        list(iter_documents(tmp_path / "e.jsonl.zst"))
    with pytest.raises(CorpusError, match=r"n\.parquet:row 2: column 'text' is null; drop the row or pass --skip-bad"):
        list(iter_documents(_parquet(tmp_path / "n.parquet", ["a", None, "b"])))
    (tmp_path / "f.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"\.jsonl\.zst.*\.parquet"):
        list(iter_documents(tmp_path / "f.csv"))
