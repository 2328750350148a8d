"""Shared fixtures: a small embedded corpus, a tokenizer, shards and a tiny base model,
all made here (no downloads)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# Every training process the suite starts fails if it opens a test shard (tests/guard): no run
# reads the split results are reported on. What it opened is also recorded, and `run` checks.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests" / "guard"), os.environ.get("PYTHONPATH"))
                                           if p)
os.environ["MEGADRP_GUARD_TEST_SPLIT"] = "1"
GUARD_LOG = Path(tempfile.mkdtemp(prefix="megadrp-guard-")) / "test_split_opened.log"
os.environ["MEGADRP_GUARD_LOG"] = str(GUARD_LOG)


def pytest_sessionstart(session) -> None:
    """Start from a clean machine: what killed runs left (a build lock every DeepSpeed start
    would wait on forever, allreduce segments holding RAM in /dev/shm) goes first. Every
    training run does the same on its node; this covers the tests that start DeepSpeed in
    process and the memory the suite needs before the first run."""
    from megadrp.runtime import build_locks, shm_segments

    build_locks.pin_extensions_dir()  # the folder every training run of the suite builds its ops in
    shm_segments.clear_stale()
    build_locks.clear_stale()


def run(cmd: list[str], check: bool = True, env: dict | None = None, timeout: int = 600, cwd: Path = ROOT,
        ) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    p = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    opened = GUARD_LOG.read_text() if GUARD_LOG.is_file() else ""
    assert not opened, f"a training process opened the test split:\n{opened}"
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    run([PY, "data_tools/synth_corpus.py", "--out", str(out), "--docs-per-domain", "300", "--seed", "7"])
    return out


@pytest.fixture(scope="session")
def tokenizer(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tok"
    run([PY, "data_tools/train_tokenizer.py", "--input", *map(str, sorted(corpus.glob("*.jsonl"))),
         "--vocab-size", "1024", "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def data_dir(corpus, tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "data"
    inputs = [a for f in sorted(corpus.glob("*.jsonl")) for a in ("--input", f"{f.stem}={f}")]
    run([PY, "data_tools/preprocess.py", *inputs, "--tokenizer", str(tokenizer), "--out", str(out),
         "--workers", "2", "--eval-docs", "20", "--test-docs", "20"])
    return out


def tiny_llama_config(vocab: int = 1024, **kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                eos_token_id=2, bos_token_id=1)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    """A random tiny Llama saved with save_pretrained (what a user's HF checkpoint looks like)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base") / "hf"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(out)
    return out


def write_config(path: Path, **sections) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def tiny_run_config(tmp: Path, data_dir: Path, stage: str, run_name: str, **over) -> dict:
    cfg = {
        "run_dir": str(tmp / run_name), "data_dir": str(data_dir), "stage": stage, "seed": 3,
        "train": {"steps": 12, "global_batch": 8, "micro_batch": 2, "seq_len": 32, "lr": 3e-3,
                  "warmup_steps": 2, "num_workers": 2, "log_interval": 4},
        "eval": {"interval": 4, "tokens_per_domain": 512, "micro_batch": 4},
        "save": {"interval": 4, "keep": 3},
        "deepspeed": str(ROOT / "ds_configs/zero3_cpu.json"),
        "dro": {"mode": "drpruning", "reference_loss": "auto", "fit_start": 0.3, "history_start": 0.0},
        "wandb": {"mode": "disabled"},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    return cfg


def metrics(run_dir: Path, events: bool = False) -> list[dict]:
    """The evaluation records of a run's metrics.jsonl (with `events`, its `end` records too)."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return rows if events else [r for r in rows if "event" not in r]
