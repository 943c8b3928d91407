#!/usr/bin/env bash
# Create .venv with the pinned stack. torch goes first: on this kind of machine `torch==2.13.0` is a CPU
# build from local disk; anything looser would download several GB of CUDA wheels.
# DeepSpeed's JIT-compiled ops go into .venv/torch_extensions (not ~/.cache/torch_extensions, which
# venvs with other torch builds share: rebuilds, or a stale op loaded) unless TORCH_EXTENSIONS_DIR is set.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q deepspeed==0.19.8
.venv/bin/pip install -q -e ".[test,hf,eval]"  # hf: the imported-family parity tests; eval: the lm-eval bridge test
