#!/usr/bin/env bash
# The embedded default, end to end: install the pinned stack, build the data, train the small default
# config on 2 CPU ranks through the deepspeed launcher, and print where the logs and checkpoint are.
# Re-running continues the same run (--resume) once a checkpoint exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
RUN_DIR=${RUN_DIR:-runs/tiny}
resume=()
[ -f "$RUN_DIR/checkpoints/latest" ] && resume=(--resume)
.venv/bin/deepspeed --num_gpus 2 scripts/train.py \
    --deepspeed_config ds_configs/ds_zero2_cpu.json \
    --config ds_configs/experiments/tiny.json \
    --override "train.run_dir=$RUN_DIR" "${resume[@]}" "$@"
