#!/usr/bin/env bash
# Wheels the GPU check needs on a machine that has torch but no network (the lent GPU machines:
# Python 3.12, x86-64; their image has transformers, sentencepiece, scipy, pytest, but not
# DeepSpeed or pydantic). Run here, where pip reaches PyPI; the wheels land in .whl/ (ignored by
# git), which travels with the working tree, and benchmarks/gpu_check.sh installs them there.
#
#   bash benchmarks/gpu_wheels.sh            # PY_VERSION=3.12 by default
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
PYV=${PY_VERSION:-3.12}
# the versions this checkout's CPU environment runs (pure Python except pydantic-core)
pkgs=("deepspeed==0.19.8" "hjson==3.1.0" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0"
      "typing-inspection==0.4.5")
mkdir -p .whl
for p in "${pkgs[@]}"; do
  if [[ $p == deepspeed* ]]; then  # an sdist on PyPI: build a pure-Python wheel here (no ops are prebuilt)
    $PIP wheel -q --no-deps --no-build-isolation -w .whl "$p" || $PIP wheel -q --no-deps -w .whl "$p"
  else
    $PIP download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$p"
  fi
done
ls -la .whl
