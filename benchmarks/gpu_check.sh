#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: a ~0.94B Llama pruned on one GPU in bf16 ZeRO-3 for a few
# minutes; records tokens/s and model FLOPs utilisation with the GPU's name in
# benchmarks/results/gpu_check.{json,md}. See benchmarks/gpu_check.py for the options.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to pick the interpreter; STEPS=40
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py --steps "${STEPS:-40}" "$@"
