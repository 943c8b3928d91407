"""Planning: run order, --only, --quick subsets, run-dir states (finished / needs-eval / resume / fresh / conflict)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ds_moe_div.config_loader import ConfigError, to_dict
from ds_moe_div.sweep.config import load_sweep
from ds_moe_div.sweep.plan import State, build_plan, detect, select
from tests.test_sweep_config import write_sweep

VARIANTS = {"pre": ["train.steps=4"], "ft": {"init_from": "pre", "overrides": ['data.include_labels=["math"]']},
            "ed": ["objectives.divergence.coef=0.01", "data.shuffle_labels_seed={seed}"], "base": []}


@pytest.fixture
def plan(tmp_path):
    path = write_sweep(tmp_path, variants=VARIANTS, seeds=[0, 1], base_overrides=["train.steps=6"])
    return build_plan(load_sweep(path), path)


def fake_checkpoint(run, step: int, config: dict | None = None) -> None:
    root = run.run_dir / "checkpoints"
    (root / f"global_step{step}").mkdir(parents=True, exist_ok=True)
    (root / "latest").write_text(f"global_step{step}")
    saved = {"config": config or to_dict(run.config), "architecture": {}, "step": step}
    (root / f"global_step{step}" / "run_config.json").write_text(json.dumps(saved))


def fake_report(run, step: int, split: str = "test", tag: str = "final", column: str = "domain") -> Path:
    path = run.run_dir / "eval" / tag / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step": step, "split": split, "domain_column": column, "lm_loss": 3.0, "ppl": 20.0}))
    return path


def test_runs_are_seed_major_with_parents_first(plan):
    assert [r.key for r in plan.runs] == ["pre/seed0", "ft/seed0", "ed/seed0", "base/seed0",
                                          "pre/seed1", "ft/seed1", "ed/seed1", "base/seed1"]
    ft = plan.runs[1]
    assert ft.parent == "pre/seed0" and ft.config.train.init_from == str(plan.runs[0].run_dir)
    assert ft.run_dir == plan.output_dir / "ft" / "seed0"
    assert [r.steps for r in plan.runs[:4]] == [4, 6, 6, 6]  # variant overrides come after base_overrides
    assert [r.config.data.shuffle_labels_seed for r in plan.runs if r.variant == "ed"] == [0, 1]


def test_select_adds_the_variants_a_run_starts_from(plan):
    assert [r.key for r in select(plan, ["ft"])] == ["pre/seed0", "ft/seed0", "pre/seed1", "ft/seed1"]
    with pytest.raises(ConfigError, match="--only names"):
        select(plan, ["nope"])


def test_quick_subset_includes_parents(tmp_path):
    quick = {"variants": ["ft"], "seeds": [5], "overrides": ["train.steps=2"]}
    path = write_sweep(tmp_path, variants=VARIANTS, quick=quick)
    plan = build_plan(load_sweep(path), path, quick=True)
    assert [r.key for r in plan.runs] == ["pre/seed5", "ft/seed5"]
    assert plan.output_dir.name == "out-quick" and all(r.steps == 2 for r in plan.runs)


def test_states_follow_the_run_dir(plan):
    pre = plan.runs[0]
    assert detect(pre, plan.eval).state is State.FRESH
    fake_checkpoint(pre, 2)
    assert detect(pre, plan.eval).state is State.RESUME
    fake_checkpoint(pre, 4)
    assert detect(pre, plan.eval).state is State.NEEDS_EVAL
    fake_report(pre, 4, split="val")  # a report of another split does not count
    fake_report(pre, 2, tag="old")  # nor one of an earlier checkpoint
    assert detect(pre, plan.eval).state is State.NEEDS_EVAL
    report = fake_report(pre, 4)
    status = detect(pre, plan.eval)
    assert status.state is State.FINISHED and status.report == report and status.step == 4
    by_group = replace(plan.eval, domain_column="group")  # a report by another label column does not count
    assert detect(pre, by_group).state is State.NEEDS_EVAL
    fake_report(pre, 4, tag="by-group", column="group")
    assert detect(pre, by_group).state is State.FINISHED


def test_a_run_dir_of_another_config_or_longer_run_is_a_conflict(plan):
    ed = plan.runs[2]
    other = to_dict(ed.config)
    other["objectives"]["divergence"]["coef"] = 0.5
    fake_checkpoint(ed, 3, config=other)
    status = detect(ed, plan.eval)
    assert status.state is State.CONFLICT and "objectives.divergence.coef: run dir 0.5, sweep 0.01" in status.detail
    fake_checkpoint(ed, 9)
    assert "step 9 > train.steps=6" in detect(ed, plan.eval).detail
    resumed = to_dict(ed.config)
    resumed["train"].update(resume=True, steps=3)  # a resumed or extended run is the same run
    fake_checkpoint(ed, 3, config=resumed)
    assert detect(ed, plan.eval).state is State.RESUME
    older = to_dict(ed.config)
    del older["objectives"]["balance"]["scope"]  # written before the setting existed: its default
    fake_checkpoint(ed, 3, config=older)
    assert detect(ed, plan.eval).state is State.RESUME
    older["objectives"]["balance"]["scope"] = "global_batch"
    fake_checkpoint(ed, 3, config=older)
    assert "objectives.balance.scope: run dir 'global_batch', sweep 'micro_batch'" in detect(ed, plan.eval).detail
