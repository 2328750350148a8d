"""Faults: SIGKILL at random moments (also inside a save), SIGTERM and Ctrl-C (SIGINT to the whole job), non-finite losses, a
run directory that cannot be written or has no room, and bad inputs of every kind — each a
clear message, a non-zero exit and nothing half-written."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PY, ROOT, metrics, write_config
from test_train import DS, _hf_weights, prune_cfg, train

pytestmark = pytest.mark.slow


def _popen(cfg: dict, tmp: Path, env: dict | None = None) -> subprocess.Popen:
    path = write_config(tmp / f"{Path(cfg['run_dir']).name}.yaml", **cfg)
    port = str(29700 + random.randint(0, 200))
    cmd = [*DS, port, "megadrp/train.py", "--config", str(path)]
    log = open(tmp / f"{Path(cfg['run_dir']).name}.log", "a")  # read by a failing assert
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_tree(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()
    time.sleep(1.0)  # let the orphaned workers and the controller notice and go


def _latest_step(run_dir: Path) -> int:
    return max(int(c.name[4:]) for c in (run_dir / "checkpoints").glob("step*"))


def _popen_training(cfg: dict, tmp: Path, timeout: float = 300) -> subprocess.Popen:
    """Start the run and return once it has evaluated a step (it is training again), or has
    exited. Its own log says so: the metrics file still holds the rows of the run before."""
    log = tmp / f"{Path(cfg['run_dir']).name}.log"
    start = log.stat().st_size if log.exists() else 0
    p = _popen(cfg, tmp)
    t0 = time.time()
    while time.time() - t0 < timeout and p.poll() is None:
        with open(log, "rb") as f:
            f.seek(start)
            if b"megadrp: eval step" in f.read():
                return p
        time.sleep(0.1)
    return p


def test_sigkill_many_times_then_equal_to_straight(tmp_path, data_dir, base_model):
    longer = {"save": {"interval": 2, "keep": 2}, "train": {"steps": 24}}
    straight = prune_cfg(tmp_path, data_dir, base_model, "straight", **longer)
    train(straight, tmp_path, ranks=2)
    cfg = prune_cfg(tmp_path, data_dir, base_model, "killed", **longer)
    run_dir = Path(cfg["run_dir"])
    rng = random.Random(11)
    kills = 0
    # a kill inside a save (after DeepSpeed wrote its files, before the rename) ...
    p = _popen(cfg, tmp_path, env={"MEGADRP_FAULT_KILL_IN_SAVE": "4"})
    p.wait(timeout=600)
    _kill_tree(p)
    kills += 1
    assert (run_dir / "checkpoints" / ".tmp-step00000004").is_dir()
    assert not (run_dir / "checkpoints" / "step00000004").exists()
    # ... then Ctrl-C at a terminal: SIGINT to the whole foreground group (launcher, ranks, their
    # workers and controller). A clean stop: a checkpoint where it stopped, status interrupted.
    resumed_at = _latest_step(run_dir)
    p = _popen_training(cfg, tmp_path)
    assert p.poll() is None, "the run ended before it could be interrupted"
    os.killpg(p.pid, signal.SIGINT)
    p.wait(timeout=300)
    time.sleep(1.0)
    log = (tmp_path / "killed.log").read_text()[-4000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted", log
    assert _latest_step(run_dir) > resumed_at, log  # the stop saved where it was
    # ... then SIGKILLs of the whole job at random moments once it is training again
    for _ in range(3):
        p = _popen_training(cfg, tmp_path)
        time.sleep(rng.uniform(0, 3))
        if p.poll() is not None:
            break
        _kill_tree(p)
        kills += 1
        for d in (run_dir / "checkpoints").glob("step*"):
            assert (d / "megadrp_state.pt").is_file()  # nothing visible is incomplete
    train(cfg, tmp_path, ranks=2)
    a, b = metrics(Path(straight["run_dir"])), metrics(run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["weights"] == y["weights"] and x["tokens"] == y["tokens"]
        for d in x["eval_loss"]:
            assert math.isclose(x["eval_loss"][d], y["eval_loss"][d], rel_tol=1e-5, abs_tol=1e-6)
    wa, wb = _hf_weights(Path(straight["run_dir"]) / "hf"), _hf_weights(run_dir / "hf")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert kills >= 3
    print(f"kills survived: {kills}")


def test_sigterm_saves_and_exits(tmp_path, data_dir, base_model):
    cfg = prune_cfg(tmp_path, data_dir, base_model, "term", train={"steps": 40}, save={"interval": 0})
    path = write_config(tmp_path / "term.yaml", **cfg)
    p = subprocess.Popen([PY, "megadrp/train.py", "--config", str(path)], cwd=ROOT, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    mfile = Path(cfg["run_dir"]) / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < 300 and not (mfile.exists() and len(mfile.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 3, err[-3000:]  # stopped at a checkpoint: not "done"
    assert "received signal 15" in err
    status = json.loads((Path(cfg["run_dir"]) / "status.json").read_text())
    assert status["state"] == "interrupted"
    ckpts = list((Path(cfg["run_dir"]) / "checkpoints").glob("step*"))
    assert len(ckpts) == 1 and (ckpts[0] / "megadrp_state.pt").is_file()


def test_stop_during_startup_exits_interrupted_without_a_checkpoint(tmp_path, data_dir, base_model):
    """SIGUSR1 while the model is being built (a 7B load takes minutes): the handler installed
    first thing takes it, the run trains no step, writes no checkpoint, says `interrupted` and
    exits 3 (the Slurm scripts requeue; tests/test_cluster.py resumes such runs)."""
    cfg = prune_cfg(tmp_path, data_dir, base_model, "early")
    p = train(cfg, tmp_path, env={"MEGADRP_FAULT_SIGNAL_IN_STARTUP": "1"}, check=False)
    run_dir = Path(cfg["run_dir"])
    assert p.returncode == 3 and "received signal 10" in p.stderr, p.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    assert not list((run_dir / "checkpoints").glob("step*")) and not (run_dir / "hf").exists()
    assert not (run_dir / "metrics.jsonl").exists() or not metrics(run_dir)


def test_nan_steps_skipped_then_stop(tmp_path, data_dir, base_model):
    cfg = prune_cfg(tmp_path, data_dir, base_model, "nan")
    train(cfg, tmp_path, env={"MEGADRP_FAULT_NAN_STEPS": "3,7"})
    m = metrics(Path(cfg["run_dir"]))
    assert m[-1]["bad_steps"] == 2 and m[-1]["step"] == 12
    assert all(math.isfinite(v) for v in m[-1]["eval_loss"].values())
    cfg = prune_cfg(tmp_path, data_dir, base_model, "nanstop", train={"max_bad_steps": 3})
    p = train(cfg, tmp_path, env={"MEGADRP_FAULT_NAN_STEPS": "6,7,8,9,10"}, check=False)
    assert p.returncode == 2 and "3 non-finite steps in a row at step 8" in p.stderr
    assert (Path(cfg["run_dir"]) / "checkpoints" / "step00000004" / "megadrp_state.pt").is_file()
    assert not (Path(cfg["run_dir"]) / "hf").exists()


def test_unwritable_run_dir_and_no_room(tmp_path, data_dir, base_model):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = prune_cfg(tmp_path, data_dir, base_model, "x", run_dir=str(blocker / "run"))
    p = train(cfg, tmp_path, check=False)
    assert p.returncode == 2 and "cannot write under" in p.stderr and str(blocker) in p.stderr
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        cfg = prune_cfg(tmp_path, data_dir, base_model, "y", run_dir=str(small / "run"))
        p = train(cfg, tmp_path, check=False)
        assert p.returncode == 2 and "a checkpoint needs about" in p.stderr, p.stderr[-2000:]
        assert not (small / "run" / "checkpoints" / "step00000004").exists()
    finally:
        subprocess.run(["umount", str(small)])


def _expect_error(cfg, tmp, *needles, extra=()):
    p = train(cfg, tmp, check=False, extra=extra)
    assert p.returncode == 2, p.stderr[-2000:]
    for n in needles:
        assert n in p.stderr, (n, p.stderr[-2000:])
    assert "Traceback" not in p.stderr


def test_bad_configs_and_inputs(tmp_path, data_dir, base_model):
    good = prune_cfg(tmp_path, data_dir, base_model, "bad")
    _expect_error(good, tmp_path, "unknown config key train.'stepz'", extra=["train.stepz=3"])
    _expect_error(good, tmp_path, "'train.steps': expected an integer", extra=["train.steps=ten"])
    _expect_error(good, tmp_path, "num_attention_heads=3", extra=["prune.target.num_attention_heads=3"])
    _expect_error(good, tmp_path, "layers=9 is larger", extra=["prune.target.num_hidden_layers=9"])
    _expect_error(good, tmp_path, "does not exist", extra=[f"model.init={tmp_path / 'nowhere'}"])
    _expect_error(good, tmp_path, "manifest.json: not found", extra=[f"data_dir={tmp_path}"])
    _expect_error(good, tmp_path, "no domain 'wiki'", extra=["domains=[code, wiki]"])
    _expect_error(good, tmp_path, "dro.initial_proportion has 2 values for 6 domains",
                  extra=["dro.initial_proportion=[0.5, 0.5]"])
    _expect_error(good, tmp_path, "dro.reference_loss has no entry for domain", extra=["dro.reference_loss={prose: 2.0}"])
    _expect_error(good, tmp_path, "dro.reference_loss='fitted': give a list, a mapping, 'auto', 'teacher' or 'model:<HF directory>'",
                  extra=["dro.reference_loss=fitted"])
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((base_model / "config.json").read_text())
    _expect_error(good, tmp_path, "no weights", extra=[f"model.init={empty}"])
    other = tmp_path / "other"
    other.mkdir()
    cfgj = json.loads((base_model / "config.json").read_text())
    cfgj["intermediate_size"] = 96
    (other / "config.json").write_text(json.dumps(cfgj))
    (other / "model.safetensors").write_bytes((base_model / "model.safetensors").read_bytes())
    _expect_error(good, tmp_path, "has shape", "do not match config.json", extra=[f"model.init={other}"])


def test_truncated_and_corrupt_shards_fail_before_training(tmp_path, data_dir, base_model):
    import shutil

    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    b = bad / "code_train.bin"
    b.write_bytes(b.read_bytes()[:-10])
    cfg = prune_cfg(tmp_path, bad, base_model, "trunc")
    _expect_error(cfg, tmp_path, "code_train.bin", "truncated")
    shutil.copy(data_dir / "code_train.bin", b)
    i = bad / "math_eval.idx"
    i.write_bytes(b"XX" + i.read_bytes()[2:])
    _expect_error(cfg, tmp_path, "math_eval.idx", "wrong magic")


def _hashes(root: Path) -> dict[str, str]:
    import hashlib

    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def test_finished_runs_and_broken_checkpoints(tmp_path, data_dir, base_model):
    """Nothing already written is destroyed by a bad second invocation: starting over a
    finished run and resuming with other domains are refused before anything is touched
    (every file's hash unchanged); resume=auto skips a checkpoint that cannot be read, says
    why, and resumes from the one before."""
    cfg = prune_cfg(tmp_path, data_dir, base_model, "fin", train={"steps": 8}, save={"interval": 4, "keep": 3})
    train(cfg, tmp_path)
    run_dir = Path(cfg["run_dir"])
    before = _hashes(run_dir)
    p = train(cfg, tmp_path, check=False, extra=["resume=none"])
    assert p.returncode == 2 and "holds a finished run" in p.stderr and "overwrite=true" in p.stderr, p.stderr[-2000:]
    assert _hashes(run_dir) == before
    p = train(cfg, tmp_path, check=False, extra=["domains=[code, math]", "dro.initial_proportion=uniform"])
    assert p.returncode == 2 and "made with other settings: domains: None → ['code', 'math']" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert _hashes(run_dir) == before
    state = run_dir / "checkpoints" / "step00000008" / "megadrp_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    p = train(cfg, tmp_path, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "skipping" in p.stderr and "step00000008" in p.stderr and "cannot be read" in p.stderr
    assert "resumed from" in p.stderr and "step00000004" in p.stderr
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"


@pytest.mark.parametrize("args,needle", [
    (["--tokens-per-domain", "0"], "--tokens-per-domain=0: must be at least 1"),
    (["--seq-len", "-4"], "--seq-len=-4: must be at least 1"),
    (["--out", "/nonexistent-dir/x.json"], "its folder does not exist"),
])
def test_evaluate_refuses_bad_flags_before_any_work(args, needle, data_dir, base_model):
    from conftest import run

    p = run([PY, "-m", "megadrp.evaluate", "--model", str(base_model), "--data", str(data_dir), *args], check=False)
    assert p.returncode == 2 and needle in p.stderr, p.stderr[-2000:]


def test_evaluate_a_model_without_weights(tmp_path, data_dir, base_model):
    from conftest import run

    (tmp_path / "config.json").write_text((base_model / "config.json").read_text())
    p = run([PY, "-m", "megadrp.evaluate", "--model", str(tmp_path), "--data", str(data_dir)], check=False)
    assert p.returncode == 2 and "no weights" in p.stderr and "Traceback" not in p.stderr


def test_evaluate_scores_the_test_split_and_says_when_there_is_none(tmp_path, data_dir, base_model, capsys):
    """The default is the test split where the DATA_DIR has one; an older DATA_DIR is scored on
    its eval split with one line saying so; asking for a test split it lacks is exit 2."""
    from megadrp.tools.evaluate import main

    def score(data, *args) -> tuple[int, dict | None, str]:
        rc = main(["--model", str(base_model), "--data", str(data), "--tokens-per-domain", "64", "--seq-len", "16",
                   *args])
        out, err = capsys.readouterr()
        return rc, json.loads(out.strip().splitlines()[-1]) if rc == 0 else None, err

    rc, test, err = score(data_dir)
    assert rc == 0 and test["split"] == "test" and set(test["windows"].values()) == {4} and "no test split" not in err
    rc, ev, _ = score(data_dir, "--split", "eval")
    assert ev["split"] == "eval" and ev["domain_loss"] != test["domain_loss"]  # other windows
    old = tmp_path / "old"
    shutil.copytree(data_dir, old)
    man = json.loads((old / "manifest.json").read_text())
    for d in man["domains"].values():
        for k in ("test", "test_tokens", "test_docs"):
            del d[k]
    (old / "manifest.json").write_text(json.dumps(man))
    rc, fallback, err = score(old)
    assert rc == 0 and fallback["split"] == "eval" and fallback["domain_loss"] == ev["domain_loss"]
    assert "has no test split" in err and len([ln for ln in err.splitlines() if "no test split" in ln]) == 1
    rc, _, err = score(old, "--split", "test")
    assert rc == 2 and "no test split" in err and "--test-docs" in err
