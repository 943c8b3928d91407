"""Launch-script entry for `deepspeed` / `torchrun` (they need a file path): see ds_moe_div/train.py.

    deepspeed --num_gpus 2 scripts/train.py --deepspeed_config ds_configs/ds_zero2_cpu.json \
        --config ds_configs/experiments/tiny.json
"""
import sys

from ds_moe_div.train import main

if __name__ == "__main__":
    sys.exit(main())
