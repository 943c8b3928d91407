"""Routing over training: curves read back from TensorBoard, per-run and comparison figures, MaxVio RMSE.

    .venv/bin/python -m pytest tests/test_training_curves.py -q
"""
from __future__ import annotations

import math

import pytest

from ds_moe_div import rundir
from ds_moe_div.evaluation import training_curves as tc
from ds_moe_div.monitor import Monitor


def _log_run(run_dir, maxvio_mean: dict[int, float]) -> None:
    monitor = Monitor(rundir.tensorboard_dir(run_dir), enabled=True)
    for step, value in maxvio_mean.items():
        monitor.scalars({"routing/max_violation_global/mean": value, "routing/max_violation_global/layer_0": value,
                         "routing/mi/layer_0": 0.1 * step, "routing/d_inter/mean": 0.01 * step,
                         "routing/max_violation/mean": 9.0, "train/lm_loss": 3.0}, step)
    monitor.close()


def test_curve_rmse_by_hand():
    rmse, steps = tc.curve_rmse({1: 0.5, 2: 0.3, 3: 0.2}, {2: 0.1, 3: 0.5, 4: 1.0})
    assert steps == 2 and rmse == pytest.approx(math.sqrt((0.2**2 + 0.3**2) / 2))
    assert tc.curve_rmse({1: 0.5}, {2: 0.5}) == (None, 0)


def test_curves_read_back_and_figures_and_comparison(tmp_path):
    _log_run(tmp_path / "a", {2: 0.5, 4: 0.3, 6: 0.2})
    _log_run(tmp_path / "b", {2: 0.4, 4: 0.35, 6: 0.1, 8: 0.05})
    curves = tc.routing_curves(tc.read_scalars(tmp_path / "a"))
    assert set(curves) == {"max_violation_global", "mi", "d_inter"}  # routing/max_violation is not a curve
    assert set(curves["max_violation_global"]) == {"mean", "layer_0"}
    assert curves["max_violation_global"]["mean"] == pytest.approx({2: 0.5, 4: 0.3, 6: 0.2})
    assert tc.write_run_figure(tmp_path / "a", tmp_path / "out") == ["figures/training_curves.png"]
    assert (tmp_path / "out" / "figures" / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    lines, rows = tc.comparison(["a", "b", "none"], [tmp_path / "a", tmp_path / "b", tmp_path / "missing"],
                                tmp_path / "cmp")
    want = math.sqrt((0.1**2 + 0.05**2 + 0.1**2) / 3)
    assert rows[0][:2] == ["training/max_violation_global_rmse", ""] and float(rows[0][2]) == pytest.approx(want)
    assert rows[0][3] == "" and rows[1] == ["training/max_violation_global_rmse_steps", "", "3", "0"]
    assert f"| b | {want:.4g} | 3 |" in lines and "| none | n/a | 0 |" in lines
    assert (tmp_path / "cmp" / "figures" / "training_curves.png").is_file()
    assert tc.comparison(["x"], [tmp_path / "missing"], tmp_path / "nothing") == ([], [])
    assert tc.write_run_figure(tmp_path / "missing", tmp_path / "nothing") == []
