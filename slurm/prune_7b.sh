#!/bin/bash
# DRPruning of Llama-2-7B to 1.3B (or 2.7B with TARGET=2.7b): SPEC §4's pruning recipe,
# 3200 steps × 32 × 4096 tokens on one node of 8 GPUs.
#
#   sbatch slurm/prune_7b.sh                       # from the repository root
#
# Environment (defaults in brackets):
#   MODEL_DIR   Hugging Face Llama-2-7B directory       [checkpoints/Llama-2-7b-hf]
#   DATA_DIR    DATA_DIR from `megadrp preprocess`   [data/redpajama]
#   TARGET      1.3b | 2.7b (Llama-2-7B) | qwen2-1.8b (Qwen2-7B, SPEC §4's multilingual recipe)
#               | llama31-4b (Llama-3.1-8B → the Minitron-4B-Width shape)
#               | qwen3-4b (Qwen3-8B → Qwen3-4B's shape)                   [1.3b]
#   RUN_DIR     where the run writes                     [runs/prune_7b_$TARGET]
#   CONFIG      recipe                                   [configs/llama2_7b_to_$TARGET.yaml]
#   DS_CONFIG   DeepSpeed JSON                           [ds_configs/zero3_bf16.json]
#   PYTHON      interpreter with megadrp installed       [python]
#   EXTRA       more dotted overrides, e.g. "dro.mode=sheared train.micro_batch=2"
#   MAX_RESTARTS, MEGADRP_NO_REQUEUE, MEGADRP_MASTER_ADDR, MEGADRP_MASTER_PORT: see slurm/_common.sh
# Multi-node: sbatch --nodes=2 slurm/prune_7b.sh (global batch stays 32: on 16 ranks the
# micro-batch drops to 2, on 32 ranks to 1; 64 ranks cannot hold 32 sequences and are refused).
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
#SBATCH --job-name=megadrp-prune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
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
case $TARGET in
  1.3b|2.7b)  recipe=configs/llama2_7b_to_$TARGET.yaml; model=checkpoints/Llama-2-7b-hf; data=data/redpajama ;;
  qwen2-1.8b) recipe=configs/qwen2_7b_to_1.8b.yaml;     model=checkpoints/Qwen2-7B;      data=data/culturax ;;
  llama31-4b) recipe=configs/llama31_8b_to_4b.yaml;     model=checkpoints/Llama-3.1-8B;  data=data/redpajama ;;
  qwen3-4b)   recipe=configs/qwen3_8b_to_4b.yaml;       model=checkpoints/Qwen3-8B;      data=data/redpajama ;;
  *) echo "megadrp: TARGET=$TARGET: expected 1.3b, 2.7b, qwen2-1.8b, llama31-4b or qwen3-4b (or set CONFIG)" >&2; exit 2 ;;
esac
MODEL_DIR=${MODEL_DIR:-$model}
DATA_DIR=${DATA_DIR:-$data}
RUN_DIR=${RUN_DIR:-${SCRATCH:+$SCRATCH/megadrp/}runs/prune_7b_$TARGET}
CONFIG=${CONFIG:-$recipe}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_bf16.json}
mkdir -p logs "$RUN_DIR"
# shellcheck disable=SC2086
megadrp_train "$RUN_DIR" --config "$CONFIG" model.init="$MODEL_DIR" data_dir="$DATA_DIR" deepspeed="$DS_CONFIG" ${EXTRA:-}
