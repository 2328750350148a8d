"""Cheaper signals for the controller (#40): the `train` signal's interval means (and their
resume), when a training-loss signal runs the held-out evaluation, and the adaptive evaluation
of `eval.tokens_per_domain: auto`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megadrp.engine.evaluator import Evaluator, standard_error
from megadrp.engine.signal import LossSignal
from megadrp.engine.train_state import TrainState

pytestmark = pytest.mark.unit


def test_train_signal_is_the_interval_mean_and_survives_a_resume():
    st = TrainState(3)
    st.finish_step(np.array([4.0, 0.0, 9.0]), np.array([2.0, 0.0, 3.0]), 8, bad=False)
    st.finish_step(np.array([2.0, 0.0, 0.0]), np.array([2.0, 0.0, 0.0]), 8, bad=False)
    saved = st.state_dict()
    resumed = TrainState(3)
    resumed.load_state_dict(saved)
    sig = LossSignal("train", interval=2)
    for s in (st, resumed):
        v = sig.value(None, s)  # domain 1 was never drawn: NaN (no moving average yet either)
        assert v[0] == pytest.approx(1.5) and v[2] == pytest.approx(3.0) and np.isnan(v[1])
    # the next interval starts empty; a domain not drawn in it keeps its moving average
    st.finish_step(np.array([0.0, 0.0, 6.0]), np.array([0.0, 0.0, 3.0]), 8, bad=False)
    v = sig.value(None, st)
    assert v[0] == pytest.approx(st.ema[0]) and v[2] == pytest.approx(2.0)


def test_when_a_training_signal_runs_the_held_out_evaluation():
    st = TrainState(2)
    st.finish_step(np.array([1.0, 1.0]), np.array([1.0, 1.0]), 8, bad=False)
    every4 = LossSignal("train", interval=5, held_out_every=4)
    assert every4.evaluate_now(0, 100, st) and every4.evaluate_now(100, 100, st)  # step 0 and the last
    assert every4.evaluate_now(20, 100, st) and not every4.evaluate_now(15, 100, st)  # every 4th update
    st2 = TrainState(2)
    st2.finish_step(np.array([1.0, 0.0]), np.array([1.0, 0.0]), 8, bad=False)
    assert every4.evaluate_now(15, 100, st2)  # a domain with no training loss yet needs its held-out one
    assert LossSignal("eval", interval=5).evaluate_now(15, 100, st)


@dataclass
class _Out:
    losses: torch.Tensor
    kd: None = None
    lagrangian: None = None
    expected_shape: None = None


class _Engine:
    """Scores window i of a domain with loss `table[domain][i]` (the window's first token names
    both): the evaluator's arithmetic, apart from any model."""

    device = torch.device("cpu")

    def __init__(self, table: dict[int, np.ndarray]) -> None:
        self.table, self.calls = table, 0

    def eval(self):
        pass

    def train(self, mode: bool = True):
        pass

    def __call__(self, x, y, step, mask_mode):
        self.calls += 1
        d, i = x[:, 0] // 1000, x[:, 0] % 1000
        loss = torch.tensor([self.table[int(a)][int(b)] for a, b in zip(d, i)], dtype=torch.float32)
        return _Out(loss[:, None].expand(x.shape[0], x.shape[1]).clone())


class _Windows:
    def __init__(self, domain: int, n: int) -> None:
        self.domain, self.n = domain, n

    def __getitem__(self, i):
        return np.full(5, 1000 * self.domain + i, dtype=np.int64)


@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_adaptive_evaluation_stops_at_the_target_standard_error(one_rank_group):
    rng = np.random.default_rng(0)
    quiet = 2.0 + 0.01 * rng.standard_normal(64)  # a domain whose windows agree: the floor suffices
    noisy = 3.0 + 1.0 * rng.standard_normal(64)  # one that needs many more windows
    engine = _Engine({0: quiet, 1: noisy})
    ev = Evaluator([_Windows(0, 64), _Windows(1, 64)], seq_len=4, micro_batch=4, rank=0, world=1, floor=8,
                   target_se=0.2)
    res = ev(engine, 0, None)
    assert res.windows[0] == 8 and res.se[0] <= 0.2
    n = int(res.windows[1])
    assert n in (16, 32, 64) and (res.se[1] <= 0.2 or n == 64)
    assert res.se[1] == pytest.approx(noisy[:n].std(ddof=1) / np.sqrt(n), rel=1e-6)  # the first n windows
    assert res.loss[1] == pytest.approx(noisy[:n].mean(), rel=1e-5)
    # a fixed evaluation scores every window, the sums the same arithmetic
    fixed = Evaluator([_Windows(0, 64), _Windows(1, 64)], seq_len=4, micro_batch=4, rank=0, world=1)(engine, 0, None)
    assert list(fixed.windows) == [64, 64] and fixed.loss[1] == pytest.approx(noisy.mean(), rel=1e-5)
    sums = np.zeros((1, 6))
    sums[0, 3:] = [3.0, 5.0, 2.0]  # two windows of mean loss 1 and 2: Σ 3, Σ² 5
    assert standard_error(sums)[0] == pytest.approx(np.std([1.0, 2.0], ddof=1) / np.sqrt(2))
