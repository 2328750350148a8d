"""Launchers for real: a single-node Slurm cluster (slurmctld, slurmd, munge) running
slurm/smoke.sh, preemption by SIGUSR1 and resubmission, and mpirun with mpi4py.

Where Slurm or OpenMPI is missing the tests skip with the reason; with
MEGADRP_REQUIRE_CLUSTER=1 (set by .ci/run) a skip is a failure."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import slurm_cluster as testing_cluster
from conftest import PY, ROOT, metrics, run

pytestmark = pytest.mark.slow
REQUIRED = os.environ.get("MEGADRP_REQUIRE_CLUSTER") == "1"


def _skip(reason: str):
    if REQUIRED:
        pytest.fail(f"MEGADRP_REQUIRE_CLUSTER=1 but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = testing_cluster.available()
    if why:
        _skip(why)
    d = tmp_path_factory.mktemp("slurm")
    env = testing_cluster.start(d)
    yield dict(os.environ, **env, PYTHON=PY, MEGADRP_REPO=str(ROOT), PYTHONWARNINGS="ignore")
    testing_cluster.stop(d)


def _sbatch(env, *args, wait=True) -> str:
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def smoke(slurm, tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    out = root / "job.out"
    _sbatch(dict(slurm, RUN_ROOT=str(root), STEPS="30"), "-o", str(out), "slurm/smoke.sh")
    assert "megadrp smoke: done" in out.read_text(), out.read_text()[-3000:]
    return root


def test_smoke_job(smoke):
    from transformers import AutoModelForCausalLM

    for stage in ("pretrain", "prune", "continue"):
        m = metrics(smoke / stage)
        assert m[-1]["step"] == 30 and m[-1]["world_size"] == 2
    model = AutoModelForCausalLM.from_pretrained(smoke / "continue" / "hf")
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 48


def _copy_inputs(smoke: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(smoke / "data", root / "data")
    shutil.copytree(smoke / "pretrain", root / "pretrain")
    return root


def _wait_for_prune_step(root: Path, step: int) -> None:
    metrics_file = root / "prune" / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < 300:
        if metrics_file.exists() and any(json.loads(x)["step"] >= step for x in metrics_file.read_text().splitlines() if x):
            return
        time.sleep(0.2)
    raise AssertionError(f"prune never reached step {step}")


def _wait_gone(job: str, env: dict, timeout: float = 600) -> None:
    t0 = time.time()
    while subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout.strip():
        assert time.time() - t0 < timeout, f"job {job} still queued after {timeout} s"
        time.sleep(0.5)


def _assert_same_as_straight(smoke: Path, root: Path) -> None:
    a, b = metrics(smoke / "prune"), metrics(root / "prune")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["weights"] == y["weights"]
        for d in x["eval_loss"]:
            assert math.isclose(x["eval_loss"][d], y["eval_loss"][d], rel_tol=1e-5, abs_tol=1e-6)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(r / "continue" / "hf" / "model.safetensors")) for r in (smoke, root))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_usr1_to_the_batch_shell_requeues_and_resumes(slurm, smoke, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@600 sends before the time limit): the shell
    forwards it to the step, the run checkpoints, the script requeues its own job, and the
    requeued job resumes from the checkpoint and finishes equal to the straight run; the one
    output file (--open-mode=append) holds both segments."""
    root = _copy_inputs(smoke, tmp_path)
    env = dict(slurm, RUN_ROOT=str(root), STEPS="30")
    out = tmp_path / "job.out"
    job = _sbatch(env, "-o", str(out), "slurm/smoke.sh", wait=False)
    _wait_for_prune_step(root, 5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
    _wait_gone(job, env)
    text = out.read_text()
    info = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True).stdout
    assert "Restarts=1" in info and "JobState=COMPLETED" in info, (info, text[-3000:])
    for needed in ("(restart 0)", "requeueing job", "(restart 1)", "megadrp smoke: done"):
        assert needed in text, (needed, text[-3000:])
    # The requeued segment resumed from the checkpoint the stop wrote (a run started over would
    # give the same numbers too, so this is what shows the requeue kept the work).
    resumed = re.search(r"resumed from (\S+) at step (\d+)", text[text.index("(restart 1)"):])
    assert resumed and "prune" in resumed.group(1) and 5 <= int(resumed.group(2)) < 30, text[-3000:]
    _assert_same_as_straight(smoke, root)


def test_mpirun_prune(smoke, tmp_path):
    if shutil.which("mpirun") is None:
        _skip("mpirun not installed (apt-get install openmpi-bin libopenmpi-dev)")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        _skip("mpi4py not installed (pip install mpi4py)")
    cmd = ["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "-x", "DS_ACCELERATOR=cpu",
           PY, "megadrp/train.py", "--config", "configs/tiny/prune.yaml", f"data_dir={smoke / 'data'}",
           f"model.init={smoke / 'pretrain' / 'hf'}", f"run_dir={tmp_path / 'mpi'}", "train.steps=6",
           "train.seq_len=32", "train.global_batch=8", "train.micro_batch=2", "eval.interval=3",
           "eval.tokens_per_domain=512", "prune.target.hidden_size=48", "prune.target.intermediate_size=64",
           "prune.target.num_hidden_layers=1", "prune.target.num_attention_heads=2",
           "prune.target.num_key_value_heads=1", "train.num_workers=1"]
    run(cmd, timeout=600)
    m = metrics(tmp_path / "mpi")
    assert m[-1]["step"] == 6 and m[-1]["world_size"] == 2 and len(set(m[-1]["weights_digests"])) == 1
    assert (tmp_path / "mpi" / "hf" / "config.json").is_file()


def _stage_job(slurm, smoke: Path, tmp_path: Path, *sbatch_args: str, **env: str) -> tuple[str, Path, str]:
    """Run tests/slurm_stage.sh (one prune stage through slurm/_common.sh) on smoke's inputs; waits
    for the job, requeues included. Returns (job id, the stage's root, the job's output)."""
    root = _copy_inputs(smoke, tmp_path)
    out = tmp_path / "job.out"
    job = _sbatch(dict(slurm, STAGE_DIR=str(root), **env), "-o", str(out), *sbatch_args, "tests/slurm_stage.sh",
                  wait=False)
    _wait_gone(job, slurm, timeout=900)
    return job, root, out.read_text()


def _seconds_per_step(log: Path, stage: str, steps: int) -> float:
    """Seconds per training step (evaluations included) of `stage` in a smoke job's log, from the
    timestamps of its first and last evaluation lines; at least 0.01 (the stamps have 1 s steps)."""
    text = log.read_text()
    segment = text[text.index(f"stage {stage}:"):]
    end = segment.find("\nstage ", 1)
    segment = segment if end < 0 else segment[:end]
    stamps = re.findall(r"(\d\d):(\d\d):(\d\d) megadrp: eval step (\d+):", segment)
    t = {int(s): int(h) * 3600 + int(m) * 60 + int(x) for h, m, x, s in stamps}
    assert 0 in t and steps in t, segment[-2000:]
    return max(0.01, ((t[steps] - t[0]) % 86400 + 0.5) / steps)


def _job_info(job: str, env: dict) -> str:
    return subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True).stdout


def test_a_crash_is_requeued_and_the_job_finishes_as_a_straight_run(slurm, smoke, tmp_path):
    """Rank 0 crashes in step 12 (as a lost node or an NCCL timeout would end the step): the batch
    script requeues the job, which resumes from the step-10 checkpoint and finishes with the
    numbers of the uninterrupted run."""
    job, root, text = _stage_job(slurm, smoke, tmp_path, MEGADRP_FAULT_CRASH_AT="12")
    info = _job_info(job, slurm)
    assert "Restarts=1" in info and "JobState=COMPLETED" in info, (info, text[-3000:])
    assert "training crashed (srun exit" in text and "megadrp stage: done" in text, text[-3000:]
    resumed = re.search(r"resumed from (\S+) at step (\d+)", text)
    assert resumed and int(resumed.group(2)) == 10, text[-3000:]
    a, b = metrics(smoke / "prune"), metrics(root / "prune")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["weights"] == y["weights"] and x["tokens"] == y["tokens"]
        for d in x["eval_loss"]:
            assert math.isclose(x["eval_loss"][d], y["eval_loss"][d], rel_tol=1e-5, abs_tol=1e-6)


def test_a_short_time_limit_stops_at_a_checkpoint_by_itself_and_resumes(slurm, smoke, tmp_path):
    """A one-minute job with no signal asked for (no --signal): the run reads the job's end time
    (the batch shell's squeue, or SLURM_JOB_END_TIME), stops at a checkpoint while a step, an
    evaluation and a save still fit, and the requeued job resumes and finishes."""
    # About a minute of training at this machine's pace (the smoke job's prune stage, same shape):
    # more than a one-minute job leaves after its start, on a fast machine or a loaded one.
    steps = max(60, 5 * math.ceil(60 / _seconds_per_step(smoke / "job.out", "prune", 30) / 5))
    job, root, text = _stage_job(slurm, smoke, tmp_path, "--time=1", STEPS=str(steps))
    info = _job_info(job, slurm)
    assert "JobState=COMPLETED" in info and "Restarts=0" not in info, (info, text[-3000:])
    assert "the job ends in" in text and "requeueing job" in text, text[-3000:]
    assert "TIMEOUT" not in info and "DUE TO TIME LIMIT" not in text, text[-3000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert resumed and all(0 < s < steps for s in resumed), text[-3000:]
    m = metrics(root / "prune")
    assert m[-1]["step"] == steps and json.loads((root / "prune" / "status.json").read_text())["state"] == "done"
