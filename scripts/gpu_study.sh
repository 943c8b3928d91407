#!/usr/bin/env bash
# The GPU pilot in one command (docs/results/gpu/): baseline vs L_ED 3-class 0.01 x 3 seeds on one
# H100/H200, ~9 minutes, side-by-side single-rank runs, evaluation included; prints one summary table.
#   bash scripts/gpu_study.sh [--dry-run] [--corpus-dir data/builtin] [--runs-dir ...] [--out docs/results/gpu]
# Refuses without a GPU (one line, exit 2). Otherwise installs only what is missing into the Python it
# runs with ($PYTHON, else .venv/bin/python, else python3): torch only if absent, deepspeed==0.19.8, this
# package (--no-deps) and its other requirements. --dry-run prints the plan and writes nothing (CPU is fine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python; } || PY=python3
for arg in "$@"; do
  [ "$arg" = "--dry-run" ] && exec env PYTHONPATH="$PWD" "$PY" scripts/gpu_study.py "$@"
done
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  echo "gpu_study: no NVIDIA GPU found (nvidia-smi lists none); this pilot needs one (--dry-run prints its plan)" >&2
  exit 2
fi
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch
"$PY" -c "import deepspeed, sys; sys.exit(deepspeed.__version__ != '0.19.8')" 2>/dev/null \
  || "$PY" -m pip install -q deepspeed==0.19.8
"$PY" -c "import ds_moe_div" 2>/dev/null || "$PY" -m pip install -q --no-deps -e .
"$PY" -m pip install -q "datasets>=2.19" "tokenizers>=0.15" "tensorboard>=2.14" "pyyaml>=6" "tqdm>=4.60" \
  "matplotlib>=3.7" "numpy>=1.24" "pyarrow>=14" "psutil>=5.9"
unset DS_ACCELERATOR
exec env PYTHONPATH="$PWD" "$PY" scripts/gpu_study.py "$@"
