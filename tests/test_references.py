"""The method in its own configuration, end to end (issue #28): references from a model, laws that
are fitted and used, the sparsity each side of the pruning law takes, and masks that follow the
ramped target. One prune long enough to fit laws during the ramp (1 rank, ~30 s), then two short
continue stages from its export."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PY, metrics, run, tiny_run_config, write_config

from megadrp.dro.scaling_law import Fit, reference_prediction
from megadrp.engine.metrics import pruning_control

pytestmark = pytest.mark.slow
TARGET = {"num_hidden_layers": 2, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
          "intermediate_size": 64}
STEPS = 120


def _train(cfg: dict, tmp: Path) -> None:
    path = write_config(tmp / f"{Path(cfg['run_dir']).name}.yaml", **cfg)
    run([PY, "megadrp/train.py", "--config", str(path)], timeout=900)


@pytest.fixture(scope="module")
def long_prune(tmp_path_factory, data_dir, base_model):
    """The tiny recipe's pruning control (mask and λ lr 1.0, λ2 from 300, a 40% ramp after a
    10-step warmup) over 120 steps with an evaluation every 3: the history passes the 10 points a
    law needs at step 33, inside the ramp (it ends at step 48), where the expected and the ramped
    target sparsity differ."""
    tmp = tmp_path_factory.mktemp("long_prune")
    cfg = tiny_run_config(tmp, data_dir, "prune", "prune", model={"init": str(base_model)},
                          prune={"target": TARGET, "mask_lr": 1.0, "lambda_lr": 1.0, "lambda2_init": 300,
                                 "ramp_fraction": 0.4},
                          train={"steps": STEPS, "global_batch": 8, "micro_batch": 4, "seq_len": 32, "lr": 3e-3,
                                 "warmup_steps": 10, "num_workers": 1, "log_interval": 40},
                          eval={"interval": 3, "tokens_per_domain": 256, "micro_batch": 8},
                          save={"interval": 0, "keep": 1},
                          dro={"mode": "drpruning", "reference_loss": "auto", "fit_start": 0.25, "history_start": 0.0})
    _train(cfg, tmp)
    return tmp, cfg


def test_the_source_model_is_the_prunes_reference(long_prune, data_dir, base_model):
    """`auto` in a prune: the source model itself, unmasked, measured once before step 1 and
    cached: the same losses transformers gives the source on the same windows."""
    tmp, cfg = long_prune
    run_dir = Path(cfg["run_dir"])
    ref = json.loads((run_dir / "reference_losses.json").read_text())
    assert ref["role"] == "source" and ref["model"] == str(base_model)
    p = run([PY, "-m", "megadrp", "eval", "--model", str(base_model), "--data", str(data_dir), "--split", "eval",
             "--tokens-per-domain", "256", "--seq-len", "32"])
    hf = json.loads(p.stdout.strip().splitlines()[-1])["domain_loss"]
    names = ref["windows"]["domains"]
    assert np.allclose(ref["losses"], [hf[n] for n in names], rtol=1e-4)
    first = metrics(run_dir)[0]
    assert first["step"] == 0 and np.allclose([first["reference_loss"][n] for n in names], ref["losses"])


def test_laws_are_fitted_and_references_never_rise(long_prune):
    rows = metrics(Path(long_prune[1]["run_dir"]))
    fitted = [r for r in rows if r.get("controller") and any(r["controller"].get("fits", {}).values())]
    assert len(fitted) >= 10 and fitted[0]["step"] < STEPS * 0.4  # fitted inside the ramp too
    for name in rows[0]["eval_loss"]:
        first = next(i for i, r in enumerate(rows) if r["controller"]["fits"].get(name))
        ref = [r["reference_loss"][name] for r in rows[first:]]
        assert all(b <= a + 1e-12 for a, b in zip(ref, ref[1:])), (name, ref)


def test_predictions_use_the_ramped_target_sparsity(long_prune):
    """Each fitted domain's prediction is the mean of its top fits at D_final and s = the step's
    ramped target sparsity, clipped to the lowest loss seen: recomputed here from the logged fits.
    With the expected sparsity in its place the numbers differ, so swapping the two would fail."""
    rows = metrics(Path(long_prune[1]["run_dir"]))
    told_apart = 0
    for r in rows:
        for name, fits in (r.get("controller") or {}).get("fits", {}).items():
            if not fits:
                continue
            laws = [Fit(f["log_A"], f["b"], f["log_E"], f.get("b2")) for f in fits]
            lowest = min(x["eval_loss"][name] for x in rows if 0 < x["step"] <= r["step"])
            d_final = r["tokens"][name] * STEPS / r["step"]
            with_target = reference_prediction(laws, d_final, r["target_sparsity"], lowest)
            with_expected = reference_prediction(laws, d_final, r["expected_sparsity"], lowest)
            assert r["controller"]["predicted_loss"][name] == pytest.approx(with_target, rel=1e-9)
            told_apart += abs(with_target - with_expected) > 1e-6
    assert told_apart >= 5


def test_the_history_holds_the_expected_sparsity(long_prune):
    """The pruning law's points carry the model's expected sparsity (what the masks have
    removed), the prediction the ramped target: read back from the controller's checkpointed
    history, against the metrics of the same evaluations."""
    tmp, cfg = long_prune
    run_dir = Path(cfg["run_dir"])
    state = torch.load(run_dir / "checkpoints" / f"step{STEPS:08d}" / "megadrp_state.pt", weights_only=False)
    history = state["schedule"]["controller"]["state"]["history"][0]
    rows = [r for r in metrics(run_dir) if r["step"] > 0]
    assert len(history) == len(rows)
    for (tokens, _, sparsity), r in zip(history, rows):
        assert tokens == r["tokens"][list(r["tokens"])[0]] and sparsity == pytest.approx(r["expected_sparsity"])
    ramp = [(s, r) for (_, _, s), r in zip(history, rows) if r["step"] < STEPS * 0.4]
    assert sum(abs(s - r["target_sparsity"]) > 0.02 for s, r in ramp) >= 3  # the two really differ in the ramp


def test_the_expected_shape_follows_the_ramped_target(long_prune):
    """Issue #20's control goals, in a test-sized run: during the ramp the masks never lead the
    ramped target by more than a quarter of what a dimension must lose, and after it they stay
    within a tenth of the target (the exported shape is exact whatever happened before)."""
    control = pruning_control(metrics(Path(long_prune[1]["run_dir"])))
    assert set(control) == {"layers", "hidden", "heads", "intermediate"}
    for dim, c in control.items():
        assert c["ramp_overshoot"] <= 0.25 and c["post_ramp_deviation"] <= 0.10, (dim, c)


def _continue(tmp: Path, data_dir: Path, prune_dir: Path, name: str, top: dict | None = None, **dro) -> Path:
    """A short continue stage from `prune_dir`; `top` replaces whole top-level sections."""
    sections = {"train": {"steps": 4, "global_batch": 8, "micro_batch": 4, "seq_len": 32, "num_workers": 1},
                "eval": {"interval": 2, "tokens_per_domain": 256, "micro_batch": 8},
                "save": {"interval": 0, "keep": 1}, **(top or {})}
    cfg = tiny_run_config(tmp, data_dir, "continue", name, model={"init": str(prune_dir / "hf")},
                          dro={"mode": "drpruning", **dro}, **sections)
    _train(cfg, tmp)
    return Path(cfg["run_dir"])


def test_continue_recovers_toward_the_source_and_carries_the_mix(long_prune, data_dir, tmp_path):
    """`auto` in a continue stage: the source model's losses as the prune run measured them (the
    same windows), not the pruned model's own; `initial_proportion: carried`: the prune's last mix."""
    _, cfg = long_prune
    prune_dir = Path(cfg["run_dir"])
    source = json.loads((prune_dir / "reference_losses.json").read_text())
    out = _continue(tmp_path, data_dir, prune_dir, "carried", reference_loss="auto", initial_proportion="carried")
    rows = metrics(out)
    names = source["windows"]["domains"]
    assert np.allclose([rows[0]["reference_loss"][n] for n in names], source["losses"])
    assert not (out / "reference_losses.json").exists()  # read, not measured again
    pruned_first = [rows[0]["eval_loss"][n] for n in names]
    # what `auto` used to mean, the pruned model's own first losses, is another thing altogether
    assert min(abs(p - s) for p, s in zip(pruned_first, source["losses"])) > 0.05
    last_mix = [r for r in metrics(prune_dir) if r.get("weights")][-1]["weights"]
    assert np.allclose([rows[0]["weights"][n] for n in names], [last_mix[n] for n in names])


def test_domain_groups_regroup_a_data_dir_for_the_controller(long_prune, data_dir, tmp_path):
    """`domain_groups` over the same DATA_DIR: the controller's references, ratios and mix are per
    group (the source's per-domain losses and the prune's per-domain mix summed into groups), and
    the sampler splits each group's share among its members by their training tokens."""
    from megadrp.data.manifest import load_manifest

    _, cfg = long_prune
    prune_dir = Path(cfg["run_dir"])
    groups = {"text": ["prose", "lang2"], "rest": ["code", "dna", "math", "records"]}
    out = _continue(tmp_path, data_dir, prune_dir, "grouped", top={"domain_groups": groups},
                    reference_loss="auto", initial_proportion="carried")
    rows = metrics(out)
    source = json.loads((prune_dir / "reference_losses.json").read_text())
    src = dict(zip(source["windows"]["domains"], source["losses"]))
    tokens = {n: d.train_tokens for n, d in load_manifest(data_dir).domains.items()}
    last_mix = [r for r in metrics(prune_dir) if r.get("weights")][-1]["weights"]
    for g, members in groups.items():
        share = {n: tokens[n] / sum(tokens[m] for m in members) for n in members}
        assert rows[0]["reference_loss"][g] == pytest.approx(sum(share[n] * src[n] for n in members), rel=1e-9)
        assert rows[0]["weights"][g] == pytest.approx(sum(last_mix[n] for n in members), rel=1e-9)
        for r in rows:  # every mix in force: the group's share split by the members' tokens
            for n in members:
                assert r["domain_weights"][n] == pytest.approx(r["weights"][g] * share[n], rel=1e-9)
    assert set(rows[-1]["reference_ratio"]) == set(groups)
    assert rows[-1]["weights"] != pytest.approx(rows[0]["weights"], rel=1e-3)  # the controller moved it


def test_reference_from_a_given_model_is_measured_once(long_prune, data_dir, base_model, tmp_path):
    """`model:<dir>`: that model's losses on this stage's windows, measured on an engine of its own
    (ZeRO-3, no optimizer) before the training engine exists, and cached; the source's own here, so
    it must equal what the prune measured of it through its training engine."""
    _, cfg = long_prune
    prune_dir = Path(cfg["run_dir"])
    source = json.loads((prune_dir / "reference_losses.json").read_text())
    out = _continue(tmp_path, data_dir, prune_dir, "given", reference_loss=f"model:{base_model}")
    ref = json.loads((out / "reference_losses.json").read_text())
    assert ref["role"] == "reference" and ref["model"] == str(base_model)
    assert np.allclose(ref["losses"], source["losses"], rtol=1e-5)
    names = ref["windows"]["domains"]
    assert np.allclose([metrics(out)[0]["reference_loss"][n] for n in names], ref["losses"])


def test_distillation_recovers_toward_the_teacher_with_its_references(long_prune, data_dir, base_model, tmp_path):
    """A continue stage distilled from the source (α = 1, KL only; the teacher on a ZeRO-3 engine
    of its own) with `dro.reference_loss: teacher`: the teacher's losses, measured once through its
    engine, are the references; every evaluation reports the KL to the teacher per domain, every
    interval the training KL, and the student moves toward the teacher."""
    _, cfg = long_prune
    cfg2 = tiny_run_config(tmp_path, data_dir, "continue", "kd", model={"init": str(Path(cfg["run_dir"]) / "hf")},
                           train={"steps": 6, "global_batch": 8, "micro_batch": 4, "seq_len": 32, "num_workers": 1,
                                  "lr": 3e-3},
                           eval={"interval": 2, "tokens_per_domain": 256, "micro_batch": 8},
                           save={"interval": 0, "keep": 1},
                           distill={"teacher": str(base_model), "alpha": 1.0, "chunk_tokens": 48},
                           dro={"mode": "drpruning", "reference_loss": "teacher"})
    _train(cfg2, tmp_path)
    run_dir = Path(cfg2["run_dir"])
    ref = json.loads((run_dir / "reference_losses.json").read_text())
    assert ref["model"] == str(base_model) and ref["role"] == "reference"
    rows = metrics(run_dir)
    names = ref["windows"]["domains"]
    assert np.allclose([rows[0]["reference_loss"][n] for n in names], ref["losses"])
    assert all(set(r["eval_kd"]) == set(names) for r in rows) and all(r.get("kd_loss", 0) > 0 for r in rows[1:])
    mean_kd = [np.mean(list(r["eval_kd"].values())) for r in rows]
    assert mean_kd[-1] < mean_kd[0]


def test_a_teacher_with_another_vocabulary_is_refused_before_any_compute(long_prune, data_dir, tmp_path):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(tiny_llama_config(vocab=512)).save_pretrained(other)
    _, cfg = long_prune
    cfg2 = tiny_run_config(tmp_path, data_dir, "continue", "bad", model={"init": str(Path(cfg["run_dir"]) / "hf")},
                           distill={"teacher": str(other)})
    path = write_config(tmp_path / "bad.yaml", **cfg2)
    p = run([PY, "megadrp/train.py", "--config", str(path), "--dry-run"], check=False)
    assert p.returncode == 2 and "vocab_size 512 differs from the student's 1024" in p.stderr, p.stderr[-2000:]


def test_a_training_loss_signal_with_sparse_adaptive_evaluation(long_prune, data_dir, tmp_path):
    """`dro.signal: train` (#40): the controller weighs each interval's mean training loss against
    the source's losses measured on training windows (the same basis); the held-out evaluation
    runs at every 3rd update and the last, each domain scored until its standard error is at most
    the target (`tokens_per_domain: auto`); the cost ledger counts exactly those evaluations."""
    _, cfg = long_prune
    prune_dir = Path(cfg["run_dir"])
    out = _continue(tmp_path, data_dir, prune_dir, "train_signal", reference_loss="auto", signal="train",
                    top={"train": {"steps": 24, "global_batch": 8, "micro_batch": 4, "seq_len": 32, "num_workers": 1},
                         "eval": {"interval": 3, "held_out_every": 3, "tokens_per_domain": "auto", "micro_batch": 8,
                                  "min_tokens_per_domain": 64, "max_tokens_per_domain": 512, "target_se": 0.05}})
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    held = [r["step"] for r in rows if r["eval_loss"] is not None]
    assert held == [0, 9, 18, 24]
    assert all(r["controller"] and r["controller"]["from_step"] == r["step"] for r in rows[1:])  # every update decides
    ref = json.loads((out / "reference_losses.json").read_text())
    assert ref["windows"]["split"] == "train" and ref["model"] == json.loads(
        (prune_dir / "reference_losses.json").read_text())["model"]  # the source, measured again on train windows
    names = ref["windows"]["domains"]
    assert np.allclose([rows[1]["reference_loss"][n] for n in names], ref["losses"])
    for r in rows:
        if r["eval_loss"] is not None:
            for n in names:
                w, se = r["eval_windows"][n], r["eval_se"][n]
                assert w in (2, 4, 8, 16) and (se <= 0.05 or w == 16), (r["step"], n, w, se)
    cost = json.loads((out / "cost.json").read_text())
    assert cost["held_out_evaluations"] == len(held) and set(cost["flops"]) == {"train", "eval", "reference"}
