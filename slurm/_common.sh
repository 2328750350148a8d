# Sourced by every megadrp Slurm script. Sets REPO and PYTHON and defines megadrp_train.
# Submit the scripts from the repository root (or set MEGADRP_REPO): Slurm runs a spooled
# copy, so the script's own path is useless.
#
# Environment read here (defaults in brackets):
#   MEGADRP_REPO         the repository                                [$SLURM_SUBMIT_DIR]
#   PYTHON               interpreter with megadrp installed             [python]
#   MAX_RESTARTS         requeues allowed per job (SLURM_RESTART_COUNT), for stops and crashes [20]
#   MEGADRP_NO_REQUEUE   1: an interrupted or crashed run stops instead of requeueing
#   MEGADRP_MASTER_ADDR, MEGADRP_MASTER_PORT   force the rendezvous (docs/cluster.md)
#   SRUN_ARGS            more arguments for the training step's srun (e.g. Pyxis:
#                        "--container-image=IMG --container-mounts=/data:/data")  []
#   CONTAINER            a command the step runs inside (e.g. "apptainer exec --nv IMG.sif") []
#   SCRATCH              a fast per-user file system: RUN_DIR defaults under it, and DeepSpeed's
#                        extension builds go to $SCRATCH/torch_extensions            []
# RUN_DIR and DATA_DIR must be on a file system every node sees (the checkpoints of all ranks
# meet in RUN_DIR; every rank reads DATA_DIR's shards).
set -euo pipefail
REPO=${MEGADRP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$REPO/megadrp/train.py" ]; then
  echo "megadrp: $REPO is not the megadrp repository; submit from its root or set MEGADRP_REPO" >&2
  exit 2
fi
cd "$REPO"
PYTHON=${PYTHON:-python}
MAX_RESTARTS=${MAX_RESTARTS:-20}
case $MAX_RESTARTS in
  '' | *[!0-9]*) echo "megadrp: MAX_RESTARTS=$MAX_RESTARTS is not a count; set a number (20 by default)" >&2; exit 2 ;;
esac
# One task per GPU (or per CPU rank): every task is a torch.distributed rank whose RANK,
# LOCAL_RANK and WORLD_SIZE come from SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NUM_TASKS,
# and whose rendezvous (the step's first node, a port mixed from job and step id) is chosen
# per step by megadrp/runtime/launch.py. No ssh, no pdsh: Slurm places the processes.
# sbatch exports the submitting shell's environment: a MASTER_ADDR/MASTER_PORT from there
# names some other rendezvous (launch.py ignores them under srun; unset to avoid doubt),
# and a RANK/WORLD_SIZE/LOCAL_RANK from there (a shell inside another job, a torchrun
# session) would win over srun's variables and give every task the same rank.
unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Worked out once here, in the batch shell, so that no task needs scontrol or squeue (a
# container may not have them): the rendezvous host (the job's first node) and the job's end
# time, which the trainer stops before with a checkpoint (megadrp/runtime/deadline.py; Slurm
# 23.02 and later export SLURM_JOB_END_TIME themselves). A requeued job runs this again.
if [ -z "${MEGADRP_MASTER_ADDR:-}" ] && [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ] 2>/dev/null; then
  MEGADRP_MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n 1) || MEGADRP_MASTER_ADDR=""
  [ -n "$MEGADRP_MASTER_ADDR" ] && export MEGADRP_MASTER_ADDR
fi
if [ -z "${SLURM_JOB_END_TIME:-}" ] && [ -n "${SLURM_JOB_ID:-}" ] && command -v squeue >/dev/null 2>&1; then
  _megadrp_end=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null | head -n 1) || _megadrp_end=""
  case $_megadrp_end in
    '' | N/A | NONE | Unknown | INVALID) ;;
    *) MEGADRP_JOB_END_TIME=$(date -d "$_megadrp_end" +%s 2>/dev/null) && export MEGADRP_JOB_END_TIME ;;
  esac
fi
if [ -n "${SCRATCH:-}" ]; then
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$SCRATCH/torch_extensions}
fi
# wandb appends every segment of a requeued job to one run: its id is kept in RUN_DIR/wandb_id.
# The log is opened with --open-mode=append, so one file holds every segment of a requeued job.
echo "megadrp: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$(hostname)} at $(date -Is)"

# Exit status of a batch script whose run stopped early and will not continue by itself
# (the same as `megadrp/train.py` is to return for `interrupted`): non-zero, so that
# `--dependency=afterok` (slurm/pipeline_7b.sh) does not start the next stage.
MEGADRP_EXIT_INTERRUPTED=3

# ---- signals -------------------------------------------------------------------------------
# The scripts ask for `--signal=B:USR1@600`: before the time limit Slurm signals the batch
# shell only (B:), which forwards the signal here. Preemption sends SIGTERM to the batch shell
# and every task at once (or USR1 first where the site sets preempt_send_user_signal).
#
# Both are forwarded to srun as SIGUSR1, which srun passes on to every task: the trainer
# saves a checkpoint and exits `interrupted`. Never SIGTERM to srun: srun answers SIGTERM by
# SIGKILLing its tasks ("forcing job termination"), losing the checkpoint.
#
# bash runs a trap only between commands, so srun runs in the background and the shell sits
# in `wait`, which a trapped signal interrupts; the loop then waits again for srun's status.
_megadrp_srun_pid=""
_megadrp_signal=""   # set by a forwarded signal; stays set, so no later stage starts
_megadrp_trapped=0
_megadrp_requeued=0
_megadrp_on_signal() {
  if [ "$_megadrp_requeued" = 1 ]; then exit 0; fi  # the SIGTERM of our own `scontrol requeue`
  _megadrp_signal=$1
  _megadrp_trapped=1
  if [ -n "$_megadrp_srun_pid" ] && kill -0 "$_megadrp_srun_pid" 2>/dev/null; then
    echo "megadrp: batch shell got SIG$1; asking the training step to checkpoint and stop" >&2
    kill -s USR1 "$_megadrp_srun_pid" 2>/dev/null || true
  else
    echo "megadrp: batch shell got SIG$1 outside a training step; no further step will start" >&2
  fi
}
trap '_megadrp_on_signal USR1' USR1
trap '_megadrp_on_signal TERM' TERM

# Requeue this job (it resumes from its last complete checkpoint) unless switched off, out of
# restarts or not a Slurm job; then exit. Never returns.
_megadrp_requeue_or_stop() {
  local why=$1 code=${2:-$MEGADRP_EXIT_INTERRUPTED} restarts=${SLURM_RESTART_COUNT:-0}
  if [ "${MEGADRP_NO_REQUEUE:-0}" = "1" ]; then
    echo "megadrp: $why; MEGADRP_NO_REQUEUE=1, so not requeueing: resubmit to continue" >&2
  elif [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "megadrp: $why; not a Slurm job, so not requeueing: run again to continue" >&2
  elif [ "$restarts" -ge "$MAX_RESTARTS" ]; then
    # A run that keeps stopping (or failing to start) must not requeue forever.
    echo "megadrp: $why; job $SLURM_JOB_ID already restarted $restarts times (MAX_RESTARTS=$MAX_RESTARTS): " \
      "not requeueing; resubmit to continue" >&2
  else
    echo "megadrp: $why; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $MAX_RESTARTS)" >&2
    _megadrp_requeued=1
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0  # the job is pending again; afterok dependants keep waiting for its final run
    fi
    _megadrp_requeued=0
    echo "megadrp: scontrol requeue $SLURM_JOB_ID failed (job submitted with --no-requeue?); resubmit to continue" >&2
  fi
  exit "$code"
}

# State in RUN_DIR/status.json if the run wrote it after $2 (seconds since the epoch), else
# "unknown": a status.json left by an earlier segment says nothing about this one.
_megadrp_state() {
  "$PYTHON" -c '
import json, sys
try:
    s = json.load(open(sys.argv[1]))
    print(s["state"] if float(s.get("time", 0)) >= float(sys.argv[2]) else "unknown")
except Exception:
    print("unknown")' "$1/status.json" "$2" 2>/dev/null || echo unknown
}

# megadrp_train RUN_DIR ARGS...: run megadrp/train.py ARGS on every task (resume=auto), then
#  - done: return 0;
#  - interrupted (a signal: Slurm's, preemption's or scancel's; or the job's end coming) or
#    `retry` (a transient start failure such as a busy rendezvous port): requeue, or exit 3
#    when it will not be requeued;
#  - exit 2, a user error (a config key, a file, non-finite weights): exit 2, never requeued
#    (it would fail again);
#  - any other failure (a crash: a lost node, an NCCL timeout, a killed rank): requeue, and the
#    job resumes from its last complete checkpoint; MAX_RESTARTS bounds the requeues of a run
#    that keeps crashing, and then the job exits with the crash's status.
# Errors are handled explicitly: the scripts call it after `||`, where bash ignores `set -e`.
megadrp_train() {
  local run_dir=$1; shift
  local started rc state ntasks=${SLURM_NTASKS:-$((${SLURM_NTASKS_PER_NODE:-1} * ${SLURM_JOB_NUM_NODES:-1}))}
  if [ -n "$_megadrp_signal" ]; then
    _megadrp_requeue_or_stop "stopped by SIG$_megadrp_signal before $run_dir started"
  fi
  # Check config, data, source model and batch layout on the batch host in seconds, before
  # the step loads the model on every GPU (exit 2 = a bad job: fail now, never requeue).
  rc=0
  "$PYTHON" megadrp/train.py --dry-run --world-size "$ntasks" "$@" run_dir="$run_dir" resume=auto || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "megadrp: dry run of $run_dir failed (exit $rc); not starting the step" >&2
    exit "$rc"
  fi
  # bash runs a trap only once the foreground dry run has ended: a signal that came meanwhile
  # (the time-limit USR1, a preemption) is acted on now, before a step that would not see it.
  if [ -n "$_megadrp_signal" ]; then
    _megadrp_requeue_or_stop "stopped by SIG$_megadrp_signal during the dry run of $run_dir"
  fi
  started=$(date +%s)
  # shellcheck disable=SC2086
  srun --label --kill-on-bad-exit=1 --cpu-bind=none ${SRUN_ARGS:-} ${CONTAINER:-} \
    "$PYTHON" megadrp/train.py "$@" run_dir="$run_dir" resume=auto &
  _megadrp_srun_pid=$!
  # A trap that ran between starting srun and knowing its pid could not forward the signal.
  if [ -n "$_megadrp_signal" ]; then
    echo "megadrp: SIG$_megadrp_signal came as the step started; asking it to checkpoint and stop" >&2
    kill -s USR1 "$_megadrp_srun_pid" 2>/dev/null || true
  fi
  while :; do
    _megadrp_trapped=0
    rc=0
    wait "$_megadrp_srun_pid" || rc=$?
    # A trapped signal ends `wait` early (status >128) with srun still running: wait again;
    # bash keeps srun's status, so this also works if srun ended meanwhile.
    [ "$_megadrp_trapped" = 1 ] || break
  done
  _megadrp_srun_pid=""
  state=$(_megadrp_state "$run_dir" "$started")
  case "$state" in
    done) return 0 ;;
    interrupted) _megadrp_requeue_or_stop "run interrupted at a checkpoint" ;;
    retry) _megadrp_requeue_or_stop "run could not start (transient; see above)" ;;
  esac
  if [ "$rc" -eq "$MEGADRP_EXIT_INTERRUPTED" ] || [ "$rc" -eq 138 ] || [ -n "$_megadrp_signal" ]; then
    # No fresh status: the stop came during startup (the trainer exits 3, or a rank died of
    # the USR1 itself = 128+10) or the step was torn down. Nothing past the last complete
    # checkpoint is lost, and resume=auto starts from it.
    _megadrp_requeue_or_stop "run stopped (srun exit $rc${_megadrp_signal:+, SIG$_megadrp_signal}) before finishing"
  fi
  if [ "$rc" -eq 2 ]; then
    echo "megadrp: training stopped on a user error (exit 2, see above); not requeueing" >&2
    exit 2
  fi
  if [ "$rc" -eq 0 ]; then
    echo "megadrp: train.py exited 0 without writing a fresh $run_dir/status.json; treating it as a crash" >&2
    rc=1
  fi
  _megadrp_requeue_or_stop "training crashed (srun exit $rc)" "$rc"
}
