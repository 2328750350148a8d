"""Running the stages as a user would, from Python: data preparation and training stages as
subprocesses (training under the DeepSpeed launcher). Shared by `megadrp demo` and the
benchmarks. A stage whose run directory is done (status `done`, an exported model) and whose
stamp (tools/stamps.py) says it was made from the same config, overrides, ranks and inputs is
reused, so reruns only do what is missing; one made from anything else is rebuilt, with
everything after it (`reuse="rebuild"`), or refused (`reuse="refuse"`: a benchmark must not
rebuild another command's runs, nor compare models made another way).

Every command is found through the installed package (`python -m megadrp <command>`, the
trainer's own file), never through paths of a checkout, so this runs from any directory.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

from megadrp.data.manifest import load_manifest
from megadrp.runtime.files import read_json
from megadrp.runtime.launch import free_port
from megadrp.runtime.run_dir import RunDir
from megadrp.tools import stamps


def log(msg: str) -> None:
    print(f"[megadrp] {msg}", file=sys.stderr, flush=True)


# The DeepSpeed launcher's INFO lines (CUDA_VISIBLE_DEVICES on a CPU machine, the ranks' command
# lines) and its op loader's notes: left out of the demo's and benchmarks' console unless VERBOSE.
NOISE = re.compile(r"\[(INFO|DEBUG)\]|built successfully|Setting ds_accelerator|Unable to find hostfile")
_GRACE_S = 2.0  # how long a step's traceback waits to learn whether Ctrl-C caused it
RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")  # torch.distributed's prefix on a rank's uncaught traceback
VERBOSE = bool(os.environ.get("MEGADRP_VERBOSE"))


def _relay(stream, sink, interrupted: threading.Event | None = None) -> None:
    """Copy a step's stderr to `sink`, without NOISE, and without the tracebacks an interruption
    makes: one that ends in KeyboardInterrupt (Ctrl-C while the launcher is still importing), and,
    once `interrupted` is set, any (Ctrl-C during a JIT build of DeepSpeed's ops ends in ninja's
    RuntimeError, then an ImportError). `sh` says what happened in one line; MEGADRP_VERBOSE
    shows everything. Any other traceback is copied whole."""
    held: list[str] = []  # a traceback, until its last line says which exception it was
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        core = RANK_PREFIX.sub("", line)  # "[rank1]: Traceback ..." is a traceback too
        if VERBOSE:
            sink.write(line)
        elif held or core.startswith("Traceback (most recent call last):"):
            held.append(line)
            if not core[:1].isspace() and not core.startswith("Traceback"):  # the exception's line
                # Ctrl-C reaches the ranks and this process at once; a rank's traceback can come
                # out before `sh` has set `interrupted`, so a traceback waits a moment for it
                if not core.startswith("KeyboardInterrupt") and not (interrupted and interrupted.wait(_GRACE_S)):
                    sink.writelines(held)
                held = []
        elif not NOISE.search(line):
            sink.write(line)
        sink.flush()
    if not (interrupted and interrupted.is_set()):
        sink.writelines(held)  # a traceback cut short: show what there was
    sink.flush()


def _adopt_orphans() -> None:
    """Linux: become a child subreaper, so a descendant whose parent exits is re-parented here,
    not to init. DeepSpeed's runner returns on Ctrl-C while its launcher is still stopping the
    ranks; this is how `sh` can wait for those ranks too."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            pass


def _children() -> list[int]:
    """Our live children, from /proc (the orphans `_adopt_orphans` gave us have no Popen)."""
    me, kids = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it exited meanwhile
        if int(fields[1]) == me:
            kids.append(int(stat.parent.name))
    return kids


def _wait_for_orphans() -> None:
    """Wait until every child is gone (the ranks of an interrupted step); Ctrl-C kills them."""
    import signal

    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except KeyboardInterrupt:
            for pid in _children():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def sh(cmd: list[str], env: dict | None = None, quiet: bool = False) -> None:
    """Run one step and wait for it. Ctrl-C reaches the step too (one process group): a training
    stage then stops at a checkpoint, and this waits for it (a second Ctrl-C kills it), so the
    command never returns while ranks still run; exit 130 with one line. The launcher's INFO
    lines are left out of stderr unless MEGADRP_VERBOSE is set (`megadrp demo --verbose`)."""
    e = dict(os.environ, PYTHONWARNINGS="ignore", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), **(env or {}))
    out = subprocess.DEVNULL if quiet else None
    _adopt_orphans()
    p = subprocess.Popen(cmd, env=e, stdout=out, stderr=subprocess.PIPE)
    interrupted = threading.Event()
    relay = threading.Thread(target=_relay, args=(p.stderr, sys.stderr, interrupted), daemon=True)
    relay.start()
    try:
        rc = p.wait()
        relay.join(timeout=10)
    except KeyboardInterrupt:
        interrupted.set()
        log("interrupted: waiting for the step to stop (a training stage saves a checkpoint; Ctrl-C again kills it)")
        try:
            p.wait()
        except KeyboardInterrupt:
            p.kill()
            p.wait()
        _wait_for_orphans()  # the runner may return before its launcher has stopped the ranks
        log("interrupted; rerun the same command to go on from where it stopped")
        raise SystemExit(130) from None
    if rc != 0:
        raise SystemExit(f"megadrp: command failed ({rc}): {' '.join(cmd)}")


def megadrp(command: str, *args: str) -> list[str]:
    """The command line of `megadrp <command> args` in this Python."""
    return [sys.executable, "-m", "megadrp", command, *args]


Reuse = Literal["rebuild", "refuse", "adopt"]


def _stale(what: str, path: Path, why: str, reuse: Reuse) -> None:
    """A finished `path` was made from other inputs: say so in one line and remove it
    (`rebuild`), or stop (`refuse`)."""
    if reuse == "refuse":
        raise SystemExit(f"megadrp: {path} was made from other inputs ({why}); this command will not rebuild or "
                         "reuse it: remove it, or rerun what made it with the same settings")
    log(f"{what}: {path} was made from other inputs ({why}); rebuilding it and what follows")
    shutil.rmtree(path)


def _corpus_files(corpus: Path) -> list[Path]:
    return sorted(list(corpus.glob("*.jsonl")) + list(corpus.glob("*.jsonl.gz")))


def prepare_data(out: Path, corpus: Path | None = None, vocab: int = 4096, docs_per_domain: int = 2000,
                 eval_docs: int = 50, seed: int = 0, test_docs: int = 50, reuse: Reuse = "rebuild") -> Path:
    """Corpus (the embedded one unless `corpus` is a directory of NAME.jsonl files) →
    tokenizer → shards with train, eval and test splits. `seed` draws the embedded corpus and
    the held-out documents. Reused where its stamp matches (a user corpus: its files' names,
    sizes and times); `reuse` says what to do where it does not. Returns DATA_DIR."""
    data = out / "data"
    params = {"vocab": vocab, "eval_docs": eval_docs, "test_docs": test_docs, "seed": seed}
    stamp = ({"corpus": "embedded", "docs_per_domain": docs_per_domain, **params} if corpus is None
             else {"corpus": stamps.files_identity(_corpus_files(corpus)), **params})
    if (data / "manifest.json").is_file():
        why = stamps.difference(stamps.read(data), stamp)
        if why is None or (reuse == "adopt" and stamps.read(data) is None and load_manifest(data).has_test == bool(
                test_docs)):
            if why is not None:
                stamps.write(data, stamp)
            log(f"data: reusing {data}")
            return data
        _stale("data", data, why, reuse)
    if corpus is None:
        corpus = out / "corpus"
        log("data: writing the embedded corpus")
        sh(megadrp("synth-corpus", "--out", str(corpus), "--seed", str(seed), "--docs-per-domain", str(docs_per_domain)))
    files = _corpus_files(corpus)
    if not files:
        raise SystemExit(f"megadrp: {corpus} has no NAME.jsonl files (one file a domain)")
    log("data: training the tokenizer")
    sh(megadrp("tokenizer", "--input", *map(str, files), "--vocab-size", str(vocab), "--out", str(out / "tokenizer"),
               "--overwrite"))
    inputs = [a for f in files for a in ("--input", f"{f.name.split('.')[0]}={f}")]
    log("data: tokenizing into shards")
    sh(megadrp("preprocess", *inputs, "--tokenizer", str(out / "tokenizer"), "--out", str(data),
               "--workers", str(min(2, os.cpu_count() or 1)), "--eval-docs", str(eval_docs),
               "--test-docs", str(test_docs), "--seed", str(seed), "--overwrite"))
    stamps.write(data, stamp)
    return data


def train_stage(config: str, run_dir: Path, overrides: list[str], ranks: int = 2, quiet: bool = False,
                reuse: Reuse = "rebuild") -> float:
    """Runs one stage to completion (resuming a partial run made from the same inputs); returns
    seconds taken. `config`: a YAML path, or a shipped recipe's (`configs/tiny/prune.yaml`) from
    any directory. A stage made from other inputs (tools/stamps.py): `reuse` = rebuild it, refuse,
    or (`adopt`, a benchmark over its own folder) refuse a mismatch but take a stage made before
    stamps existed as it is."""
    rd = RunDir(run_dir)
    stamp = stamps.stage_stamp(config, overrides, ranks)
    if run_dir.exists():
        old = stamps.read(run_dir)
        why = stamps.difference(old, stamp)
        if why is not None and old is None and reuse == "adopt":
            stamps.write(run_dir, stamp)
            why = None
        if why is not None:
            _stale(run_dir.name, run_dir, why, "refuse" if reuse == "adopt" else reuse)
    if rd.done():
        log(f"{run_dir.name}: reusing {rd.hf}")
        return 0.0
    run_dir.mkdir(parents=True, exist_ok=True)
    stamps.write(run_dir, stamp)
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
