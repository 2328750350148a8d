#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU, about 5–8 minutes on one H100/H200 (see
# benchmarks/gpu_check.py): numerics (GPU vs CPU fp32, bf16 + checkpointing vs fp32), the flash
# SDPA kernel, a ~0.94B random Llama pruned on ZeRO-3 bf16 for STEPS steps (tokens/s, MFU, peak
# memory against the memory plan), the distillation step's cost (KD / LM at the 7B → 2.7B and 7B → 1.3B
# proportions), then the unit tests with the GPUs hidden. Results land in
# benchmarks/results/gpu_check.{json,md} (OUT=dir to write elsewhere).
#
#   bash benchmarks/gpu_check.sh       # PYTHON=..., STEPS=30, OUT=benchmarks/results
# A machine without network: run benchmarks/gpu_wheels.sh where pip works first; the wheels in
# .whl/ are installed here into a private folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/megadrp_site .whl/*.whl
  export PYTHONPATH=/tmp/megadrp_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
"$PY" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(0))"
status=0
timeout "${CHECK_TIMEOUT:-420}" "$PY" benchmarks/gpu_check.py --steps "${STEPS:-30}" \
  --out "${OUT:-benchmarks/results}" "$@" || status=$?
# the CPU suite's unit tests on a host whose GPU is hidden: CPU accelerator, gloo
CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu timeout "${UNIT_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider \
  tests/unit || status=$?
exit $status
