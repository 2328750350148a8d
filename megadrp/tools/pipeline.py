"""Running the stages as a user would, from Python: data preparation and training stages as
subprocesses (training under the DeepSpeed launcher). Shared by `megadrp demo` and the
benchmarks. A stage whose run directory is done (status `done`, an exported model) is
reused, so reruns only do what is missing.

Every command is found through the installed package (`python -m megadrp <command>`, the
trainer's own file), never through paths of a checkout, so this runs from any directory.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from megadrp.data.manifest import load_manifest
from megadrp.runtime.files import read_json
from megadrp.runtime.launch import free_port
from megadrp.runtime.run_dir import RunDir


def log(msg: str) -> None:
    print(f"[megadrp] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str], env: dict | None = None, quiet: bool = False) -> None:
    e = dict(os.environ, PYTHONWARNINGS="ignore", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), **(env or {}))
    out = subprocess.DEVNULL if quiet else None
    p = subprocess.run(cmd, env=e, stdout=out)
    if p.returncode != 0:
        raise SystemExit(f"megadrp: command failed ({p.returncode}): {' '.join(cmd)}")


def megadrp(command: str, *args: str) -> list[str]:
    """The command line of `megadrp <command> args` in this Python."""
    return [sys.executable, "-m", "megadrp", command, *args]


def prepare_data(out: Path, corpus: Path | None = None, vocab: int = 4096, docs_per_domain: int = 2000,
                 eval_docs: int = 50, seed: int = 0, test_docs: int = 50) -> Path:
    """Corpus (the embedded one unless `corpus` is a directory of NAME.jsonl files) →
    tokenizer → shards with train, eval and test splits. `seed` draws the embedded corpus and
    the held-out documents. Returns DATA_DIR."""
    data = out / "data"
    if (data / "manifest.json").is_file():
        if test_docs and not load_manifest(data).has_test:
            raise SystemExit(f"megadrp: {data} was made without a test split (an older megadrp); results are "
                             "scored on the test split: delete the folder (or pick another --out) and rerun")
        log(f"data: reusing {data}")
        return data
    if corpus is None:
        corpus = out / "corpus"
        log("data: writing the embedded corpus")
        sh(megadrp("synth-corpus", "--out", str(corpus), "--seed", str(seed), "--docs-per-domain", str(docs_per_domain)))
    files = sorted(list(corpus.glob("*.jsonl")) + list(corpus.glob("*.jsonl.gz")))
    if not files:
        raise SystemExit(f"megadrp: {corpus} has no NAME.jsonl files (one file a domain)")
    log("data: training the tokenizer")
    sh(megadrp("tokenizer", "--input", *map(str, files), "--vocab-size", str(vocab), "--out", str(out / "tokenizer")))
    inputs = [a for f in files for a in ("--input", f"{f.name.split('.')[0]}={f}")]
    log("data: tokenizing into shards")
    sh(megadrp("preprocess", *inputs, "--tokenizer", str(out / "tokenizer"), "--out", str(data),
               "--workers", str(min(2, os.cpu_count() or 1)), "--eval-docs", str(eval_docs),
               "--test-docs", str(test_docs), "--seed", str(seed), "--overwrite"))
    return data


def train_stage(config: str, run_dir: Path, overrides: list[str], ranks: int = 2, quiet: bool = False) -> float:
    """Runs one stage to completion (resuming a partial run); returns seconds taken. `config`:
    a YAML path, or a shipped recipe's (`configs/tiny/prune.yaml`) from any directory."""
    rd = RunDir(run_dir)
    if rd.done():
        log(f"{run_dir.name}: reusing {rd.hf}")
        return 0.0
    t0 = time.time()
    import megadrp.train

    script = megadrp.train.__file__
    args = [script, "--config", config, f"run_dir={run_dir}", "resume=auto", *overrides]
    if ranks > 1:
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    log(f"{run_dir.name}: training ({ranks} rank{'s' if ranks > 1 else ''}, ZeRO-3)")
    sh(cmd, quiet=quiet)
    if not rd.done():
        raise SystemExit(f"megadrp: {run_dir} did not finish (see {rd.status})")
    return time.time() - t0


def evaluate(model: Path, data: Path, tokens: int, seq_len: int, out: Path, corrupt: float = 0.0,
             p0: dict[str, float] | None = None, split: str = "test") -> dict:
    """`megadrp eval --shift` (and `--corrupt RATE`) of `model` on `split` (results: the test
    split, which no run opened), cached in `out`. `p0` (domain → share) centres the shifted mixes;
    without it, the run's own dro.initial_proportion does. Models of different schedules are
    compared under one p0: a continue stage with `carried` has its own."""
    if out.is_file():
        cached = read_json(out)
        # one written before --shift or the test split existed, on another split or windows, or
        # around another p0, is made again
        if ("shift" in cached and cached.get("split") == split and cached.get("seq_len") == seq_len
                and cached.get("tokens_per_domain") == tokens and (p0 is None or _same_mix(cached["shift"]["p0"], p0))):
            return cached
    sh(megadrp("eval", "--model", str(model), "--data", str(data), "--split", split,
               "--tokens-per-domain", str(tokens), "--seq-len", str(seq_len), "--out", str(out), "--shift",
               *(["--p0", ",".join(f"{k}={v!r}" for k, v in p0.items())] if p0 else []),
               *(["--corrupt", str(corrupt)] if corrupt else [])), quiet=True)
    return read_json(out)


def _same_mix(a: dict[str, float], b: dict[str, float]) -> bool:
    """The same domains with the same normalised shares."""
    if set(a) != set(b):
        return False
    sa, sb = sum(a.values()), sum(b.values())
    return all(abs(a[k] / sa - b[k] / sb) < 1e-9 for k in a)
