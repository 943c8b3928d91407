"""Sweeps: a base experiment config, named variants and seeds, run through the deepspeed launcher.

    python -m ds_moe_div sweep ds_configs/sweeps/objectives.json [--quick] [--dry-run] [--only VARIANT ...]

Modules: config (the sweep file), plan (runs, order, states on disk), launch (commands, processes),
runner (train / resume / evaluate, failures), aggregate (tables), plots (figures), cli.
Import has no side effects.
"""
