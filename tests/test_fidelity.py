"""The nine rules in which megadrp computes what the reference code computes (SPEC §2, §3).

Every expected number is worked out by hand in the comments, not produced by the code under
test; each test fails on the behaviour megadrp had before these rules.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PY, run

from megadrp.data.mixture import BatchLayout
from megadrp.dro.controller import Controller, ControllerSettings, Observation
from megadrp.dro.scaling_law import Fit, reference_prediction
from megadrp.dro.weights import apply_floor, dro_weights, update_ratio
from megadrp.engine.optim import group_lrs
from megadrp.engine.train_state import ema_update
from megadrp.model.masks import L0Masks, Shape, prob_nonzero
from megadrp.runtime.launch import free_port


# 1. Mask and λ learning rates follow the schedule -----------------------------------------
def test_every_group_follows_one_multiplier():
    # warmup 20 of 150 steps, floor 0.1. Step 10: m = 10/20 = 0.5.
    lrs = group_lrs(10, lr=1e-3, mask_lr=0.5, lambda_lr=0.4, total=150, warmup=20, min_ratio=0.1)
    assert lrs == pytest.approx({"weights": 5e-4, "masks": 0.25, "lambdas": 0.2})
    # Step 85: progress (85−20)/130 = 0.5, cosine term ½(1+cos π/2) = 0.5, m = 0.1 + 0.9·0.5 = 0.55.
    lrs = group_lrs(85, lr=1e-3, mask_lr=0.5, lambda_lr=0.4, total=150, warmup=20, min_ratio=0.1)
    assert lrs == pytest.approx({"weights": 5.5e-4, "masks": 0.275, "lambdas": 0.22})
    # The last step: m = 0.1.
    assert group_lrs(150, 1e-3, 0.5, 0.4, 150, 20, 0.1)["masks"] == pytest.approx(0.05)


# 2. A decision acts on the interval right after its own evaluation ------------------------
def _settings(mode="drpruning", **kw):
    base = dict(mode=mode, domains=["a", "b", "c"], p0=[0.5, 0.3, 0.2], total_steps=100,
                reference_loss=None, fit_start=0.1, history_start=0.0)
    base.update(kw)
    return ControllerSettings(**base)


@pytest.mark.parametrize("mode", ["sheared", "dro", "drpruning"])
def test_step_zero_sets_references_only(mode):
    c = Controller(_settings(mode))
    d = c.update(Observation(0, [3.0, 2.0, 1.0], [0.0, 0.0, 0.0]))
    assert d.q == pytest.approx([0.5, 0.3, 0.2]) and d.reference_loss == [3.0, 2.0, 1.0]
    assert c.updates == 0 and any("no decision" in r for r in d.reasons)
    # The next evaluation decides from its own losses: domain a is the one above its reference.
    d = c.update(Observation(10, [3.5, 2.0, 1.0], [1e4, 1e4, 1e4]))
    assert d.step == 10 and d.q[0] > 0.5 and c.updates == 1


# 3. The reference loss is the mean of the 3 best fits' clipped predictions ----------------
def test_reference_is_the_mean_of_clipped_predictions():
    # At D = 1e4, b = 0.5: A·D^(−b) = A/100. Predictions: 1.0 + e^−9, 0.5 + e^−1, 0.8 + e^−5;
    # clipped to the lowest loss 0.9: 0.9, 0.867879, 0.806738 → mean 0.858206.
    fits = [Fit(math.log(100), 0.5, -9.0), Fit(math.log(50), 0.5, -1.0), Fit(math.log(80), 0.5, -5.0)]
    want = (0.9 + 0.5 + math.exp(-1) + 0.8 + math.exp(-5)) / 3
    assert reference_prediction(fits, 1e4, None, 0.9) == pytest.approx(want, rel=1e-12)
    # Averaged parameters (log A = ln 73.68, log E = −5) would predict 0.7435: 13% lower.
    averaged = Fit(float(np.mean([f.log_a for f in fits])), 0.5, -5.0)
    assert float(averaged.predict(1e4)) == pytest.approx(0.743544, rel=1e-5)


def test_a_fit_that_predicts_no_number_is_left_out_of_the_mean():
    # The reference drops its NaN fits and averages the rest. log A = 800 overflows at any D
    # (e^(800 − 0.5·ln 1e4) = inf); the other two predict 0.5 + e^−1 and 0.8 + e^−5, both
    # below the lowest loss 0.9: mean (0.867879 + 0.806738) / 2 = 0.837309.
    fits = [Fit(800.0, 0.5, 0.0), Fit(math.log(50), 0.5, -1.0), Fit(math.log(80), 0.5, -5.0)]
    want = (0.5 + math.exp(-1) + 0.8 + math.exp(-5)) / 2
    assert reference_prediction(fits, 1e4, None, 0.9) == pytest.approx(want, rel=1e-12)
    assert math.isnan(reference_prediction(fits[:1], 1e4, None, 0.9))  # none finite: no reference


def test_controller_takes_the_mean_of_predictions():
    c = Controller(_settings("dro_dyloss", reference_loss=[5.0, 5.0, 5.0], min_fit_points=2))
    fits = [Fit(math.log(100), 0.5, -9.0), Fit(math.log(50), 0.5, -1.0), Fit(math.log(80), 0.5, -5.0)]
    c.fit_problems = lambda problems, pruning: [(fits, "")] * len(problems)
    for step in (10, 20, 30):
        c.update(Observation(step, [0.9, 0.95, 1.0], [1e3 * step] * 3))
    # D_final = 3e4 · 100/30 = 1e5: A/316.23; the lowest loss of domain a is 0.9.
    preds = [100 / 1e5 ** 0.5 + math.exp(-9), 50 / 1e5 ** 0.5 + math.exp(-1), 80 / 1e5 ** 0.5 + math.exp(-5)]
    assert c.r[0] == pytest.approx(np.mean(np.minimum(preds, 0.9)), rel=1e-12)


# 4. The floor on q is clamp-then-renormalise once -----------------------------------------
def test_floor_is_clamp_then_renormalise_once():
    # max(q, 0.1) = (0.7, 0.25, 0.1), sum 1.05. Water-filling would give (0.663158, 0.236842, 0.1).
    q = apply_floor(np.array([0.7, 0.25, 0.05]), 0.1)
    assert q == pytest.approx([0.7 / 1.05, 0.25 / 1.05, 0.1 / 1.05], abs=1e-12)
    # Two domains, p uniform, excess (1, 0): q_raw0 = (1 + √0.2)/2 = 0.723607 (χ² = ρ = 0.1);
    # the floor 0.5 lifts q1 to 0.5, then q = (0.723607, 0.5)/1.223607.
    res = dro_weights(np.array([2.0, 1.0]), np.array([1.0, 1.0]), np.array([0.5, 0.5]), rho=0.1, min_prob=0.2)
    a = (1 + math.sqrt(0.2)) / 2
    assert res.q == pytest.approx([a / (a + 0.5), 0.5 / (a + 0.5)], abs=2e-4)


# 5. The per-layer Lagrangian ----------------------------------------------------------------
def test_lagrangian_is_per_layer():
    # 2 layers × 2 kv heads → 1 kept: target fraction 0.5 after the ramp. Layer 0 keeps both
    # heads, layer 1 none: the mean is on target, the layers are not. λ1 = 0, λ2 = 1:
    # mean((1 − 0.5)², (0 − 0.5)²) = 0.25 (the old whole-set term was (0.5 − 0.5)² = 0).
    m = L0Masks(Shape(2, 8, 2, 2, 4), Shape(2, 8, 1, 1, 4), ramp_steps=1)
    with torch.no_grad():
        m.lambdas.copy_(torch.tensor([[0.0, 1.0]]))
    lag = m.lagrangian(5, {"head": torch.tensor([[1.0, 1.0], [0.0, 0.0]])})
    assert float(lag.detach()) == pytest.approx(0.25)


def test_per_layer_sets_are_not_nested_with_the_layer_mask():
    # 4 → 2 layers and 2 → 1 kv heads: the head target is 0.5, not 0.5 × 0.5. Expected head
    # fraction 0.5 in every layer with λ1 = 1: gap 0 whatever the layer probabilities.
    m = L0Masks(Shape(4, 8, 2, 2, 4), Shape(2, 8, 1, 1, 4), ramp_steps=1)
    with torch.no_grad():
        m.lambdas.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))  # rows: layer, head
    probs = {"layer": torch.tensor([0.5, 0.5, 0.5, 0.5]), "head": torch.full((4, 2), 0.5)}
    assert float(m.lagrangian(5, probs).detach()) == pytest.approx(0.0, abs=1e-7)


def test_lambda2_starts_where_configured():
    # prune.lambda2_init (default 0, the reference): every active set's λ2 starts there, λ1 at 0,
    # so the first step's penalty is λ2·gap² alone: 2 layers × 2 kv heads → 1, one layer keeps
    # both heads, the other none: mean((1 − 0.5)², (0 − 0.5)²) = 0.25 → 0.25·λ2.
    ref = L0Masks(Shape(2, 8, 2, 2, 4), Shape(2, 8, 1, 1, 4), ramp_steps=1)
    assert torch.equal(ref.lambdas.detach(), torch.zeros(1, 2))
    m = L0Masks(Shape(2, 8, 2, 2, 4), Shape(2, 8, 1, 1, 4), ramp_steps=1, lambda2_init=40.0)
    assert m.lambdas.detach().tolist() == [[0.0, 40.0]]
    lag = m.lagrangian(5, {"head": torch.tensor([[1.0, 1.0], [0.0, 0.0]])})
    assert float(lag.detach()) == pytest.approx(10.0)


# 6. One mask sample per forward micro-batch ---------------------------------------------------
def test_micro_batch_index_is_the_same_for_one_and_two_ranks():
    # Global batch 16, micro-batch 4: 1 rank runs 4 micro-batches, 2 ranks run 2 each.
    one = BatchLayout(16, 4, 1, 0)
    two = [BatchLayout(16, 4, 2, r) for r in (0, 1)]
    by_index_one = {one.micro_index(a): one.positions(a).tolist() for a in range(one.accumulation)}
    by_index_two = {lay.micro_index(a): lay.positions(a).tolist() for lay in two for a in range(lay.accumulation)}
    assert by_index_one == by_index_two and sorted(by_index_one) == [0, 1, 2, 3]


def test_draws_differ_between_micro_batches(base_model):
    from transformers import AutoConfig

    from megadrp.model.llama import MaskedLlama

    cfg = AutoConfig.from_pretrained(base_model)
    model = MaskedLlama(cfg, Shape(2, 48, 2, 1, 64), ramp_steps=10)
    with torch.no_grad():
        for p in model.l0.log_alpha.values():
            p.fill_(0.0)  # P(z≠0) ≈ 0.83: gates well inside (0, 1), so draws show
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    loss = [model(ids[:, :-1], ids[:, 1:], step=3, mask_mode="sample", mask_seed=1, mask_draw=k).losses.mean().item()
            for k in (0, 1, 0)]
    assert loss[0] != loss[1] and loss[0] == loss[2]


# 7. Evaluation masks keep round(expected count) per row -------------------------------------
def test_evaluation_masks_keep_each_rows_rounded_expectation():
    m = L0Masks(Shape(2, 8, 4, 4, 4), Shape(2, 8, 2, 2, 4), ramp_steps=1)
    big, small = 20.0, -20.0  # P(z≠0) = 1 and 0 up to 1e-8 (log α is clamped to ±4.6 first)
    la = torch.tensor([[big, big, big, small], [big, small, small, small]])
    with torch.no_grad():
        m.log_alpha["head"].copy_(la)
    p = prob_nonzero(m.clamped("head"))
    # Row sums 3·0.99798 + 0.0471 = 3.041 → 3, and 0.99798 + 3·0.0471 = 1.139 → 1 (target 2).
    assert p.sum(-1).round().tolist() == [3.0, 1.0]
    z = m.deterministic(final=False)["head"]
    assert (z != 0).sum(-1).tolist() == [3, 1]
    assert (m.deterministic(final=True)["head"] != 0).sum(-1).tolist() == [2, 2]


# 8. Sparsity for the pruning law ----------------------------------------------------------------
def test_expected_and_target_sparsity_by_hand():
    # Source: 2 layers, d 4, 2 heads (2 kv groups of 1), I 3, head_dim 2. Per kv group
    # 2·(2·1 + 2) = 8 parameters per hidden dim; per layer d·(2·8 + 3·3) = 100; 200 in all.
    m = L0Masks(Shape(2, 4, 2, 2, 3), Shape(1, 2, 1, 1, 1), ramp_steps=10, head_dim=2)
    assert m.source_params() == 200
    probs = {"layer": torch.tensor([1.0, 0.5]), "head": torch.tensor([[1.0, 0.5], [1.0, 1.0]]),
             "intermediate": torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),
             "hidden": torch.tensor([1.0, 1.0, 1.0, 0.5])}
    # E[d] = 3.5; layer 0: 1·3.5·(1.5·8 + 3·3) = 73.5; layer 1: 0.5·3.5·(2·8 + 3·1) = 33.25.
    assert m.expected_sparsity(probs) == pytest.approx(1 - 106.75 / 200)
    # The target shape keeps 1 layer, d 2, 1 kv group, I 1: 1·2·(1·8 + 3·1) = 22 → 0.89 removed.
    assert m.target_sparsity(10) == pytest.approx(1 - 22 / 200)
    # The reference ramps that sparsity linearly: step 5 of 10 → 0.445, step 2 → 0.178. (The
    # ramped shape's own sparsity, 1.5 layers · d 3 · (1.5·8 + 3·2) = 81 → 0.595, is not it.)
    assert m.target_sparsity(5) == pytest.approx(0.445) and m.target_sparsity(2) == pytest.approx(0.178)
    assert m.target_sparsity(0) == 0.0 and m.target_sparsity(30) == pytest.approx(0.89)


def test_predictions_use_the_steps_target_sparsity():
    c = Controller(_settings("dro_dyloss", reference_loss=[5.0, 5.0, 5.0], min_fit_points=2, pruning=True))
    # L = A·D^(−b)·s^(−b2) + E with A = 1, b = 0, b2 = −1, E = e^−20: L ≈ s.
    c.fit_problems = lambda problems, pruning: [([Fit(0.0, 0.0, -20.0, -1.0)], "")] * len(problems)
    for step in (10, 20, 30):
        c.update(Observation(step, [0.9, 0.9, 0.9], [1e3 * step] * 3, sparsity=0.2, target_sparsity=0.3))
    assert c.r[0] == pytest.approx(0.3, abs=1e-8)


# 9. Final masks from fp32 log α; the train EMA per batch; §3.3's clamps in sequence -------------
def test_final_masks_come_from_fp32_master_under_bf16_zero3():
    cmd = [str(Path(PY).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "tests/bf16_masks.py"]
    line = next(x for x in run(cmd, timeout=600).stdout.splitlines() if x.startswith('{"world"'))
    r = json.loads(line)
    assert r["world"] == 2 and r["module_dtype"] == "torch.bfloat16"
    # The 16-bit copy cannot tell 3.000 … 3.007 apart, so it would keep the first four channels.
    assert r["bf16_distinct"] == 1 and r["kept_bf16"] == [[0, 1, 2, 3]] * 2
    assert r["fp32_exact"] and r["kept_fp32"] == [[4, 5, 6, 7]] * 2
    # The exporter keeps what the fp32 values say, and the last evaluation (a 'final' forward)
    # scores those same masks once they are read; before, it scored the 16-bit copy's choice.
    assert r["kept_export"] == [[4, 5, 6, 7]] * 2 and r["kept_eval"] == [[4, 5, 6, 7]] * 2
    assert r["kept_eval_before"] == [[0, 1, 2, 3]] * 2


def test_train_ema_updates_per_batch():
    ema = np.array([np.nan, 2.0, 1.0])
    # Domain 0's first batch (mean 3.0/2) sets it; domain 1: 0.9·2 + 0.1·(0.5/1) = 1.85; domain 2 unseen.
    ema = ema_update(ema, np.array([3.0, 0.5, 0.0]), np.array([2.0, 1.0, 0.0]))
    assert ema == pytest.approx([1.5, 1.85, 1.0])
    ema = ema_update(ema, np.array([1.0, 0.0, 4.0]), np.array([1.0, 0.0, 2.0]))
    assert ema == pytest.approx([0.9 * 1.5 + 0.1 * 1.0, 1.85, 0.9 * 1.0 + 0.1 * 2.0])


def test_ratio_clamps_apply_in_sequence():
    # p0 = (0.6, 0.3, 0.1), p = (0.35, 0.45, 0.2), q = e3: 0.9p + 0.1q = (0.315, 0.405, 0.28);
    # clamp to [p0/2, 2p0]: 0.28 → 0.2, sum 0.92 → (0.342391, 0.440217, 0.217391); [0.1, 0.6] holds.
    # (Both clamps held at once, as before, would give exactly 0.2 for the last entry.)
    p = update_ratio(np.array([0.35, 0.45, 0.2]), np.array([0.0, 0.0, 1.0]), np.array([0.6, 0.3, 0.1]))
    assert p == pytest.approx(np.array([0.315, 0.405, 0.2]) / 0.92, abs=1e-12)
    # p0 = (0.5, 0.3, 0.2), p = (0.3, 0.5, 0.2), q = e2: (0.27, 0.55, 0.18) is inside [p0/2, 2p0];
    # clamp to [0.2, 0.5]: (0.27, 0.5, 0.2), sum 0.97.
    p = update_ratio(np.array([0.3, 0.5, 0.2]), np.array([0.0, 1.0, 0.0]), np.array([0.5, 0.3, 0.2]))
    assert p == pytest.approx(np.array([0.27, 0.5, 0.2]) / 0.97, abs=1e-12)
