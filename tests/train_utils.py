"""Train the smoke model in-process for a few steps and save it: the checkpoint that end-to-end tests of
evaluation and generation start from (call inside a `run_on_ranks` function).

    state = train_smoke(run_dir, steps=2, overrides=["model.moe.ep_size=2"])   # trained and saved
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "ds_configs" / "experiments" / "smoke.json"
DS_ZERO2 = ROOT / "ds_configs" / "ds_zero2_cpu.json"


def train_smoke(run_dir, *, steps: int, overrides: Sequence[str] = (), warmup_steps: int = 1,
                lr: float | None = None):
    """Build the smoke config (+ `overrides`) on ZeRO-2, run `steps` optimizer steps with the trainer's own
    `train_step`, save, and return the session state (engine still open)."""
    from ds_moe_div.config import load_experiment
    from ds_moe_div.session import build
    from ds_moe_div.train import train_step

    cfg = load_experiment(SMOKE, [f"train.run_dir={run_dir}", "train.show_progress=false", f"train.steps={steps}",
                                  *overrides])
    ds = json.loads(DS_ZERO2.read_text())
    ds["scheduler"]["params"].update(total_num_steps=steps, warmup_num_steps=warmup_steps)
    if lr is not None:
        ds["optimizer"]["params"]["lr"] = lr
    state = build(cfg, ds)
    for _ in range(steps):
        train_step(state.engine, state.train_iter, state.composer, state.window, step=state.step)
        state.step += 1
        state.window.reset()
    state.save()
    return state
