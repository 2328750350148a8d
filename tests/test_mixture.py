"""The domain-mixture stream: determinism across workers, weight changes at a documented
step, save/restore mid-epoch, many epochs, rank layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megadrp.data.indexed import IndexedDatasetWriter
from megadrp.data.mixture import BatchLayout, DomainSampler, DomainWindows, MixtureDataset, WeightsTable


@pytest.fixture()
def shards(tmp_path):
    """Three domains whose tokens say which domain and position they come from."""
    prefixes = []
    for d, n in enumerate((300, 500, 900)):
        w = IndexedDatasetWriter(tmp_path / f"d{d}", np.int32)
        toks = d * 100000 + np.arange(n)
        for s in range(0, n, 50):
            w.add_document(toks[s:s + 50])
        w.finalize()
        prefixes.append(tmp_path / f"d{d}")
    return prefixes


def _stream(prefixes, workers, steps=30, world=1, rank=0, change_at=None, start_step=0, start_counts=None,
            table=None, seq_len=16):
    table = table or WeightsTable(np.array([0.2, 0.3, 0.5]))
    table.publish(1, None, final_through=10 if start_step < 10 else steps)
    ds = MixtureDataset(prefixes, seq_len, BatchLayout(12, 2, world, rank), table, seed=5, total_steps=steps,
                        start_step=start_step, start_counts=start_counts)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                     prefetch_factor=4 if workers else None)
    out = []
    for b in dl:
        out.append((b["step"], b["accum"], b["domain"].tolist(), b["input_ids"].tolist(), b["weights_digest"]))
        if b["step"] == 10 and b["accum"] == BatchLayout(12, 2, world, rank).accumulation - 1:
            table.publish(11, change_at, final_through=steps)
    return out


def test_same_batches_with_0_and_2_workers(shards):
    a = _stream(shards, 0, change_at=np.array([0.8, 0.1, 0.1]))
    b = _stream(shards, 2, change_at=np.array([0.8, 0.1, 0.1]))
    assert a == b and len(a) == 30 * 6


def test_weight_change_applies_at_documented_step(shards):
    base = _stream(shards, 2, change_at=None)
    changed = _stream(shards, 2, change_at=np.array([0.0, 0.0, 1.0]))
    assert [x for x in base if x[0] <= 10] == [x for x in changed if x[0] <= 10]
    after = [d for s, _, doms, _, _ in changed if s >= 11 for d in doms]
    assert after and set(after) == {2}
    assert len({x[4] for x in changed if x[0] <= 10}) == 1 and len({x[4] for x in changed if x[0] >= 11}) == 1


def test_windows_come_from_their_domain_and_are_contiguous(shards):
    for s, _, doms, ids, _ in _stream(shards, 0, steps=5):
        for d, row in zip(doms, ids):
            assert all(t // 100000 == d for t in row)
            assert np.all(np.diff(row) == 1)  # one contiguous stretch of the domain's stream
            assert len(row) == 17


def test_restore_mid_stream_continues_identically(shards):
    full = _stream(shards, 2, steps=25)
    sampler = DomainSampler(5, 3, 12)
    t = WeightsTable(np.array([0.2, 0.3, 0.5]))
    t.publish(1, None, final_through=25)
    for step in range(1, 14):
        sampler.draw(step, t.weights_at(step))
    rest = _stream(shards, 2, steps=25, start_step=13, start_counts=sampler.counts)
    assert rest == [x for x in full if x[0] > 13]


def test_many_epochs_reshuffled(shards):
    w = DomainWindows(shards[0], 16, seed=1, domain_index=0)
    n = w.n
    e0 = [int(w[k][0]) for k in range(n)]
    e1 = [int(w[k][0]) for k in range(n, 2 * n)]
    e2 = [int(w[k][0]) for k in range(2 * n, 3 * n)]
    assert sorted(e0) == sorted(e1) == sorted(e2)  # every window once per epoch
    assert e0 != e1 and e1 != e2
    # the stream runs far past one epoch of the smallest domain without error
    out = _stream(shards, 0, steps=60)
    served = sum(1 for _, _, doms, _, _ in out for d in doms if d == 0)
    assert served > 2 * w.n


def test_one_rank_and_two_ranks_see_the_same_samples(shards):
    one = _stream(shards, 0, steps=8, world=1)
    r0 = _stream(shards, 0, steps=8, world=2, rank=0)
    r1 = _stream(shards, 0, steps=8, world=2, rank=1)
    for step in range(1, 9):
        a = sorted(map(tuple, [row for s, _, _, ids, _ in one if s == step for row in ids]))
        b = sorted(map(tuple, [row for s, _, _, ids, _ in r0 + r1 if s == step for row in ids]))
        assert a == b


def test_layout_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="global_batch=10"):
        BatchLayout(10, 4, 1, 0)


def test_worker_waits_for_unpublished_weights(shards):
    """A worker never guesses: steps past the watermark wait for the trainer."""
    t = WeightsTable(np.array([0.2, 0.3, 0.5]))
    t.publish(1, None, final_through=2)
    with pytest.raises(TimeoutError):
        t.weights_at(3, timeout=0.05)
    t.publish(3, np.array([1.0, 0.0, 0.0]), final_through=5)
    assert t.weights_at(3, timeout=0.05).tolist() == [1.0, 0.0, 0.0]
    assert t.weights_at(2).tolist() == [0.2, 0.3, 0.5]


def test_domain_counts_follow_the_weights_chi2(shards):
    """4,800 samples drawn under weights (0.7, 0.2, 0.1): a χ² test against those weights
    passes, and the same counts are far from what a stream ignoring them (uniform) gives."""
    w, steps = np.array([0.7, 0.2, 0.1]), 400
    table = WeightsTable(w)
    table.publish(1, None, final_through=steps)
    ds = MixtureDataset(shards, 16, BatchLayout(12, 2, 1, 0), table, seed=5, total_steps=steps)
    counts = np.zeros(3)
    for b in ds:
        counts += np.bincount(b["domain"].numpy(), minlength=3)
    n = counts.sum()
    assert n == 12 * steps
    assert ((counts - n * w) ** 2 / (n * w)).sum() < 18.42  # p > 1e-4 with 2 degrees of freedom
    assert ((counts - n / 3) ** 2 / (n / 3)).sum() > 1000
