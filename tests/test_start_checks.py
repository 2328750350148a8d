"""A clean dry run means the run starts (#43): every refusal of a start comes from the one function
both call (megadrp/engine/startup.py), so the dry run and the run exit 2 with the same line; and a
resume refuses settings it may not change, naming each, before anything loads."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PY, run, tiny_llama_config, tiny_run_config, write_config

pytestmark = pytest.mark.slow
PREFIXES = ("train: dry run: ", "train: error (rank 0): ", "train: config error: ", "train: ")


def _refusal(stderr: str) -> str:
    line = [ln for ln in stderr.splitlines() if ln.startswith("train:")][-1]
    return next(line[len(p):] for p in PREFIXES if line.startswith(p))


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _case(name: str, tmp: Path, data_dir: Path, base_model: Path):
    """(config, extra flags, what the line must say) of one bad start; builds what it needs."""
    data = tmp / "data"
    if not data.exists():
        shutil.copytree(data_dir, data)
    cfg = tiny_run_config(tmp, data, "prune", name, model={"init": str(base_model)},
                          prune={"target": {"num_hidden_layers": 2, "hidden_size": 48, "num_attention_heads": 2,
                                            "num_key_value_heads": 1, "intermediate_size": 64}})
    extra: list[str] = []
    if name == "truncated_train_shard":
        cut = tmp / "cut"
        shutil.copytree(data_dir, cut)
        bin_ = cut / "code_train.bin"
        bin_.write_bytes(bin_.read_bytes()[: bin_.stat().st_size // 2])
        cfg["data_dir"] = str(cut)
        needle = "domain 'code', train split"
    elif name == "missing_eval_shard":
        gone = tmp / "gone"
        shutil.copytree(data_dir, gone)
        (gone / "math_eval.idx").unlink()
        cfg["data_dir"] = str(gone)
        needle = "domain 'math', eval split"
    elif name == "model_without_weights":
        bare = tmp / "bare"
        bare.mkdir()
        shutil.copy(base_model / "config.json", bare / "config.json")
        cfg["model"]["init"] = str(bare)
        needle = "model.init: "
    elif name == "reference_of_another_vocabulary":
        from transformers import LlamaForCausalLM

        small = tmp / "small_vocab"
        torch.manual_seed(0)
        LlamaForCausalLM(tiny_llama_config(vocab=64)).save_pretrained(small)
        cfg["dro"]["reference_loss"] = f"model:{small}"
        needle = "reach past the model's vocab_size 64"
    elif name == "bad_time_limit":
        extra = ["--time-limit", "soon"]
        needle = "--time-limit"
    elif name == "resume_path_that_is_no_checkpoint":
        cfg["resume"] = str(tmp / "nowhere")
        needle = "cannot"
    elif name == "run_dir_is_a_file":
        f = tmp / "a_file"
        f.write_text("x")
        cfg["run_dir"] = str(f)
        needle = "a file, not a directory"
    else:
        raise AssertionError(name)
    return cfg, extra, needle


CASES = ["truncated_train_shard", "missing_eval_shard", "model_without_weights", "reference_of_another_vocabulary",
         "bad_time_limit", "resume_path_that_is_no_checkpoint", "run_dir_is_a_file"]


@pytest.mark.parametrize("name", CASES)
def test_the_dry_run_refuses_what_the_run_refuses_with_the_same_line(name, tmp_path, data_dir, base_model, capsys):
    """The dry run in process (what `megadrp train --dry-run` runs), the run as a real start."""
    from megadrp.train import main

    cfg, extra, needle = _case(name, tmp_path, data_dir, base_model)
    path = write_config(tmp_path / "run.yaml", **cfg)
    before = _digest(tmp_path)
    rc = main(["--config", str(path), "--dry-run", *extra])
    dry = capsys.readouterr().err
    real = run([PY, "megadrp/train.py", "--config", str(path), *extra], check=False, timeout=900)
    assert rc == real.returncode == 2, (dry[-1500:], real.stderr[-1500:])
    assert "Traceback" not in dry + real.stderr
    assert _refusal(dry) == _refusal(real.stderr) and needle in _refusal(dry), (_refusal(dry), _refusal(real.stderr))
    assert _digest(tmp_path) == before  # nothing was written or changed


def test_a_resume_refuses_settings_it_may_not_change(tmp_path, data_dir, base_model):
    """World size and steps may change on a resume; another global batch, sequence length or
    DATA_DIR, or another model, is refused before anything loads, each key with both values, by
    the dry run and the run alike; config.yaml and the checkpoint stay as they were."""
    cfg = tiny_run_config(tmp_path, data_dir, "continue", "run", model={"init": str(base_model)},
                          train={"steps": 4, "global_batch": 8, "micro_batch": 2, "seq_len": 32, "num_workers": 0},
                          save={"interval": 4, "keep": 1})
    path = write_config(tmp_path / "run.yaml", **cfg)
    run([PY, "megadrp/train.py", "--config", str(path)], timeout=600)
    run_dir = Path(cfg["run_dir"])
    kept = _digest(run_dir)
    moved = tmp_path / "data2"
    shutil.copytree(data_dir, moved)
    bad = ["train.global_batch=16", "train.seq_len=16", f"data_dir={moved}"]
    for flags in (["--dry-run"], []):
        p = run([PY, "megadrp/train.py", "--config", str(path), *bad, *flags], check=False, timeout=300)
        line = _refusal(p.stderr)
        assert p.returncode == 2 and "the checkpoint was made with other settings" in line, p.stderr[-1500:]
        for key in ("train.global_batch: 8 → 16", "train.seq_len: 32 → 16", "data_dir: "):
            assert key in line, (key, line)
    assert _digest(run_dir) == kept
    ok = run([PY, "megadrp/train.py", "--config", str(path), "train.steps=6", "--dry-run"])  # steps may grow
    assert "resume: from" in ok.stdout
    meta = json.loads((run_dir / "hf" / "megadrp.json").read_text())
    assert "tokenizer_fingerprint" in meta


def test_a_fingerprint_reads_the_tokenizer_files_not_the_model_type(tmp_path, tokenizer):
    """A model folder's config.json makes transformers pick the tokenizer class by model_type (a
    Llama tokenizer beside a Qwen2 config loads as Qwen2's, a padding token added): the
    fingerprint of the folder is still the fingerprint of the files the data was made with."""
    from megadrp.data.tokenizer import fingerprint_of
    from megadrp.model.hf_io import tokenizer_files

    folder = tmp_path / "export"
    folder.mkdir()
    for f in tokenizer_files(tokenizer):
        shutil.copy(f, folder / f.name)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                                                   "vocab_size": 1024}))
    assert fingerprint_of(folder) == fingerprint_of(tokenizer) is not None
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text().replace('"<unk>"', '"<unk2>"', 1))
    assert fingerprint_of(folder) != fingerprint_of(tokenizer)
