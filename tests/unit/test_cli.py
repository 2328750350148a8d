"""`megadrp <command>`: one command line over every entry point, and the older names kept."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megadrp.cli import COMMANDS

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def megadrp(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megadrp", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_usage_lists_every_command_and_unknown_ones_exit_2():
    p = megadrp("--help")
    assert p.returncode == 0 and all(f"  {name} " in p.stdout for name in COMMANDS)
    bad = megadrp("trian")
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr
    assert megadrp().returncode == 2


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_its_help(name):
    p = megadrp(name, "--help")
    assert p.returncode == 0 and f"megadrp {name}" in p.stdout, p.stderr[-1500:]


def test_train_user_error_is_one_line_and_exit_2(tmp_path):
    p = megadrp("train", "--config", str(tmp_path / "nope.yaml"), "--dry-run")
    assert p.returncode == 2 and "config file not found" in p.stderr and "Traceback" not in p.stderr


def test_shipped_recipe_by_name_from_any_directory(tmp_path):
    """configs/... and ds_configs/... resolve to the shipped files where no such path exists."""
    from megadrp.resources import resolve, shipped_dir

    assert resolve("configs/tiny/prune.yaml") == Path("configs/tiny/prune.yaml")  # the checkout's, here
    p = megadrp("train", "--config", "configs/tiny/prune.yaml", "--dry-run", "data_dir=/nowhere", cwd=tmp_path)
    assert p.returncode == 2 and "/nowhere/manifest.json: not found" in p.stderr, p.stderr[-1500:]
    assert (shipped_dir("ds_configs") / "zero3_bf16.json").is_file()


@pytest.mark.parametrize("old", [["-m", "megadrp.evaluate"], ["-m", "megadrp.demo"], ["-m", "megadrp.report"],
                                 ["data_tools/preprocess.py"], ["data_tools/train_tokenizer.py"],
                                 ["data_tools/inspect_data.py"], ["data_tools/merge_manifests.py"],
                                 ["data_tools/synth_corpus.py"], ["data_tools/debian_corpus.py"],
                                 ["megadrp/train.py"]])
def test_documented_older_commands_still_run(old):
    p = subprocess.run([sys.executable, *old, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr[-1500:]


def test_config_reference_is_generated_from_the_code_and_complete():
    from megadrp.tools.config_doc import render, undocumented

    assert undocumented() == [], "every config field needs a docstring under it (megadrp/config.py)"
    assert (ROOT / "docs" / "config.md").read_text() == render(), \
        "docs/config.md is stale: python -m megadrp.tools.config_doc --write"


def test_corruption_is_seeded_and_scores_intact_targets_only():
    import torch

    from megadrp.tools.evaluate import corrupt

    x = torch.arange(4 * 101).view(4, 101) % 1000
    same, keep = corrupt(x, 0.0, 1000, 1)
    assert torch.equal(same, x) and keep.all()
    a, keep_a = corrupt(x, 0.2, 1000, 7)
    b, keep_b = corrupt(x, 0.2, 1000, 7)
    assert torch.equal(a, b) and torch.equal(keep_a, keep_b)  # the same damage for every model
    changed = (a != x)[:, 1:]
    assert 0.1 < (~keep_a).float().mean() < 0.3 and not (changed & keep_a).any()  # a scored target is intact
