"""Config: YAML → typed config, overrides, and errors that name the key."""
from __future__ import annotations

import pytest
from conftest import ROOT

from megadrp.config import load_config
from megadrp.errors import ConfigError


def test_recipes_load():
    for f in sorted((ROOT / "configs").rglob("*.yaml")):
        cfg = load_config(f)
        assert cfg.stage in ("pretrain", "prune", "continue")


def test_overrides_and_types(tmp_path):
    cfg = load_config(ROOT / "configs/tiny/prune.yaml", ["train.steps=7", "dro.mode=sheared", "train.lr=0.5",
                                                         "dro.reference_loss=[1, 2]"])
    assert cfg.train.steps == 7 and cfg.dro.mode == "sheared" and cfg.train.lr == 0.5
    assert cfg.dro.reference_loss == [1.0, 2.0]


@pytest.mark.parametrize("override,msg", [
    ("train.stepz=3", "unknown config key train.'stepz'"),
    ("train.steps=many", "'train.steps': expected an integer"),
    ("dro.mode=best", "'dro.mode': 'best' is not one of"),
    ("eval.interval=0", "eval.interval=0 must be at least 1"),
    ("model.init=null", "needs model.init"),
    ("bogus=1", "unknown config key 'bogus'"),
    # values that used to fail late (after the model was built) or never
    ("train.log_interval=0", "train.log_interval=0 must be at least 1"),
    ("eval.micro_batch=0", "eval.micro_batch=0 must be at least 1"),
    ("train.num_workers=-1", "train.num_workers=-1 must not be negative"),
    ("seed=-1", "seed=-1 must not be negative"),
    ("train.micro_batch=64", "train.micro_batch=64 is larger than train.global_batch=16"),
    ("train.lr=.inf", "train.lr=inf must be a positive finite number"),
    ("dro.rho=-1", "dro.rho=-1.0 must be a positive finite number"),
    ("dro.rho=0", "dro.rho=0.0 must be a positive finite number"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio=2.0 must lie in [0, 1]"),
    ("dro.reference_loss=[1, .nan, 2, 2, 2, 2]", "dro.reference_loss holds nan"),
    ("prune.lambda2_init=-5", "prune.lambda2_init=-5.0 must be a finite number ≥ 0"),
])
def test_bad_keys_are_named(override, msg):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny/prune.yaml", [override])
    assert msg in str(e.value).replace('"', "'")
    assert "prune.yaml" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")


def test_yaml_error_inside_an_override_names_it():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny/prune.yaml", ["train.steps=["])
    assert "override 'train.steps=['" in str(e.value) and "not valid YAML" in str(e.value)
