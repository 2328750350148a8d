#!/bin/bash
# The tiny CPU pipeline on any Slurm cluster: embedded corpus → tokenizer → shards →
# pretrain → prune (drpruning) → continue, each training stage as 2 ranks of ZeRO-3 on CPU.
#
#   sbatch slurm/smoke.sh                          # from the repository root
#
# Environment: RUN_ROOT [runs/smoke], PYTHON [.venv/bin/python if present, else python],
# STEPS [20] training steps per stage, EXTRA (overrides for every stage), and those of
# slurm/_common.sh (MAX_RESTARTS, MEGADRP_NO_REQUEUE, ...).
# Requeue (slurm/_common.sh): --signal=B:USR1 reaches the batch shell before the time limit, which
# has the step checkpoint and stop, then requeues the job (--requeue), at most MAX_RESTARTS [20]
# times; it resumes from the checkpoint. --open-mode=append keeps every segment in the one log
# (%j is the same after a requeue; the default truncates it). A run stopped and not requeued
# (MEGADRP_NO_REQUEUE=1, the cap reached) exits 3, so `afterok` dependants do not start.
#SBATCH --job-name=megadrp-smoke
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
export MEGADRP_REPO=${MEGADRP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ -z "${PYTHON:-}" ] && [ -x "$MEGADRP_REPO/.venv/bin/python" ]; then PYTHON=$MEGADRP_REPO/.venv/bin/python; fi
source "$MEGADRP_REPO/slurm/_common.sh"
export DS_ACCELERATOR=cpu
RUN_ROOT=${RUN_ROOT:-runs/smoke}
STEPS=${STEPS:-20}
mkdir -p logs "$RUN_ROOT"
if [ ! -f "$RUN_ROOT/data/manifest.json" ]; then
  "$PYTHON" -m megadrp synth-corpus --out "$RUN_ROOT/corpus" --docs-per-domain 300
  "$PYTHON" -m megadrp tokenizer --input "$RUN_ROOT"/corpus/*.jsonl --vocab-size 1024 --out "$RUN_ROOT/tokenizer"
  inputs=(); for f in "$RUN_ROOT"/corpus/*.jsonl; do n=$(basename "$f" .jsonl); inputs+=(--input "$n=$f"); done
  "$PYTHON" -m megadrp preprocess "${inputs[@]}" --tokenizer "$RUN_ROOT/tokenizer" --out "$RUN_ROOT/data" \
    --workers 2 --eval-docs 20 --overwrite
fi
# megadrp_train returns only when its run is done (it requeues or exits otherwise), so a
# requeued job skips the stages whose hf/ exists and resumes the one that was interrupted.
common=(data_dir="$RUN_ROOT/data" train.steps="$STEPS" train.seq_len=32 train.global_batch=8 train.micro_batch=2
        eval.interval=5 eval.tokens_per_domain=512 save.interval=5 train.num_workers=1)
# shellcheck disable=SC2086
[ -f "$RUN_ROOT/pretrain/hf/config.json" ] || megadrp_train "$RUN_ROOT/pretrain" --config configs/tiny/pretrain.yaml \
  "${common[@]}" model.shape.hidden_size=64 model.shape.intermediate_size=128 model.shape.num_hidden_layers=2 \
  model.shape.num_attention_heads=4 model.shape.num_key_value_heads=2 ${EXTRA:-}
# shellcheck disable=SC2086
[ -f "$RUN_ROOT/prune/hf/config.json" ] || megadrp_train "$RUN_ROOT/prune" --config configs/tiny/prune.yaml \
  "${common[@]}" model.init="$RUN_ROOT/pretrain/hf" prune.target.hidden_size=48 prune.target.intermediate_size=64 \
  prune.target.num_hidden_layers=1 prune.target.num_attention_heads=2 prune.target.num_key_value_heads=1 ${EXTRA:-}
# shellcheck disable=SC2086
[ -f "$RUN_ROOT/continue/hf/config.json" ] || megadrp_train "$RUN_ROOT/continue" --config configs/tiny/continue.yaml \
  "${common[@]}" model.init="$RUN_ROOT/prune/hf" ${EXTRA:-}
echo "megadrp smoke: done; model in $RUN_ROOT/continue/hf"
