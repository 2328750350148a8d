#!/bin/bash
# One prune stage through slurm/_common.sh's megadrp_train, for tests/test_cluster.py: what a
# site's batch script does, with the inputs a test made (STAGE_DIR/data, STAGE_DIR/pretrain/hf).
#SBATCH --job-name=megadrp-stage
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --open-mode=append
#SBATCH --requeue
export MEGADRP_REPO=${MEGADRP_REPO:?}
source "$MEGADRP_REPO/slurm/_common.sh"
export DS_ACCELERATOR=cpu
# shellcheck disable=SC2086
megadrp_train "$STAGE_DIR/prune" --config configs/tiny/prune.yaml data_dir="$STAGE_DIR/data" \
  model.init="$STAGE_DIR/pretrain/hf" train.steps="${STEPS:-30}" train.seq_len=32 train.global_batch=8 \
  train.micro_batch=2 eval.interval=5 eval.tokens_per_domain=512 save.interval=5 train.num_workers=1 \
  prune.target.hidden_size=48 prune.target.intermediate_size=64 prune.target.num_hidden_layers=1 \
  prune.target.num_attention_heads=2 prune.target.num_key_value_heads=1 ${EXTRA:-}
echo "megadrp stage: done"
