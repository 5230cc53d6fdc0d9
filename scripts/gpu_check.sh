#!/usr/bin/env bash
# Accelerator readiness in one command (parity, bf16 and fp16 training steps, peak memory, speed
# against timm); on a machine without CUDA the same checks run small on the CPU. See gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
elif python3 -c "import torch, safetensors" 2>/dev/null; then
  PY=python3  # a machine that has PyTorch already (a GPU image): run from the checkout
else
  . scripts/_env.sh test
  PY=python
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" scripts/gpu_check.py "$@"
