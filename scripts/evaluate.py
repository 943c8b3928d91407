"""Launch-script entry for `deepspeed` / `torchrun` (they need a file path): see ds_moe_div/evaluation/runner.py.

    deepspeed --num_gpus 2 scripts/evaluate.py --run-dir runs/tiny --max-batches 32 --permutation-seeds 3
"""
import sys

from ds_moe_div.evaluation.runner import main

if __name__ == "__main__":
    sys.exit(main())
