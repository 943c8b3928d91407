#!/usr/bin/env bash
# The test suite: set up the pinned environment, then pytest (the network-marked corpus test is
# deselected here; run it with `.venv/bin/python -m pytest -m network`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}  # this venv's own ops cache
exec .venv/bin/python -m pytest -m "not network" -q -p no:cacheprovider "$@"
