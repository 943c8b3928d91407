"""A short golden loss curve per MoE backend: 8 steps of the smoke config on the fixture, 1 rank, every
objective on, on the default AutoEP path and on DeepSpeed's native capacity-based layer.

A change that silently alters the model, the data order, the routing or a loss term moves these
numbers. After an intended change, regenerate with:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""
import json
import os
from pathlib import Path

import pytest

from tests.dist_utils import run_on_ranks
from tests.test_training import DS_ZERO2, SMOKE

GOLDEN = Path(__file__).parent / "golden"
STEPS = 8


def _curve(rank, world_size, tmp, backend):
    from ds_moe_div.config import load_experiment
    from ds_moe_div.session import build
    from ds_moe_div.train import train_step

    cfg = load_experiment(SMOKE, [f"train.run_dir={tmp}/run", "train.show_progress=false", f"train.steps={STEPS}",
                                  f"model.backend={backend}"])
    state = build(cfg, json.loads(DS_ZERO2.read_text()))
    curve = []
    for _ in range(STEPS):
        train_step(state.engine, state.train_iter, state.composer, state.window, step=state.step)
        state.step += 1
        losses = state.window.last
        curve.append({"lm": float(losses.lm), **{k: float(v) for k, v in losses.unscaled.items()}})
        state.window.reset()
    return curve


@pytest.mark.parametrize("backend", ["autoep", "native"])
def test_loss_curve_matches_golden(tmp_path, backend):
    curve = run_on_ranks(_curve, world_size=1, args=(str(tmp_path), backend), timeout=300)[0]
    golden_file = GOLDEN / f"smoke_losses_{backend}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden_file.write_text(json.dumps(curve, indent=1) + "\n")
    golden = json.loads(golden_file.read_text())
    assert len(curve) == len(golden)
    for step, (got, want) in enumerate(zip(curve, golden)):
        assert got.keys() == want.keys(), step
        for key in want:
            # fp32 on CPU: reduction order may differ across CPUs/threads; anything real moves far more.
            assert got[key] == pytest.approx(want[key], rel=2e-3, abs=1e-5), (step, key)
