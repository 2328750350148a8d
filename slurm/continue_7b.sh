#!/bin/bash
# Continued pretraining of a pruned model (SPEC §4: 48000 steps × 256 × 4096 tokens).
#
#   sbatch slurm/continue_7b.sh                    # from the repository root
#
# Environment (defaults in brackets):
#   TARGET      1.3b | 2.7b | qwen2-1.8b (see prune_7b.sh)  [1.3b]
#   MODEL_DIR   the pruned model                         [runs/prune_7b_$TARGET/hf]
#   DATA_DIR    DATA_DIR from `megadrp preprocess`   [data/redpajama]
#   RUN_DIR     where the run writes                     [runs/continue_7b_$TARGET]
#   CONFIG      recipe                                   [configs/continue_$TARGET.yaml]
#   DS_CONFIG   DeepSpeed JSON                           [ds_configs/zero3_bf16.json]
#   DISTILL     1: distil from the source (configs/continue_$TARGET_distill.yaml)   []
#   TEACHER_DIR the teacher with DISTILL=1                   [checkpoints/Llama-2-7b-hf]
#   PYTHON, EXTRA, MAX_RESTARTS, ... as in prune_7b.sh
# Site settings: set --partition and --account below (remove one '#' to enable a line); --time is
# your partition's MaxTime: the run stops at a checkpoint before the job's end by itself and the
# job requeues (--requeue), resuming where it stopped, so the time limit never loses work.
# --exclusive and --mem=0 give the job whole nodes and their memory.
# Requeue (slurm/_common.sh): before the end (the job's end time, or --signal=B:USR1 reaching the
# batch shell), on preemption, and after a crash (a lost node, an NCCL timeout), at most
# MAX_RESTARTS [20] times; a user error (exit 2) is never requeued. The run resumes from its last
# complete checkpoint, on whatever number of nodes the requeued job gets (elastic resume,
# docs/cluster.md). The log is logs/%x-%j.out (srun --label prefixes each line with its task);
# --open-mode=append keeps every segment in it. A run stopped and not requeued exits non-zero, so
# `afterok` dependants do not start (slurm/pipeline_7b.sh cancels them: --kill-on-invalid-dep).
# RUN_DIR and DATA_DIR must be on a file system every node sees; RUN_DIR defaults under $SCRATCH
# where it is set. Container: CONTAINER="apptainer exec --nv IMG.sif", or Pyxis through
# SRUN_ARGS="--container-image=IMG --container-mounts=...".
#SBATCH --job-name=megadrp-continue
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --exclusive
#SBATCH --mem=0
##SBATCH --partition=CHANGE_ME
##SBATCH --account=CHANGE_ME
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
source "${MEGADRP_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/_common.sh"
TARGET=${TARGET:-1.3b}
MODEL_DIR=${MODEL_DIR:-${SCRATCH:+$SCRATCH/megadrp/}runs/prune_7b_$TARGET/hf}
RUN_DIR=${RUN_DIR:-${SCRATCH:+$SCRATCH/megadrp/}runs/continue_7b_$TARGET}
# DISTILL=1: the distillation variant (configs/continue_$TARGET_distill.yaml), from TEACHER_DIR
case $TARGET in
  1.3b|2.7b)  recipe=configs/continue_$TARGET${DISTILL:+_distill}.yaml ;;
  qwen2-1.8b) recipe=configs/continue_qwen2_1.8b.yaml; DATA_DIR=${DATA_DIR:-data/culturax} ;;
  *) recipe=""; [ -n "${CONFIG:-}" ] || { echo "megadrp: TARGET=$TARGET has no continued-pretraining recipe; set CONFIG" >&2; exit 2; } ;;
esac
CONFIG=${CONFIG:-$recipe}
DATA_DIR=${DATA_DIR:-data/redpajama}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_bf16.json}
teacher=()
if [ -n "${DISTILL:-}" ]; then
  RUN_DIR=${RUN_DIR}_distill
  teacher=(distill.teacher="${TEACHER_DIR:-checkpoints/Llama-2-7b-hf}")
fi
mkdir -p logs "$RUN_DIR"
# shellcheck disable=SC2086
megadrp_train "$RUN_DIR" --config "$CONFIG" model.init="$MODEL_DIR" data_dir="$DATA_DIR" deepspeed="$DS_CONFIG" \
  "${teacher[@]}" ${EXTRA:-}
