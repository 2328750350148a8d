"""The domain-mixture stream of training windows, with weights that change mid-run.

Determinism contract: the batch a rank gets at (step, micro-batch) is a pure function of
(seed, weights history, rank, world size, global batch, micro batch, seq_len) — not of the
number of DataLoader workers, prefetching, or how long the controller took.

How:
* Every step draws the domains of all `global_batch` samples from the weights in force
  for that step (`WeightsTable`), with an RNG keyed by (seed, step). Every rank and every
  worker replays these draws, so each knows how many samples each domain has given so
  far; the k-th sample of domain d is window `perm_{d,epoch}[k mod n_d]` of that domain,
  with `epoch = k // n_d` (a fresh permutation per epoch: many epochs are fine).
* The step's samples are laid out [accumulation step][rank][micro-batch row], so one rank
  and two ranks with the same global batch train on the same samples.
* Weights live in `WeightsTable`, a shared-memory table inherited by the DataLoader's
  worker processes: rows of (first step, weights) plus a watermark "rows are final up to
  step S". A worker that needs a step past the watermark waits; the trainer raises the
  watermark when it publishes an evaluation's weights, so a change takes effect at a
  documented step (`effective_step`), never "whenever a worker notices".
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from megadrp.data.indexed import IndexedDataset


def weights_digest(w: np.ndarray) -> str:
    """Short digest of a weights vector as float64 bytes (what `weights_digests` logs)."""
    return hashlib.blake2b(np.ascontiguousarray(w, dtype=np.float64).tobytes(), digest_size=8).hexdigest()


def _digest_int(w: np.ndarray) -> int:
    return int.from_bytes(bytes.fromhex(weights_digest(w)), "little", signed=True)


def digest_hex(x: int) -> str:
    return int(x).to_bytes(8, "little", signed=True).hex()


class WeightsTable:
    """Append-only (effective_step, weights) rows in shared memory, plus a watermark.

    Created before the DataLoader starts its workers (fork), so writes by the trainer are
    seen by every worker of this rank.
    """

    def __init__(self, initial: np.ndarray, max_rows: int = 1024) -> None:
        initial = np.asarray(initial, dtype=np.float64)
        self.n_domains = len(initial)
        self.rows = torch.zeros(max_rows, self.n_domains + 1, dtype=torch.float64).share_memory_()
        self.meta = torch.zeros(3, dtype=torch.int64).share_memory_()  # [row count, final-through step, closed]
        self.lock = mp.get_context("fork").Lock()
        self._append(1, initial)

    def _append(self, effective_step: int, weights: np.ndarray) -> None:
        n = int(self.meta[0])
        if n >= self.rows.shape[0]:
            raise RuntimeError(f"weights table full ({n} rows); raise max_rows")
        last = self.rows[n - 1] if n else None
        if last is not None and effective_step <= int(last[0]):
            raise ValueError(f"weights rows must take effect at increasing steps ({effective_step} after {int(last[0])})")
        self.rows[n, 0] = float(effective_step)
        self.rows[n, 1:] = torch.from_numpy(np.asarray(weights, dtype=np.float64))
        self.meta[0] = n + 1

    def publish(self, effective_step: int, weights: np.ndarray | None, final_through: int) -> None:
        """New weights from `effective_step` on (None: keep the current ones), and promise
        that no row will change the weights of steps <= `final_through`."""
        with self.lock:
            if weights is not None:
                current = self._lookup(effective_step)
                if not np.array_equal(current, np.asarray(weights, dtype=np.float64)):
                    self._append(effective_step, weights)
            self.meta[1] = max(int(self.meta[1]), final_through)

    def weights_at(self, step: int, wait: bool = True, timeout: float = 3600.0) -> np.ndarray:
        if wait:
            t0 = time.monotonic()
            while int(self.meta[1]) < step:
                if int(self.meta[2]):
                    raise RuntimeError("weights table closed: the trainer is shutting down")
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"no domain weights published for step {step} after {timeout:.0f}s")
                time.sleep(0.002)
        with self.lock:
            return self._lookup(step)

    def _lookup(self, step: int) -> np.ndarray:
        rows = self.rows[: int(self.meta[0])].numpy()
        i = int(np.searchsorted(rows[:, 0], step, side="right")) - 1
        return rows[max(i, 0), 1:].copy()

    def close(self) -> None:
        """Wake every worker waiting for weights that will never come (the run is ending)."""
        self.meta[2] = 1

    def state_dict(self) -> dict:
        with self.lock:
            return {"rows": self.rows[: int(self.meta[0])].clone(), "final_through": int(self.meta[1])}

    def load_state_dict(self, state: dict) -> None:
        rows = state["rows"]
        with self.lock:
            if rows.shape[1] != self.n_domains + 1:
                raise ValueError(f"checkpoint weights table has {rows.shape[1] - 1} domains, run has {self.n_domains}")
            self.rows.zero_()
            self.rows[: rows.shape[0]] = rows
            self.meta[0] = rows.shape[0]
            self.meta[1] = int(state["final_through"])


@dataclass(frozen=True)
class BatchLayout:
    """How a step's `global_batch` samples split into ranks and accumulation steps."""

    global_batch: int
    micro_batch: int
    world_size: int
    rank: int

    def __post_init__(self) -> None:
        per_pass = self.micro_batch * self.world_size
        if self.global_batch % per_pass:
            raise ValueError(f"train.global_batch={self.global_batch} is not a multiple of "
                             f"train.micro_batch × world size = {self.micro_batch} × {self.world_size}")

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    def positions(self, accum: int) -> np.ndarray:
        base = accum * self.micro_batch * self.world_size + self.rank * self.micro_batch
        return np.arange(base, base + self.micro_batch)

    def micro_index(self, accum: int) -> int:
        """This rank's micro-batch `accum` as a place in the global batch (0 … global/micro − 1):
        the same samples have the same index whatever the world size."""
        return int(self.positions(accum)[0]) // self.micro_batch


class DomainSampler:
    """Replays the per-step domain draws; knows how many samples each domain has served."""

    def __init__(self, seed: int, n_domains: int, global_batch: int, step: int = 0,
                 counts: np.ndarray | None = None) -> None:
        self.seed, self.n_domains, self.global_batch = seed, n_domains, global_batch
        self.step = step  # steps fully drawn
        self.counts = np.zeros(n_domains, np.int64) if counts is None else np.asarray(counts, np.int64).copy()

    def draw(self, step: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Domains and per-domain sample indices of step `step` (must be `self.step + 1`)."""
        if step != self.step + 1:
            raise ValueError(f"sampler at step {self.step} cannot draw step {step}")
        rng = np.random.default_rng([self.seed, 0x5EED, step])
        domains = rng.choice(self.n_domains, size=self.global_batch, p=weights / weights.sum())
        idx = np.empty(self.global_batch, np.int64)
        for d in range(self.n_domains):
            sel = np.flatnonzero(domains == d)
            idx[sel] = self.counts[d] + np.arange(len(sel))
            self.counts[d] += len(sel)
        self.step = step
        return domains, idx

    def state_dict(self) -> dict:
        return {"step": self.step, "counts": self.counts.tolist()}


class DomainWindows:
    """The `seq_len + 1`-token training windows of one domain, reshuffled every epoch."""

    def __init__(self, prefix, seq_len: int, seed: int, domain_index: int, name: str = "",
                 vocab_size: int | None = None) -> None:
        self.ds = IndexedDataset(prefix, vocab_size)
        self.seq_len, self.seed, self.domain_index = seq_len, seed, domain_index
        self.n = (self.ds.num_tokens - 1) // seq_len
        if self.n < 1:
            raise ValueError(f"domain {name or prefix!r}: {self.ds.num_tokens} tokens, fewer than one "
                             f"window of train.seq_len+1={seq_len + 1}; use more data or a shorter seq_len")
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def __getitem__(self, k: int) -> np.ndarray:
        epoch, j = divmod(int(k), self.n)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, 0xE90C, self.domain_index, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.n), epoch
        assert self._perm is not None
        return self.ds.window(int(self._perm[j]) * self.seq_len, self.seq_len + 1)


class MixtureDataset(IterableDataset):
    """Yields this rank's micro-batches from `start_step + 1` to `total_steps`.

    Each item is a dict: input_ids [micro_batch, seq_len + 1] (int64), domain
    [micro_batch], step, accum, weights_digest (int64 of the weights row used).
    """

    def __init__(self, prefixes: list, seq_len: int, layout: BatchLayout, table: WeightsTable,
                 seed: int, total_steps: int, start_step: int = 0, start_counts: np.ndarray | None = None,
                 names: list[str] | None = None, vocab_size: int | None = None) -> None:
        super().__init__()
        self.prefixes, self.seq_len, self.layout, self.table = list(prefixes), seq_len, layout, table
        self.seed, self.total_steps, self.start_step = seed, total_steps, start_step
        self.start_counts = None if start_counts is None else np.asarray(start_counts, np.int64)
        self.names = names or [str(p) for p in prefixes]
        # Open once here: validates every shard (and fails) before any worker starts.
        self._windows = [DomainWindows(p, seq_len, seed, i, n, vocab_size)
                         for i, (p, n) in enumerate(zip(self.prefixes, self.names))]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        sampler = DomainSampler(self.seed, len(self.prefixes), self.layout.global_batch,
                                self.start_step, self.start_counts)
        j = 0
        for step in range(self.start_step + 1, self.total_steps + 1):
            w = self.table.weights_at(step)
            domains, idx = sampler.draw(step, w)
            digest = _digest_int(w)
            for accum in range(self.layout.accumulation):
                mine = j % nw == wid
                j += 1
                if not mine:
                    continue
                pos = self.layout.positions(accum)
                rows = [self._windows[int(domains[p])][int(idx[p])] for p in pos]
                yield {
                    "input_ids": torch.from_numpy(np.stack(rows)),
                    "domain": torch.from_numpy(domains[pos].astype(np.int64)),
                    "step": step,
                    "accum": accum,
                    "weights_digest": digest,
                }


class EvalWindows:
    """The fixed windows of one domain's held-out split: the first `tokens // seq_len`
    non-overlapping windows (of the eval split for the trainer; `megadrp eval` scores the same
    ones, or the test split's)."""

    def __init__(self, prefix, seq_len: int, tokens: int, name: str = "", vocab_size: int | None = None,
                 split: str = "eval") -> None:
        self.ds = IndexedDataset(prefix, vocab_size)
        self.seq_len = seq_len
        available = (self.ds.num_tokens - 1) // seq_len
        self.n = min(available, max(1, tokens // seq_len))
        if available < 1:
            raise ValueError(f"domain {name or prefix!r}: {split} split has {self.ds.num_tokens} tokens, "
                             f"fewer than one window of {seq_len + 1}; hold out more {split} documents")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ds.window(i * self.seq_len, self.seq_len + 1)
