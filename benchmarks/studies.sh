#!/usr/bin/env bash
# The test-split studies, in the order the evidence needs them: the ablation (#38) first, then the
# pruning methods (#39) and the controller's signal (#40), which build on its replicates, then the
# paper's open questions (#41). Every study reuses the stages it finished (their stamps), so after
# a stop the same command goes on where it left off; after each study the README's tables are
# rendered again from the results files. About a day on 2 CPU cores from nothing.
#
#   bash benchmarks/studies.sh            # logs: runs/studies/<study>.log
#   SEEDS=3 bash benchmarks/studies.sh    # fewer ablation seeds first (the others use 3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-5}
mkdir -p runs/studies

study() {
  local name=$1
  shift
  echo "[studies] $(date +%H:%M:%S) $name: python $*"
  "$PY" "$@" > "runs/studies/$name.log" 2>&1 || { echo "[studies] $name failed: runs/studies/$name.log" >&2; exit 1; }
  "$PY" benchmarks/readme_results.py --write > /dev/null
}

study ablation benchmarks/ablation.py --seeds "$SEEDS"
study ablation_debian benchmarks/ablation.py --corpus debian --seeds "$SEEDS"
study signals benchmarks/signals.py --seeds 3
study methods benchmarks/methods.py --seeds 3
for q in scratch posttrain architecture convergence ratio; do
  study "open_questions_$q" benchmarks/open_questions.py "$q" --seeds 3
done
echo "[studies] $(date +%H:%M:%S) done: benchmarks/results/ holds every study; commit it with README.md"
