#!/usr/bin/env bash
# Create .venv and install megatron-bottleneck with its test extras (and hf, eval: measure and eval are tested too).
# torch: an existing torch in the venv is kept (GPU clusters keep their own build). Otherwise
# TORCH_SPEC is installed, default torch==2.13.0, which on our CPU machines is the local CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/pip install -q -e ".[test,megatron-lm,hf,eval]"
.venv/bin/python -c "import torch, megatron.core as m; print('ready: torch', torch.__version__, '| megatron-core', m.__version__)"
