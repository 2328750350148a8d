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
#   PYTHON, EXTRA, MAX_RESTARTS, ... as in prune_7b.sh
# Requeue (slurm/_common.sh): --signal=B:USR1 reaches the batch shell before the time limit, which
# has the step checkpoint and stop, then requeues the job (--requeue), at most MAX_RESTARTS [20]
# times; it resumes from the checkpoint. --open-mode=append keeps every segment in the one log
# (%j is the same after a requeue; the default truncates it). A run stopped and not requeued
# (MEGADRP_NO_REQUEUE=1, the cap reached) exits 3, so `afterok` dependants do not start.
#SBATCH --job-name=megadrp-continue
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
source "${MEGADRP_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/_common.sh"
TARGET=${TARGET:-1.3b}
MODEL_DIR=${MODEL_DIR:-runs/prune_7b_$TARGET/hf}
RUN_DIR=${RUN_DIR:-runs/continue_7b_$TARGET}
case $TARGET in
  1.3b|2.7b)  recipe=configs/continue_$TARGET.yaml ;;
  qwen2-1.8b) recipe=configs/continue_qwen2_1.8b.yaml; DATA_DIR=${DATA_DIR:-data/culturax} ;;
  *) recipe=""; [ -n "${CONFIG:-}" ] || { echo "megadrp: TARGET=$TARGET has no continued-pretraining recipe; set CONFIG" >&2; exit 2; } ;;
esac
CONFIG=${CONFIG:-$recipe}
DATA_DIR=${DATA_DIR:-data/redpajama}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_bf16.json}
mkdir -p logs "$RUN_DIR"
# shellcheck disable=SC2086
megadrp_train "$RUN_DIR" --config "$CONFIG" model.init="$MODEL_DIR" data_dir="$DATA_DIR" deepspeed="$DS_CONFIG" ${EXTRA:-}
