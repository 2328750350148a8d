"""Unit tests of the training components, each on its own, in one process (a one-rank gloo
group where a component needs collectives). `pytest -m unit` runs these in well under a
minute; the end-to-end tests in tests/ run the same components together."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megadrp.config import Config, DROConfig, EvalConfig, TrainConfig
from megadrp.data.mixture import BatchLayout
from megadrp.dro.controller import ControllerSettings
from megadrp.engine import checkpoint
from megadrp.engine.domain_schedule import DomainSchedule
from megadrp.engine.metrics import MetricsLog
from megadrp.engine.optim import cosine_lr, param_groups
from megadrp.engine.train_state import TrainState
from megadrp.errors import ConfigError
from megadrp.plan import RunPlan, per_domain
from megadrp.runtime import build_locks
from megadrp.runtime.faults import Faults
from megadrp.runtime.launch import free_port
from megadrp.runtime.run_dir import RunDir

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gloo():
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    # left initialised: other modules of the session may use it too


def _plan(tmp: Path, lag: int = 0, mode: str = "dro") -> RunPlan:
    names = ["a", "b", "c"]
    cfg = Config(run_dir=str(tmp), data_dir=str(tmp), stage="continue", seed=5,
                 train=TrainConfig(steps=40, global_batch=8, micro_batch=2),
                 eval=EvalConfig(interval=10), dro=DROConfig(mode=mode, update_lag=lag, reference_loss=[1.0, 1.0, 1.0]))
    return RunPlan(cfg=cfg, manifest=None, domains=tuple(SimpleNamespace(name=n) for n in names),
                   layout=BatchLayout(8, 2, 1, 0), model_config=None, target=None, ramp_steps=1, ds_config={},
                   p0=np.array([0.5, 0.3, 0.2]), reference_loss=[1.0, 1.0, 1.0])


# ---- DomainSchedule ---------------------------------------------------------------------
def test_schedule_lag0_decides_for_the_next_interval(gloo, tmp_path):
    s = DomainSchedule(_plan(tmp_path), 0, RunDir(tmp_path).controller_pid, Faults())
    s.start(evaluation_at_start=True)
    try:
        d, waited = s.observe(0, np.array([2.0, 1.0, 1.0]), np.zeros(3))
        assert d is not None and d.step == 0 and waited >= 0
        assert np.allclose(s.table.weights_at(1), [0.5, 0.3, 0.2])  # no decision at step 0
        for step in range(1, 11):
            s.draw(step)
        d, _ = s.observe(10, np.array([2.0, 1.0, 1.0]), np.full(3, 1e3))
        assert d.step == 10 and d.q[0] > 0.5  # domain a is above its reference
        assert np.allclose(s.table.weights_at(10), [0.5, 0.3, 0.2])  # step 10 already trained on p0
        assert np.allclose(s.table.weights_at(11), d.q) and np.allclose(s.weights_after(10), d.q)
        assert s.sampler.step == 10
    finally:
        s.close()


def test_schedule_lag1_defers_by_one_interval(gloo, tmp_path):
    s = DomainSchedule(_plan(tmp_path, lag=1), 0, RunDir(tmp_path).controller_pid, Faults())
    s.start(evaluation_at_start=False)
    try:
        assert np.allclose(s.table.weights_at(10), [0.5, 0.3, 0.2])  # promised without any evaluation
        d, _ = s.observe(10, np.array([2.0, 1.0, 1.0]), np.full(3, 1e3))
        assert d is None and np.allclose(s.table.weights_at(20), [0.5, 0.3, 0.2])
        d, _ = s.observe(20, np.array([2.0, 1.0, 1.0]), np.full(3, 2e3))
        assert d.step == 10 and np.allclose(s.table.weights_at(21), d.q)
    finally:
        s.close()


def test_schedule_state_round_trip(gloo, tmp_path):
    a = DomainSchedule(_plan(tmp_path), 0, RunDir(tmp_path).controller_pid, Faults())
    a.start(evaluation_at_start=False)
    for step in range(1, 11):
        a.draw(step)
    a.observe(10, np.array([2.0, 1.0, 1.0]), np.full(3, 1e3))
    saved = copy.deepcopy(a.state_dict())
    a.close()
    b = DomainSchedule(_plan(tmp_path), 0, RunDir(tmp_path).controller_pid, Faults())
    b.load_state_dict(saved)
    b.start()
    try:
        assert b.sampler.step == 10 and b.sampler.counts.tolist() == saved["sampler"]["counts"]
        assert np.allclose(b.table.weights_at(11), a.table.weights_at(11, wait=False))
    finally:
        b.close()


# ---- TrainState -------------------------------------------------------------------------
def test_train_state_round_trip_and_skips():
    st = TrainState(3)
    assert st.finish_step(np.array([2.0, 0.0, 3.0]), np.array([1.0, 0.0, 2.0]), 128, bad=False) == pytest.approx(5 / 3)
    assert st.tokens.tolist() == [128, 0, 256] and np.isnan(st.ema[1])
    assert st.finish_step(np.zeros(3), np.zeros(3), 128, bad=True) is None
    assert (st.bad_total, st.bad_run) == (1, 1)
    st.step = 7
    other = TrainState(3)
    other.load_state_dict(json.loads(json.dumps(st.state_dict())))
    assert other.step == 7 and other.tokens.tolist() == st.tokens.tolist() and other.bad_total == 1
    assert np.array_equal(np.isnan(other.ema), np.isnan(st.ema))


# ---- run plan, lr, parameter groups -------------------------------------------------------
def test_batch_layout_fits_every_node_count():
    from megadrp.plan import fit_layout

    # The 7B prune recipe: global 32, micro 4. 8 ranks: 4 × 1; 16 ranks: 2 each; 32: 1 each.
    assert (fit_layout(32, 4, 8, 0).micro_batch, fit_layout(32, 4, 8, 0).accumulation) == (4, 1)
    assert (fit_layout(32, 4, 16, 3).micro_batch, fit_layout(32, 4, 16, 3).accumulation) == (2, 1)
    assert fit_layout(32, 4, 32, 0).micro_batch == 1
    assert (fit_layout(256, 4, 64, 0).micro_batch, fit_layout(256, 4, 64, 0).accumulation) == (4, 1)
    assert fit_layout(24, 4, 4, 0).micro_batch == 3  # 6 a rank: the largest divisor ≤ 4
    with pytest.raises(ConfigError, match="cannot be split evenly over 64 ranks"):
        fit_layout(32, 4, 64, 0)
    with pytest.raises(ConfigError, match="over 3 ranks"):
        fit_layout(32, 4, 3, 0)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_recipes_run_on_the_node_counts_the_readme_states(recipe):
    """README "Running on a cluster": prune recipes (global batch 32) on 1, 2 or 4 nodes of 8
    GPUs, 8 nodes refused before anything starts; continued pretraining (256) on 1 to 32 nodes."""
    from megadrp.config import load_config
    from megadrp.plan import fit_layout

    t = load_config(str(ROOT / "configs" / recipe), []).train
    supported = (1, 2, 4) if t.global_batch == 32 else (1, 2, 4, 8, 16, 32)
    assert t.global_batch in (32, 256), recipe
    for nodes in supported:
        lay = fit_layout(t.global_batch, t.micro_batch, 8 * nodes, 0)
        assert lay.micro_batch * lay.accumulation * 8 * nodes == t.global_batch
    with pytest.raises(ConfigError, match="cannot be split evenly"):
        fit_layout(t.global_batch, t.micro_batch, 8 * supported[-1] * 2, 0)


def test_per_domain_errors():
    assert per_domain({"b": 2, "a": 1}, "k", ["a", "b"]) == [1.0, 2.0]
    assert per_domain("auto", "k", ["a"]) is None
    with pytest.raises(ConfigError, match="no entry for domain 'b'"):
        per_domain({"a": 1}, "dro.reference_loss", ["a", "b"])
    with pytest.raises(ConfigError, match="3 values for 2 domains"):
        per_domain([1, 2, 3], "dro.initial_proportion", ["a", "b"])


def test_cosine_lr_and_param_groups():
    assert cosine_lr(5, 1.0, 100, 10, 0.1) == pytest.approx(0.5)
    assert cosine_lr(10, 1.0, 100, 10, 0.1) == pytest.approx(1.0)
    assert cosine_lr(100, 1.0, 100, 10, 0.1) == pytest.approx(0.1)
    from transformers import LlamaConfig

    from megadrp.model.llama import MaskedLlama
    from megadrp.model.masks import Shape

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=8)
    groups = param_groups(MaskedLlama(cfg, Shape(1, 8, 2, 2, 4), 1), 1e-3, 0.1, 0.5, 0.4)
    by = {g["name"]: g for g in groups}
    assert list(by) == ["weights", "masks", "lambdas"]
    assert by["masks"]["weight_decay"] == by["lambdas"]["weight_decay"] == 0.0 and by["weights"]["weight_decay"] == 0.1
    assert len(by["masks"]["params"]) == 3 and len(by["lambdas"]["params"]) == 1  # layer, intermediate, hidden


def test_every_dro_key_reaches_the_controller():
    """A DROConfig field that neither reaches ControllerSettings nor is used by the engine
    itself would be a key that silently does nothing."""
    engine_side = {"initial_proportion", "reference_loss", "signal", "update_lag"}
    settings = {f.name for f in dataclasses.fields(ControllerSettings)}
    for f in dataclasses.fields(DROConfig):
        assert f.name in settings or f.name in engine_side, f.name
    s = ControllerSettings.from_config(DROConfig(rho=0.3, max_points=7), domains=["a"], p0=[1.0], total_steps=1,
                                       reference_loss=None)
    assert s.rho == 0.3 and s.max_points == 7


# ---- checkpoints and metrics -------------------------------------------------------------
def test_complete_checkpoints_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((4, True), (8, True), (12, False)):
        d = root / checkpoint.tag_of(step)
        d.mkdir(parents=True)
        if complete:
            (d / checkpoint.STATE_FILE).write_bytes(b"x")
    (root / ".tmp-step00000016").mkdir()
    assert [s for s, _ in checkpoint.complete_checkpoints(root)] == [4, 8]
    assert checkpoint.latest(root) == root / "step00000008"
    assert checkpoint.latest(tmp_path / "none") is None


def test_metrics_log_truncates_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, None)
    for step in range(0, 25, 5):
        log.write({"step": step})
    MetricsLog(path, 10)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 5, 10]
    MetricsLog(path, None)
    assert not path.exists()


def test_faults_from_env():
    f = Faults.from_env({"MEGADRP_FAULT_NAN_STEPS": "3, 7", "MEGADRP_FAULT_SIGNAL_AT": "6"})
    assert f.nan_steps == {3, 7} and f.signal_at == 6 and f.kill_in_save == 0
    assert Faults.from_env({}) == Faults()


# ---- a skipped step is skipped ------------------------------------------------------------
def test_shipped_bf16_config_builds_torch_adamw_and_fp32_gradients(gloo):
    """ds_configs/zero3_bf16.json, as the run plan resolves it, on a real ZeRO-3 engine: torch's
    fused AdamW (no DeepSpeed op is compiled), gradients accumulated in an fp32 partition, the
    reduce bucket d². On a GPU node without nvcc this config starts where FusedAdam would not."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    import deepspeed
    from transformers import LlamaConfig

    from megadrp.memory_plan import fill_auto
    from megadrp.model.llama import MaskedLlama

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=8)
    ds = fill_auto(json.loads((ROOT / "ds_configs" / "zero3_bf16.json").read_text()), cfg.hidden_size)
    ds["optimizer"]["params"].update(lr=1e-3)
    ds.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    torch.manual_seed(0)
    model = MaskedLlama(cfg)
    model.init_weights()
    with build_locks.watch():
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    opt = engine.optimizer
    assert type(opt.optimizer) is torch.optim.AdamW and opt.optimizer.defaults["fused"] is True
    assert opt.grad_partitions_flat_buffer.dtype == torch.float32
    assert opt.reduce_bucket_size == 16 * 16
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))
    before = opt.fp32_partitioned_groups_flat[0].detach().clone()
    engine.backward(engine(ids[:, :-1], ids[:, 1:]).losses.mean())
    engine.step()
    assert not torch.equal(before, opt.fp32_partitioned_groups_flat[0])  # the step ran


def test_non_finite_step_leaves_optimizer_state_unchanged(gloo):
    """The engine backpropagates a non-finite loss as it is; ZeRO-3 sees a non-finite gradient
    norm and skips the step: weights, Adam's moments and its step count stay as they were."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    import deepspeed
    from transformers import LlamaConfig

    from megadrp.model.llama import MaskedLlama

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    model = MaskedLlama(cfg)
    model.init_weights()
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 3},
          # as ds_configs/zero3_cpu.json: torch's AdamW (DeepSpeed's FusedAdam is a JIT build on CPU)
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    with build_locks.watch():  # DeepSpeed JIT-loads its shared-memory allreduce op here
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))

    def step(nan: bool) -> None:
        loss = engine(ids[:, :-1], ids[:, 1:]).losses.mean()
        engine.backward(loss * float("nan") if nan else loss)
        engine.step()

    def snapshot() -> dict:
        opt = engine.optimizer
        out = {f"fp32.{i}": t.detach().clone() for i, t in enumerate(opt.fp32_partitioned_groups_flat)}
        for i, t in enumerate(opt.fp32_partitioned_groups_flat):
            for k, v in opt.optimizer.state[t].items():
                out[f"state.{i}.{k}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(float(v))
        return out

    step(False)
    before = snapshot()
    assert any(k.endswith("exp_avg") for k in before)
    step(True)
    assert engine.optimizer.overflow
    after = snapshot()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    step(False)  # and training goes on from there
    assert not engine.optimizer.overflow and not torch.equal(before["fp32.0"], snapshot()["fp32.0"])


def test_checkpoint_problem_names_what_a_rank_cannot_load(tmp_path):
    d = tmp_path / "step00000008"
    d.mkdir()
    for r in (0,):  # rank 1's partition files are missing
        (d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"x")
        (d / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    torch.save({"train": {}, "world_size": 2}, d / checkpoint.STATE_FILE)
    assert checkpoint.problem(d, 0, 2) is None
    assert "files of rank 1 are missing" in checkpoint.problem(d, 1, 2)
    (d / checkpoint.STATE_FILE).write_bytes(b"\x80\x02truncated")
    assert "cannot be read" in checkpoint.problem(d, 0, 2)


def test_prediction_accuracy_by_hand():
    """The prediction made at the last evaluation no later than 25/50/75% of the stage against
    the stage's final eval loss; fractions before the first fitted law are left out."""
    from megadrp.engine.metrics import prediction_accuracy
    from megadrp.tools.report import prediction_table

    def row(step, loss, pred=None):
        return {"step": step, "eval_loss": {"a": loss, "b": 2 * loss},
                "controller": {"predicted_loss": pred or {"a": None, "b": None}}}

    rows = [row(0, 4.0), row(20, 3.5), row(40, 3.0, {"a": 2.2, "b": None}), row(60, 2.8, {"a": 1.9, "b": 4.4}),
            row(80, 2.6, {"a": 2.0, "b": 4.0}), row(100, 2.0)]
    acc = prediction_accuracy(rows)
    assert list(acc) == ["50%", "75%"]  # nothing fitted by step 25
    assert acc["50%"]["step"] == 40 and acc["50%"]["per_domain"] == {"a": pytest.approx(10.0)}
    assert acc["75%"]["step"] == 60 and acc["75%"]["mape"] == pytest.approx((5.0 + 10.0) / 2)
    assert "| prune | 75% (step 60) | 7.50% |" in prediction_table({"prune": rows})
    assert prediction_accuracy([row(0, 4.0), row(10, 3.0)]) == {} and prediction_table({"x": [row(0, 1.0)]}) == ""
