#!/bin/bash
# The whole recipe as chained jobs: preprocessing (array, one domain a task) → merge of
# the per-domain manifests → prune → continue. Run it (not sbatch it) from the repository root:
#
#   RAW_DIR=raw/redpajama TOKENIZER=checkpoints/Llama-2-7b-hf MODEL_DIR=checkpoints/Llama-2-7b-hf \
#     bash slurm/pipeline_7b.sh
#
# Environment: RAW_DIR (RAW_DIR/<domain>/*.jsonl), TOKENIZER, MODEL_DIR, DATA_DIR
# [data/redpajama], DOMAINS ["cc github book stackexchange wiki arxiv c4"], TARGET [1.3b],
# PYTHON, and anything prune_7b.sh / continue_7b.sh read.
set -euo pipefail
cd "$(dirname "$0")/.."
export MEGADRP_REPO=$PWD
export DOMAINS=${DOMAINS:-"cc github book stackexchange wiki arxiv c4"}
export DATA_DIR=${DATA_DIR:-data/redpajama} TARGET=${TARGET:-1.3b}
: "${RAW_DIR:?set RAW_DIR}" "${TOKENIZER:?set TOKENIZER}" "${MODEL_DIR:?set MODEL_DIR}"
export RAW_DIR TOKENIZER MODEL_DIR
mkdir -p logs
read -r -a domains <<< "$DOMAINS"
# afterok: a stage starts only when the previous one exited 0. A requeued prune job is pending
# again, not finished, so continue waits for its final run; a prune run stopped and not
# requeued exits 3 (slurm/_common.sh), so continue never starts on a missing hf/.
n=${#domains[@]}
pre=$(sbatch --parsable --array=0-$((n - 1)) ${PRE_SBATCH_ARGS:-} slurm/preprocess_array.sh)
merge=$(sbatch --parsable --dependency=afterok:$pre --kill-on-invalid-dep=yes --ntasks=1 --job-name=megadrp-merge --output=%x-%j.out \
  --open-mode=append \
  --wrap "${PYTHON:-python} -m megadrp merge --out $DATA_DIR $(printf "$DATA_DIR/parts/%s " "${domains[@]}")")
prune=$(sbatch --parsable --dependency=afterok:$merge --kill-on-invalid-dep=yes ${PRUNE_SBATCH_ARGS:-} slurm/prune_7b.sh)
cont=$(MODEL_DIR=${CONTINUE_MODEL_DIR:-${SCRATCH:+$SCRATCH/megadrp/}runs/prune_7b_$TARGET/hf} sbatch --parsable --dependency=afterok:$prune --kill-on-invalid-dep=yes \
  ${CONTINUE_SBATCH_ARGS:-} slurm/continue_7b.sh)
echo "submitted: preprocess $pre, merge $merge, prune $prune, continue $cont"
