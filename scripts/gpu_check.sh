#!/usr/bin/env bash
# One command on a machine with CUDA GPUs: install what is missing, then run scripts/gpu_check.py (bf16
# ZeRO-2 end to end, bf16-vs-fp32 gradient parity with twice-used modules, tokens/s, MFU, peak memory;
# results under docs/results/gpu_check/). Arguments go to gpu_check.py (--dry-run, --out, --work-dir).
#
# The environment is .venv-gpu, created with --system-site-packages so that the image's CUDA build of
# torch is used as it is (a torch is installed only when none imports); DeepSpeed is pinned to 0.19.8 and
# this package is installed editable with its declared dependencies. Offline machines: set
# GPU_CHECK_WHEELS=<dir> holding the wheels/sdists (pip download deepspeed==0.19.8 -e . on a connected one).
# Without a GPU it refuses in one line (exit 3) before installing anything; --dry-run only prints the plan.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then exec "$PY" scripts/gpu_check.py "$@"; fi
done
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU on this machine (nvidia-smi finds none): nothing to check; pass --dry-run for the plan" >&2
  exit 3
fi
PIP_OPTS=(-q)
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then PIP_OPTS+=(--no-index --find-links "$GPU_CHECK_WHEELS"); fi
[ -x .venv-gpu/bin/python ] || "$PY" -m venv --system-site-packages .venv-gpu
VPY=.venv-gpu/bin/python
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv-gpu/torch_extensions}
export PATH="$PWD/.venv-gpu/bin:$PATH"
"$VPY" -c "import torch" 2>/dev/null || "$VPY" -m pip install "${PIP_OPTS[@]}" torch
"$VPY" -c "import deepspeed, sys; sys.exit(deepspeed.__version__ != '0.19.8')" 2>/dev/null \
  || "$VPY" -m pip install "${PIP_OPTS[@]}" deepspeed==0.19.8
"$VPY" -m pip show -q ds_moe_div >/dev/null 2>&1 || "$VPY" -m pip install "${PIP_OPTS[@]}" -e .
"$VPY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())"
# ds_zero2_gpu_bf16.json uses DeepSpeed's FusedAdam, JIT-compiled with nvcc on first use.
command -v nvcc >/dev/null 2>&1 || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] \
  || echo "gpu_check: warning: nvcc not found (set CUDA_HOME): DeepSpeed cannot JIT-compile FusedAdam, so the e2e stage will fail" >&2
exec "$VPY" scripts/gpu_check.py "$@"
