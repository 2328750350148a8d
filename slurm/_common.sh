# Sourced by every megadrp Slurm script. Sets REPO, PYTHON and the rendezvous of
# torch.distributed from the job's node list. Submit the scripts from the repository root
# (or set MEGADRP_REPO): Slurm runs a spooled copy, so the script's own path is useless.
set -euo pipefail
REPO=${MEGADRP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$REPO/megadrp/train.py" ]; then
  echo "megadrp: $REPO is not the megadrp repository; submit from its root or set MEGADRP_REPO" >&2
  exit 2
fi
cd "$REPO"
PYTHON=${PYTHON:-python}
# One task per GPU (or per CPU rank): every task is a torch.distributed rank whose RANK,
# LOCAL_RANK and WORLD_SIZE come from SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS
# (megadrp/distributed.py). No ssh, no pdsh: Slurm places the processes and delivers signals.
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo 127.0.0.1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# Run the training script on every task; requeue the job when the run was interrupted
# (SIGUSR1 from --signal, or SIGTERM on preemption) so it resumes from its last checkpoint.
megadrp_train() {
  local run_dir=$1; shift
  srun --kill-on-bad-exit=1 --cpu-bind=none "$PYTHON" megadrp/train.py "$@" run_dir="$run_dir" resume=auto
  local state
  state=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['state'])" "$run_dir/status.json" 2>/dev/null || echo unknown)
  if [ "$state" = "interrupted" ]; then
    if [ "${MEGADRP_NO_REQUEUE:-0}" = "1" ]; then
      echo "megadrp: run interrupted at a checkpoint; resubmit to continue" >&2
    else
      echo "megadrp: run interrupted at a checkpoint; requeueing job ${SLURM_JOB_ID:-?}" >&2
      scontrol requeue "$SLURM_JOB_ID"
    fi
  fi
}
