"""The shipped baselines sweeps (issue 14 item 7): 6 balancing methods x (nothing, L_ED, L_o + L_v), from
scratch and as post-training; their eval arguments parse; the quick version runs end to end and its
comparison shows accuracy and PPL side by side.

They use the balancing keys objectives.balance.method / gamma and scope "sequence": where this config
tree lacks them, the tests skip naming the key (tests/test_sweep_config.plan_or_skip).
"""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest

from ds_moe_div.evaluation.runner import parse_args
from ds_moe_div.sweep.config import load_sweep
from tests.dist_utils import run_command
from tests.test_sweep_config import plan_or_skip

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "ds_configs" / "sweeps" / "baselines.json"
POSTTRAIN = ROOT / "ds_configs" / "sweeps" / "baselines_posttrain.json"
METHODS = ("aux_micro", "aux_global", "aux_seq", "loss_free", "st_moe", "none")
OBJECTIVES = ("", "+ed", "+ov")


def _expect(config, variant: str) -> None:
    method, _, extra = variant.removeprefix("ft_").partition("+")
    balance, objectives = config.objectives.balance, config.objectives
    assert balance.method == {"loss_free": "loss_free", "none": "none"}.get(method, "aux"), variant
    if method.startswith("aux_"):
        assert balance.scope == {"aux_micro": "micro_batch", "aux_global": "global_batch",
                                 "aux_seq": "sequence"}[method] and balance.coef > 0
    assert (objectives.z_loss.coef > 0) == (method == "st_moe"), variant
    assert (balance.coef == 0) == (method in ("loss_free", "none")), variant
    assert (objectives.divergence.coef > 0) == (extra == "ed"), variant
    assert (objectives.orthogonality.coef > 0) == (objectives.variance.coef > 0) == (extra == "ov"), variant


@pytest.mark.parametrize("path", [SCRATCH, POSTTRAIN], ids=["scratch", "posttrain"])
def test_the_sweeps_cover_every_method_with_every_objective_set(path):
    sweep = load_sweep(path)
    prefix = "ft_" if path == POSTTRAIN else ""
    wanted = {f"{prefix}{m}{o}" for m in METHODS for o in OBJECTIVES}
    assert wanted <= set(sweep.variants) and sweep.reference_variant == f"{prefix}aux_micro"
    for spec in (sweep.eval, sweep.quick.eval):
        args = parse_args(["--run-dir", "x", *spec.args])  # every eval argument is one `eval` accepts
        assert spec.args == () or args.tasks == ["cloze"]
    plan = plan_or_skip(sweep, path)
    for run in plan.runs:
        if run.variant in wanted:
            _expect(run.config, run.variant)
            assert (run.parent is not None) == (path == POSTTRAIN)
    # one MoE path: every run is dropless on AutoEP, except the one row that exists to measure token dropping
    capacity = [run for run in plan.runs if run.variant == "gshard_capacity2"]
    assert bool(capacity) == (path == SCRATCH)
    for run in plan.runs:
        model = run.config.model
        assert model.uses_autoep == (run not in capacity), run.variant
        assert run not in capacity or (model.moe.capacity_factor == 2.0 and model.moe.drop_tokens)


@pytest.mark.slow
def test_quick_baselines_sweep_compares_accuracy_and_ppl(tmp_path):
    plan_or_skip(load_sweep(SCRATCH), SCRATCH, quick=True)
    cmd = [sys.executable, "-m", "ds_moe_div.sweep", str(SCRATCH), "--quick", "--no-progress"]
    proc = run_command(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=420)
    assert proc.returncode == 0, proc.stdout[-6000:]
    table = next((tmp_path / "runs" / "sweeps").rglob("comparison.csv"))
    rows = list(csv.DictReader(table.read_text().splitlines()))
    assert [r["variant"] for r in rows] == ["aux_micro", "loss_free+ed", "none+ov"]
    for row in rows:
        assert float(row["ppl_mean"]) > 1 and 0 <= float(row["tasks/cloze/acc_mean"]) <= 1, row
    markdown = table.with_name("comparison.md").read_text()
    assert "## Downstream tasks and expert ablation" in markdown and "tasks/cloze/acc" in markdown
