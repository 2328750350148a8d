"""Megatron indexed shards: our writer/reader, interop with megatron-core, bad files, fuzz."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megadrp.data.indexed import IndexedDataset, IndexedDatasetWriter, dtype_for_vocab
from megadrp.errors import IndexedDatasetError


def _docs(rng, n=50, vocab=1000):
    return [rng.integers(0, vocab, size=int(rng.integers(1, 200))) for _ in range(n)]


def _write(prefix, docs, dtype=np.uint16):
    w = IndexedDatasetWriter(prefix, dtype)
    for d in docs:
        w.add_document(d)
    w.finalize()


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    docs = _docs(rng)
    _write(tmp_path / "a", docs)
    ds = IndexedDataset(tmp_path / "a")
    assert len(ds) == len(docs)
    for got, want in zip((ds[i] for i in range(len(ds))), docs):
        np.testing.assert_array_equal(got, want)
    assert ds.num_tokens == sum(len(d) for d in docs)
    np.testing.assert_array_equal(ds.window(0, 10), np.concatenate(docs)[:10])
    assert not list(tmp_path.glob("*.tmp"))


def test_dtype_rule():
    assert dtype_for_vocab(32000) == np.uint16
    assert dtype_for_vocab(65500) == np.int32
    assert dtype_for_vocab(128256) == np.int32


def test_token_too_large_for_dtype(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    with pytest.raises(IndexedDatasetError, match="does not fit dtype uint16"):
        w.add_document(np.array([70000]))
    w.abort()
    assert not list(tmp_path.iterdir())


def test_megatron_reads_ours(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset

    rng = np.random.default_rng(1)
    for dtype, vocab in ((np.uint16, 32000), (np.int32, 128000)):
        docs = _docs(rng, vocab=vocab)
        _write(tmp_path / f"ours_{np.dtype(dtype).name}", docs, dtype)
        m = MegatronDataset(str(tmp_path / f"ours_{np.dtype(dtype).name}"))
        assert len(m) == len(docs)
        assert m.index.dtype == dtype
        for i, d in enumerate(docs):
            np.testing.assert_array_equal(m[i], d)
        np.testing.assert_array_equal(m.document_indices, np.arange(len(docs) + 1))


def test_we_read_megatron(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(2)
    docs = _docs(rng)
    b = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    for d in docs:
        b.add_item(torch.from_numpy(d.astype(np.int64)))
        b.end_document()
    b.finalize(str(tmp_path / "m.idx"))
    ds = IndexedDataset(tmp_path / "m")
    assert len(ds) == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)


def test_missing_files(tmp_path):
    with pytest.raises(IndexedDatasetError, match="not found"):
        IndexedDataset(tmp_path / "nope")


def test_wrong_magic_version_dtype(tmp_path):
    rng = np.random.default_rng(3)
    _write(tmp_path / "a", _docs(rng, 5))
    idx = tmp_path / "a.idx"
    good = idx.read_bytes()
    for offset, value, msg in ((0, b"XXXXXXX", "wrong magic"), (9, b"\x07", "unsupported index version"),
                               (17, b"\x63", "unknown dtype code")):
        idx.write_bytes(good[:offset] + value + good[offset + len(value):])
        with pytest.raises(IndexedDatasetError, match=msg) as e:
            IndexedDataset(tmp_path / "a")
        assert "a.idx" in str(e.value)
    idx.write_bytes(good)


def test_truncated_bin_and_idx(tmp_path):
    rng = np.random.default_rng(4)
    _write(tmp_path / "a", _docs(rng, 5))
    b = tmp_path / "a.bin"
    b.write_bytes(b.read_bytes()[:-2])
    with pytest.raises(IndexedDatasetError, match=r"a\.bin.*truncated"):
        IndexedDataset(tmp_path / "a")
    _write(tmp_path / "b", _docs(rng, 5))
    i = tmp_path / "b.idx"
    i.write_bytes(i.read_bytes()[:-8])
    with pytest.raises(IndexedDatasetError, match=r"b\.idx"):
        IndexedDataset(tmp_path / "b")


def test_fuzz_never_crashes_or_reads_out_of_bounds(tmp_path):
    """Random byte flips and truncations: a clear IndexedDatasetError or a correct read."""
    rng = np.random.default_rng(5)
    docs = _docs(rng, 20)
    _write(tmp_path / "g", docs)
    good_idx, good_bin = (tmp_path / "g.idx").read_bytes(), (tmp_path / "g.bin").read_bytes()
    outcomes = {"error": 0, "read": 0}
    for case in range(300):
        idx, bin_ = bytearray(good_idx), bytearray(good_bin)
        target = idx if case % 2 == 0 else bin_
        if rng.random() < 0.5 and len(target) > 1:
            del target[int(rng.integers(1, len(target))):]
        else:
            for _ in range(int(rng.integers(1, 4))):
                target[int(rng.integers(0, len(target)))] ^= int(rng.integers(1, 256))
        (tmp_path / "f.idx").write_bytes(bytes(idx))
        (tmp_path / "f.bin").write_bytes(bytes(bin_))
        try:
            ds = IndexedDataset(tmp_path / "f")
            total = 0
            for i in range(len(ds)):
                total += len(ds[i])  # every read stays inside the file (validated above)
            assert total == ds.num_tokens == (tmp_path / "f.bin").stat().st_size // ds.dtype.itemsize
            outcomes["read"] += 1
        except IndexedDatasetError as e:
            assert "f.idx" in str(e) or "f.bin" in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 100 and outcomes["read"] > 10
