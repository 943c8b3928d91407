"""rundir: the layout's names and its lookups (latest checkpoint, run config, eval reports)."""
from __future__ import annotations

import json
import os

import pytest

from ds_moe_div import rundir


def _checkpoint(run_dir, step, *, run_config=True):
    tag = rundir.tag_dir(run_dir, f"global_step{step}")
    tag.mkdir(parents=True)
    if run_config:
        rundir.run_config_path(tag).write_text(json.dumps({"config": {"a": 1}, "architecture": {}, "step": step}))
    (rundir.checkpoint_root(run_dir) / rundir.LATEST).write_text(tag.name)
    return tag


def _report(run_dir, name, *, step=5, split="test", column="domain", own="domain", labels="true", mtime=1_000):
    path = rundir.report_path(rundir.eval_dir(run_dir, name))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"split": split, "domain_column": column, "step": step, "labels": labels,
                                "config": {"data": {"domain_column": own}}}))
    os.utime(path, (mtime, mtime))
    return path


def test_latest_checkpoint_and_its_run_config(tmp_path):
    assert rundir.latest_step(tmp_path) is None and rundir.latest_tag_dir(tmp_path) is None
    _checkpoint(tmp_path, 3)
    tag = _checkpoint(tmp_path, 6)
    assert rundir.latest_tag_dir(tmp_path) == tag and rundir.latest_step(tmp_path) == 6
    assert rundir.run_dir_of(tag) == tmp_path
    assert rundir.read_run_config(tag)["config"] == {"a": 1}
    for path in (tmp_path, rundir.checkpoint_root(tmp_path), tag):
        assert rundir.resolve_checkpoint(path) == (rundir.checkpoint_root(tmp_path), tag.name)


def test_step_falls_back_to_the_tag_and_a_missing_run_config_is_named(tmp_path):
    tag = _checkpoint(tmp_path, 9, run_config=False)
    assert rundir.latest_step(tmp_path) == 9
    with pytest.raises(rundir.CheckpointError, match="run_config.json is missing or corrupt"):
        rundir.read_run_config(tag)
    with pytest.raises(rundir.CheckpointError, match="no checkpoint at"):
        rundir.resolve_checkpoint(tmp_path / "nothing")


def test_config_path_names_resumed_configs(tmp_path):
    assert rundir.config_path(tmp_path) == tmp_path / rundir.CONFIG
    assert rundir.config_path(tmp_path, 40).name == "config.resumed_step40.json"


def test_find_report_filters_split_column_and_step(tmp_path):
    assert rundir.find_report(tmp_path, split="test") is None
    _report(tmp_path, "global_step5-val", split="val")
    _report(tmp_path, "global_step5-by-group", column="group", mtime=3_000)
    old = _report(tmp_path, "global_step2", step=2)
    new = _report(tmp_path, "global_step5")
    (rundir.eval_dir(tmp_path, "broken") / rundir.REPORT).parent.mkdir()
    (rundir.eval_dir(tmp_path, "broken") / rundir.REPORT).write_text("{not json")
    assert rundir.find_report(tmp_path, split="test") == new  # highest step, the run's own column
    assert rundir.find_report(tmp_path, split="test", step=2) == old
    assert rundir.find_report(tmp_path, split="test", step=7) is None
    assert rundir.find_report(tmp_path, split="test", column="group").parent.name == "global_step5-by-group"
    assert rundir.find_report(tmp_path, split="val").parent.name == "global_step5-val"


def test_find_report_prefers_true_label_reports(tmp_path):
    true_report = _report(tmp_path, "global_step5", labels="true (run trained with shuffled labels, seed 0)")
    _report(tmp_path, "global_step5-as-trained", labels="as trained: shuffled (seed 0)", mtime=2_000)  # newer
    assert rundir.find_report(tmp_path, split="test") == true_report


def test_resolve_report_accepts_file_eval_dir_or_run_dir(tmp_path):
    path = _report(tmp_path, "global_step5")
    for given in (path, path.parent, tmp_path):
        assert rundir.resolve_report(given, split="test") == path
    with pytest.raises(FileNotFoundError, match="python -m ds_moe_div eval --run-dir"):
        rundir.resolve_report(tmp_path, split="val")


def test_run_configs_saved_before_the_autoep_default_read_as_native(tmp_path):
    tag = _checkpoint(tmp_path, 3)
    path = rundir.run_config_path(tag)
    for model, want in (({"d_model": 64}, "native"), ({"backend": "autoep"}, "autoep"),
                        ({"pretrained": "models/x"}, None)):
        path.write_text(json.dumps({"step": 3, "config": {"model": model}}))
        assert rundir.read_run_config(tag)["config"]["model"].get("backend") == want
