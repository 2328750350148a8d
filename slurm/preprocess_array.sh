#!/bin/bash
# One domain per array task: tokenise RAW_DIR/<domain>/*.jsonl* into DATA_DIR/parts/<domain>.
# Used by pipeline_7b.sh; DOMAINS is a space-separated list, TOKENIZER a tokenizer directory.
#SBATCH --job-name=megadrp-preprocess
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --open-mode=append
source "${MEGADRP_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/_common.sh"
read -r -a domains <<< "${DOMAINS:?set DOMAINS}"
d=${domains[${SLURM_ARRAY_TASK_ID:-0}]}
"$PYTHON" -m megadrp preprocess --input "$d=${RAW_DIR:?set RAW_DIR}/$d/*.jsonl*" \
  --tokenizer "${TOKENIZER:?set TOKENIZER}" --out "${DATA_DIR:?set DATA_DIR}/parts/$d" \
  --workers "${SLURM_CPUS_PER_TASK:-1}" --eval-docs "${EVAL_DOCS:-500}" --overwrite
