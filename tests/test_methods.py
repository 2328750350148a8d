"""Pruning methods side by side (#39): the one-shot baselines (Minitron, ShortGPT) export the
family's own class with the target shape, on 1 and 2 ranks alike; domain-robust importance keeps
a unit one domain needs; the importance warm start of the learned masks; bad targets refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PY, metrics, run, tiny_run_config, write_config

pytestmark = pytest.mark.slow
TARGET = {"num_hidden_layers": 2, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
          "intermediate_size": 64}
DEPTH = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128}  # the base's width: depth only


def _cfg(tmp: Path, data_dir: Path, base_model: Path, name: str, target: dict, **prune) -> dict:
    return tiny_run_config(tmp, data_dir, "prune", name, model={"init": str(base_model)},
                           prune={"target": target, "calibration_tokens": 256, **prune},
                           eval={"interval": 4, "tokens_per_domain": 256, "micro_batch": 4})


def _train(cfg: dict, tmp: Path, ranks: int = 1, check: bool = True, extra=()):
    from test_train import train

    return train(cfg, tmp, ranks, check=check, extra=extra)


@pytest.fixture(scope="module")
def one_shot_runs(tmp_path_factory, data_dir, base_model) -> dict[tuple[str, int], Path]:
    """Each one-shot method on 1 and on 2 ranks (the warm start's test reads minitron's too)."""
    tmp = tmp_path_factory.mktemp("one_shot")
    out = {}
    for method, target in (("minitron", TARGET), ("shortgpt", DEPTH)):
        for ranks in (1, 2):
            cfg = _cfg(tmp, data_dir, base_model, f"{method}{ranks}", target, method=method)
            _train(cfg, tmp, ranks)
            out[method, ranks] = Path(cfg["run_dir"])
    return out


@pytest.mark.parametrize("method,target", [("minitron", TARGET), ("shortgpt", DEPTH)])
def test_one_shot_exports_the_target_on_one_and_two_ranks(method, target, one_shot_runs, data_dir):
    """No training step: the export is the family's own class with the target shape, its
    evaluation (transformers) equals the masked model's, and 2 ranks keep the units 1 rank keeps."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    kept = {}
    for ranks in (1, 2):
        run_dir = one_shot_runs[method, ranks]
        row = metrics(run_dir)[0]
        assert row["method"] == method and row["world_size"] == ranks and row["train_seconds"] == 0.0
        model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
        c = model.config
        assert type(model) is LlamaForCausalLM
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                c.intermediate_size) == tuple(target.values())
        p = run([PY, "-m", "megadrp", "eval", "--model", str(run_dir / "hf"), "--data", str(data_dir),
                 "--split", "eval", "--tokens-per-domain", "256", "--seq-len", "32"])
        ev = json.loads(p.stdout.strip().splitlines()[-1])["domain_loss"]
        for d, v in row["eval_loss"].items():
            assert abs(ev[d] - v) / v < 1e-4, (d, ev[d], v)
        scores = json.loads((run_dir / "importance.json").read_text())["combined"]
        kept[ranks] = (scores, {k: v.tolist() for k, v in model.state_dict().items()})
        assert json.loads((run_dir / "hf" / "megadrp.json").read_text())["method"] == method
    np.testing.assert_allclose(kept[1][0]["intermediate"], kept[2][0]["intermediate"], rtol=1e-6)
    assert kept[1][1].keys() == kept[2][1].keys()
    for k in kept[1][1]:  # the same units kept: the same weights exported
        np.testing.assert_allclose(np.asarray(kept[1][1][k]), np.asarray(kept[2][1][k]), rtol=1e-6, err_msg=k)


def test_importance_warm_start_sets_the_masks_the_one_shot_prune_keeps(one_shot_runs, tmp_path, data_dir,
                                                                       base_model):
    """`prune.init: importance`: log α starts high on the units a one-shot minitron prune keeps and
    init_gap lower on the rest; with masks that barely move (a tiny mask lr), the export keeps
    exactly those units."""
    cfg = _cfg(tmp_path, data_dir, base_model, "warm", TARGET, init="importance", init_gap=3.0, mask_lr=1e-4,
               lambda_lr=1e-4)
    cfg["train"]["steps"] = 4
    _train(cfg, tmp_path)
    row0 = metrics(Path(cfg["run_dir"]))[0]
    assert row0.get("calibrate_seconds", 0) > 0
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(one_shot_runs["minitron", 1] / "hf").state_dict()
    b = AutoModelForCausalLM.from_pretrained(Path(cfg["run_dir"]) / "hf").state_dict()
    # the same units survive: the LM head's columns (sliced, never scaled by a mask) are the same
    # hidden dimensions, and the down projections' rows and columns the same channels (up to 4
    # steps of training and the folded mask values); other units would be uncorrelated weights
    for key in ("lm_head.weight", "model.layers.0.mlp.gate_proj.weight"):
        assert a[key].shape == b[key].shape, key
        corr = torch.corrcoef(torch.stack([a[key].flatten(), b[key].flatten()]))[0, 1]
        assert corr > 0.9, (key, corr)


@pytest.mark.parametrize("over,needle", [
    ({"method": "shortgpt", "target": TARGET}, "prune.target.hidden_size=48: prune.method=shortgpt removes whole layers"),
    ({"method": "minitron", "target": {**TARGET, "num_attention_heads": 3}}, "heads are pruned in whole key/value"),
    ({"method": "minitron", "target": TARGET, "calibration_tokens": 10**9}, "prune.calibration_tokens=1,000,000,000"),
    ({"method": "minitron", "target": TARGET, "init": "importance"}, "prune.init=importance warm-starts learned masks"),
])
def test_unreachable_one_shot_settings_exit_2_naming_the_key(over, needle, tmp_path, data_dir, base_model, capsys):
    """The dry run refuses each (in process); the run's start makes the same plan, shown for the
    first by a real start."""
    from megadrp.train import main

    first = over.get("method") == "shortgpt"
    cfg = _cfg(tmp_path, data_dir, base_model, "bad", over.pop("target"), **over)
    path = write_config(tmp_path / "bad.yaml", **cfg)
    assert main(["--config", str(path), "--dry-run"]) == 2
    assert needle in capsys.readouterr().err
    if first:
        p = _train(cfg, tmp_path, check=False)
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr[-1500:]
    assert not (tmp_path / "bad" / "hf").exists()


def test_importance_outside_a_prune_stage_is_refused(tmp_path, data_dir, base_model, capsys):
    from megadrp.train import main

    cfg = tiny_run_config(tmp_path, data_dir, "continue", "c", model={"init": str(base_model)},
                          prune={"init": "importance"})
    assert main(["--config", str(write_config(tmp_path / "c.yaml", **cfg)), "--dry-run"]) == 2
    assert "prune.init=importance needs stage: prune" in capsys.readouterr().err
