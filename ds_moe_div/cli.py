"""`python -m ds_moe_div <command>`: one entry point, and one program name, for the package's tools.

    python -m ds_moe_div train --deepspeed_config ds_configs/ds_zero2_cpu.json --config ds_configs/experiments/tiny.json
    python -m ds_moe_div prepare-corpus --out data/builtin --tier lite --mb-per-subdomain 1
    python -m ds_moe_div eval --run-dir runs/tiny [--checkpoint global_step200] [--max-batches 32] [--tensorboard]
    python -m ds_moe_div compare runs/baseline runs/ed_0.01 --names baseline ed
    python -m ds_moe_div sweep ds_configs/sweeps/objectives.json --dry-run
    python -m ds_moe_div generate runs/tiny --prompt "def add(a, b):" [--max-new-tokens 64 --temperature 0.8 --top-p 0.95]
    python -m ds_moe_div export runs/olmoe_post out/olmoe_post_hf [--overwrite]
    python -m ds_moe_div --version

Multi-process training and evaluation go through the `deepspeed` launcher with scripts/train.py and
scripts/evaluate.py (same arguments as `train` and `eval`).
"""
from __future__ import annotations

import importlib
import sys

PROG = "python -m ds_moe_div"

COMMANDS = {
    "train": ("ds_moe_div.train", "train a model (1 process; use the deepspeed launcher for more)"),
    "prepare-corpus": ("ds_moe_div.corpus.cli", "build the domain-labelled corpus from package registries"),
    "eval": ("ds_moe_div.evaluation.runner", "evaluate a checkpoint: held-out PPL, delta-PPL, routing report"),
    "compare": ("ds_moe_div.evaluation.compare", "side-by-side table of several runs' evaluation reports"),
    "sweep": ("ds_moe_div.sweep.cli", "run a sweep of variants x seeds, evaluate each, compare"),
    "generate": ("ds_moe_div.evaluation.generation", "generate text from a checkpoint (greedy or sampled, 1 process)"),
    "export": ("ds_moe_div.hf.export", "write a checkpoint of an imported model as a Hugging Face directory"),
}


def prog(command: str) -> str:
    """The program name every --help shows for `command` (argparse's prog=)."""
    return f"{PROG} {command}"


def version() -> str:
    from ds_moe_div import __version__
    return f"ds_moe_div {__version__}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(version())
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:16s} {help_text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
