"""slurm/_common.sh's megadrp_train without Slurm: fake `srun` and `scontrol` on PATH record
what the batch shell does with each outcome of a run (done, interrupted, failed, a signal to
the batch shell) — requeue or not, the exit status, and which signal reaches the step.
The real cluster path is tests/test_cluster.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

FAKE_SRUN = r"""#!/bin/bash
# Stands in for srun: writes run_dir/status.json as a run ending in $FAKE_MODE would.
for a in "$@"; do case $a in run_dir=*) run_dir=${a#run_dir=} ;; esac; done
status() { printf '{"state": "%s", "time": %s}\n' "$1" "$(date +%s.%N)" > "$run_dir/status.json"; }
echo "$*" >> "$FAKE_LOG/srun"
echo "RANK=${RANK-unset} WORLD_SIZE=${WORLD_SIZE-unset} LOCAL_RANK=${LOCAL_RANK-unset}" >> "$FAKE_LOG/srun_env"
case $FAKE_MODE in
  done) status done ;;
  interrupted) status interrupted ;;
  retry) status retry; exit 75 ;;
  fail) exit 1 ;;
  user_error) exit 2 ;;
  died_of_usr1) exit 138 ;;
  wait)
    trap 'echo USR1 >> "$FAKE_LOG/signals"; status interrupted; kill $s; exit 0' USR1
    trap 'echo TERM >> "$FAKE_LOG/signals"; kill $s; exit 143' TERM
    sleep 30 & s=$!
    touch "$FAKE_LOG/started"
    wait $s ;;
esac
"""
# Stands in for megadrp/train.py, which the batch shell runs itself only for --dry-run.
FAKE_DRY_RUN = """import os, sys, time
log = os.environ["FAKE_LOG"]
open(os.path.join(log, "dry"), "a").write(" ".join(sys.argv[1:]) + "\\n")
mode = os.environ.get("FAKE_DRY", "ok")
if mode == "fail":
    print("train: dry run: train.global_batch=32 cannot be split evenly over 64 ranks", file=sys.stderr)
    sys.exit(2)
if mode == "slow":  # the batch shell gets its signal while this runs in the foreground
    open(os.path.join(log, "dry_started"), "w").close()
    time.sleep(3)
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol"
exit "${FAKE_SCONTROL_RC:-0}"
"""


@pytest.fixture
def batch(tmp_path):
    """Run `megadrp_train` in a batch shell; returns a function(mode, **env) -> Popen."""
    bin_dir, repo, log = tmp_path / "bin", tmp_path / "repo", tmp_path / "log"
    for d in (bin_dir, repo / "megadrp", log, tmp_path / "run"):
        d.mkdir(parents=True)
    (repo / "megadrp" / "train.py").write_text(FAKE_DRY_RUN)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def start(mode: str, before: str = "", **env: str) -> subprocess.Popen:
        e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        e.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_MODE=mode, MEGADRP_REPO=str(repo),
                 PYTHON=sys.executable, SLURM_JOB_ID="77", SLURM_NTASKS="2", **env)
        script = (f"source {ROOT}/slurm/_common.sh; {before}\n"
                  f"megadrp_train {tmp_path / 'run'} --config c.yaml; echo RETURNED")
        return subprocess.Popen(["bash", "-c", script], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    start.log = log  # type: ignore[attr-defined]
    start.run = tmp_path / "run"  # type: ignore[attr-defined]
    return start


def finish(p: subprocess.Popen) -> tuple[int, str]:
    out, _ = p.communicate(timeout=60)
    return p.returncode, out


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def wait_for(path: Path, p: subprocess.Popen) -> None:
    t0 = time.time()
    while not path.exists():
        assert time.time() - t0 < 30 and p.poll() is None, p.communicate()[0]
        time.sleep(0.05)


def test_done_returns_to_the_script(batch):
    rc, out = finish(batch("done"))
    assert rc == 0 and "RETURNED" in out, out
    assert "run_dir=" in read(batch.log / "srun") and "resume=auto" in read(batch.log / "srun")
    assert read(batch.log / "scontrol") == ""


def test_interrupted_requeues(batch):
    rc, out = finish(batch("interrupted"))
    assert rc == 0 and "RETURNED" not in out and "requeueing job 77" in out, out
    assert read(batch.log / "scontrol").split() == ["requeue", "77"]


@pytest.mark.parametrize("env, why", [
    (dict(MEGADRP_NO_REQUEUE="1"), "MEGADRP_NO_REQUEUE=1"),
    (dict(SLURM_RESTART_COUNT="20"), "MAX_RESTARTS=20"),
    (dict(SLURM_RESTART_COUNT="2", MAX_RESTARTS="2"), "MAX_RESTARTS=2"),
    (dict(FAKE_SCONTROL_RC="1"), "requeue 77 failed"),
])
def test_interrupted_not_requeued_exits_3(batch, env, why):
    rc, out = finish(batch("interrupted", **env))
    assert rc == 3 and why in out and "RETURNED" not in out, out


def test_retry_requeues(batch):
    rc, out = finish(batch("retry"))
    assert rc == 0 and read(batch.log / "scontrol").split() == ["requeue", "77"], out


def test_a_crash_is_requeued(batch):
    """A lost node or an NCCL timeout ends the step with an error that is not the user's: the
    job requeues and resumes from its last complete checkpoint."""
    rc, out = finish(batch("fail"))
    assert rc == 0 and "training crashed (srun exit 1)" in out, out
    assert read(batch.log / "scontrol").split() == ["requeue", "77"], out


def test_a_crash_past_max_restarts_exits_with_its_status(batch):
    rc, out = finish(batch("fail", SLURM_RESTART_COUNT="3", MAX_RESTARTS="3"))
    assert rc == 1 and "MAX_RESTARTS=3" in out and read(batch.log / "scontrol") == "", out


def test_a_user_error_is_never_requeued(batch):
    rc, out = finish(batch("user_error"))
    assert rc == 2 and "user error" in out and read(batch.log / "scontrol") == "", out


def test_stale_interrupted_status_does_not_hide_a_crash(batch):
    """An earlier segment's `interrupted` says nothing of this one: a crash is handled as a crash."""
    (batch.run / "status.json").write_text('{"state": "interrupted", "time": 1.0}\n')
    rc, out = finish(batch("fail", MEGADRP_NO_REQUEUE="1"))
    assert rc == 1 and "training crashed" in out and read(batch.log / "scontrol") == "", out


def test_rank_killed_by_usr1_during_startup_requeues(batch):
    rc, out = finish(batch("died_of_usr1"))
    assert rc == 0 and read(batch.log / "scontrol").split() == ["requeue", "77"], out


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_batch_shell_signal_reaches_the_step_as_usr1(batch, sig):
    p = batch("wait")
    wait_for(batch.log / "started", p)
    p.send_signal(sig)
    rc, out = finish(p)
    # srun answers SIGTERM by SIGKILLing its tasks, so the shell sends USR1 whatever it got
    assert read(batch.log / "signals").split() == ["USR1"], out
    assert rc == 0 and read(batch.log / "scontrol").split() == ["requeue", "77"], out


def test_signal_between_steps_starts_no_step(batch):
    rc, out = finish(batch("done", before="kill -USR1 $$"))
    assert rc == 0 and read(batch.log / "srun") == "" and "requeueing job 77" in out, out


def test_bad_max_restarts_is_an_error(batch):
    rc, out = finish(batch("done", MAX_RESTARTS="many"))
    assert rc == 2 and "MAX_RESTARTS=many" in out, out


def test_scripts_parse():
    for script in sorted((ROOT / "slurm").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)
    for name in ("prune_7b.sh", "continue_7b.sh", "smoke.sh"):
        text = (ROOT / "slurm" / name).read_text()
        assert "#SBATCH --open-mode=append" in text and "#SBATCH --signal=B:USR1@" in text, name
        assert "#SBATCH --requeue" in text, name
    # Every batch script, and every job the pipeline submits by --wrap, appends to its log.
    for script in sorted((ROOT / "slurm").glob("*.sh")):
        text = script.read_text()
        if "#SBATCH" in text:
            assert "#SBATCH --open-mode=append" in text, script.name
    pipeline = (ROOT / "slurm" / "pipeline_7b.sh").read_text()
    assert all("--open-mode=append" in call for call in pipeline.split("sbatch --parsable")[1:] if "--wrap" in call)


def test_dry_run_runs_first_for_the_jobs_rank_count(batch):
    rc, out = finish(batch("done"))
    assert rc == 0 and read(batch.log / "dry").split()[:3] == ["--dry-run", "--world-size", "2"], out


def test_failed_dry_run_exits_with_its_code_and_starts_no_step(batch):
    rc, out = finish(batch("done", FAKE_DRY="fail"))
    assert rc == 2 and "dry run of" in out and "failed (exit 2)" in out and "cannot be split evenly" in out, out
    assert read(batch.log / "srun") == "" and read(batch.log / "scontrol") == ""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_during_the_dry_run_starts_no_step(batch, sig):
    """bash holds the trap until the foreground dry run ends; the signal must still count."""
    p = batch("done", FAKE_DRY="slow")
    wait_for(batch.log / "dry_started", p)
    p.send_signal(sig)
    rc, out = finish(p)
    assert "during the dry run" in out and read(batch.log / "srun") == "", out
    assert rc == 0 and read(batch.log / "scontrol").split() == ["requeue", "77"], out


def test_inherited_rank_variables_do_not_reach_the_step(batch):
    """A RANK/WORLD_SIZE/LOCAL_RANK exported by the submitting shell would win over srun's."""
    rc, out = finish(batch("done", RANK="5", WORLD_SIZE="8", LOCAL_RANK="5"))
    assert rc == 0 and read(batch.log / "srun_env").split() == ["RANK=unset", "WORLD_SIZE=unset", "LOCAL_RANK=unset"]
