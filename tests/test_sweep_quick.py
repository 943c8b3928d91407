"""End to end: `python -m ds_moe_div.sweep ds_configs/sweeps/objectives.json --quick` through the real
deepspeed launcher and the eval command (2 variants x 1 seed x 20 steps, ~30-60 s on 2 cores), then a
second invocation that finds both runs finished and only rebuilds the comparison.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_moe_div.sweep.runner import eval_available
from tests.dist_utils import run_command

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "ds_configs" / "sweeps" / "objectives.json"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not eval_available(), reason="no `ds-moe-div eval` command in ds_moe_div/cli.py "
                                 "yet: the sweep evaluates every run with it")]


def sweep(cwd: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run the sweep CLI; on timeout kill its whole process group (launcher and ranks included)."""
    cmd = [sys.executable, "-m", "ds_moe_div.sweep", str(SWEEP), "--quick", "--no-progress", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return run_command(cmd, cwd=cwd, env=env, timeout=timeout)


def test_quick_sweep_trains_evaluates_compares_and_skips_finished_runs(tmp_path):
    first = sweep(tmp_path)
    out_dir = tmp_path / "runs" / "sweeps" / "objectives-quick"
    assert first.returncode == 0, first.stdout[-6000:]
    for variant in ("baseline", "ed3_0.01"):
        run_dir = out_dir / variant / "seed0"
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step20"
        assert list(run_dir.glob("eval/*/report.json")) and (run_dir / "train.log").is_file()
    rows = list(csv.DictReader((out_dir / "comparison.csv").open()))
    assert [r["variant"] for r in rows] == ["baseline", "ed3_0.01"]
    assert float(rows[0]["lm_loss_mean"]) > 0 and "routing/mi/mean_mean" in rows[0]
    assert "| ed3_0.01 | 1 |" in (out_dir / "comparison.md").read_text()
    for name in ("loss_curves.png", "delta_ppl_per_layer.png", "heatmaps.png"):
        assert (out_dir / name).stat().st_size > 0
    again = sweep(tmp_path, timeout=120)
    assert again.returncode == 0, again.stdout[-6000:]
    assert again.stdout.count("already finished: skipped") == 2
