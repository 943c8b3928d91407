"""Data and tokenizer paths: absolute in what a run writes; found again (or named, with the fix) when a run
is read back from another directory, moved, or its data moved."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ds_moe_div import rundir
from ds_moe_div.config import load_experiment
from ds_moe_div.config_loader import ConfigError, to_dict
from ds_moe_div.config_paths import absolute, absolute_dict, launch_dir, locate


def test_training_config_gets_absolute_paths_and_names_stay_names(tmp_path):
    (tmp_path / "corpus.jsonl.gz").write_bytes(b"")
    cfg = load_experiment(None, ["data.corpus=corpus.jsonl.gz", "data.tokenizer.path=tok/tokenizer.json",
                                 "data.label_map=maps/m.json", "data.cache_dir=~/c"])
    out = absolute(cfg, tmp_path)
    assert out.data.corpus == str(tmp_path / "corpus.jsonl.gz")
    assert out.data.tokenizer.path == str(tmp_path / "tok" / "tokenizer.json")
    assert out.data.label_map == str(tmp_path / "maps" / "m.json")
    assert out.data.cache_dir == str(Path("~/c").expanduser())
    assert out.model == cfg.model and out.train == cfg.train
    builtin = absolute(load_experiment(None, ['data.corpus="builtin"', "data.corpus_dir=data/../data/builtin"]),
                       tmp_path)
    assert builtin.data.corpus == "builtin" and builtin.data.corpus_dir == str(tmp_path / "data" / "builtin")
    for name in ("fixture", "wikitext", "allenai/c4"):  # a datasets name that is no local path stays a name
        assert absolute(load_experiment(None, [f'data.corpus="{name}"']), tmp_path).data.corpus == name


def _run(tmp_path: Path, data: dict, run_dir: str = "runs/x") -> tuple[dict, Path]:
    saved = to_dict(load_experiment(None, [f"train.run_dir={run_dir}"]))
    saved["data"] = {**saved["data"], **data}
    return saved, tmp_path / "proj" / run_dir


def test_an_old_run_with_relative_paths_is_read_back_from_its_launch_directory(tmp_path):
    saved, run = _run(tmp_path, {"corpus": "builtin", "corpus_dir": "data/builtin"})
    (tmp_path / "proj" / "data" / "builtin").mkdir(parents=True)
    run.mkdir(parents=True)
    assert launch_dir(run, "runs/x") == tmp_path / "proj" and launch_dir(run, "other/x") is None
    tree, base = locate(saved, run_dir=run, cwd=tmp_path / "elsewhere")
    assert tree == saved and base == tmp_path / "proj"  # unchanged: the data cache key stays the training's


def test_a_moved_run_resolves_relative_paths_against_the_run_directory(tmp_path):
    saved, _ = _run(tmp_path, {"corpus": "builtin", "corpus_dir": "data/builtin"})
    moved = tmp_path / "archive" / "x"
    (moved / "data" / "builtin").mkdir(parents=True)
    tree, _ = locate(saved, run_dir=moved, cwd=tmp_path)
    assert tree["data"]["corpus_dir"] == str(moved / "data" / "builtin")


def test_missing_data_fails_naming_the_path_and_the_override(tmp_path):
    saved, run = _run(tmp_path, {"corpus": "builtin", "corpus_dir": str(tmp_path / "gone"),
                                 "cache_dir": str(tmp_path / "no_cache")})
    saved["data"]["tokenizer"]["path"] = "tok.json"
    run.mkdir(parents=True)
    with pytest.raises(ConfigError) as e:
        locate(saved, run_dir=run, cwd=tmp_path)
    message = str(e.value)
    assert f"data.corpus_dir='{tmp_path / 'gone'}'" in message and "data.tokenizer.path='tok.json'" in message
    assert "--override data.corpus_dir=<where it is now>" in message and "cache_dir" not in message
    (tmp_path / "new").mkdir()
    (tmp_path / "tok.json").write_text("{}")
    tree, _ = locate(saved, run_dir=run, cwd=tmp_path, overrides={"data.corpus_dir": "new"})
    assert tree["data"]["corpus_dir"] == str(tmp_path / "new")
    assert tree["data"]["tokenizer"]["path"] == str(tmp_path / "tok.json")
    with pytest.raises(ConfigError, match="only the run's paths"):
        locate(saved, run_dir=run, cwd=tmp_path, overrides={"model.d_model": "8"})


def test_eval_from_another_directory_reports_the_missing_path_and_the_fix(tmp_path, capsys, monkeypatch):
    """The CLI fails before loading anything, with the path and the override to use."""
    from ds_moe_div.evaluation.runner import main

    saved, run = _run(tmp_path, {"corpus": "builtin", "corpus_dir": str(tmp_path / "moved_away")})
    tag = rundir.tag_dir(run, "global_step5")
    tag.mkdir(parents=True)
    (rundir.checkpoint_root(run) / rundir.LATEST).write_text("global_step5")
    rundir.run_config_path(tag).write_text(json.dumps({"config": saved, "architecture": {}, "step": 5}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["--run-dir", os.path.relpath(run, elsewhere), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "moved_away") in err and "--override data.corpus_dir=" in err


def test_a_sweep_plan_with_relative_paths_matches_its_runs_absolute_ones(tmp_path, monkeypatch):
    from ds_moe_div.sweep.plan import config_differences

    monkeypatch.chdir(tmp_path)
    plan_cfg = load_experiment(None, ['data.corpus="builtin"', "data.corpus_dir=data/builtin"])

    class Run:
        config = plan_cfg

    assert config_differences(Run, absolute_dict(to_dict(plan_cfg))) == []
    assert config_differences(Run, to_dict(plan_cfg)) == []  # an older run that stored them relative
    other = absolute_dict(to_dict(load_experiment(None, ['data.corpus="builtin"', "data.corpus_dir=/elsewhere"])))
    assert config_differences(Run, other) and "corpus_dir" in config_differences(Run, other)[0]


def _train_from(rank, world_size, project, cache):
    """Train 2 steps from `project` with a corpus path relative to it; return config.json's data section."""
    from ds_moe_div.session import build
    from ds_moe_div.train import run

    root = Path(__file__).resolve().parents[1]
    os.chdir(project)
    cfg = load_experiment(root / "ds_configs/experiments/smoke.json",
                          ["train.run_dir=runs/r", "train.steps=2", "train.save_interval=2", "train.eval_interval=2",
                           "data.corpus=data/corpus.jsonl.gz", f"data.cache_dir={cache}", "train.routing_stats=false"])
    run(build(cfg, json.loads((root / "ds_configs/ds_zero2_cpu.json").read_text())))
    return json.loads(rundir.config_path("runs/r").read_text())["data"]


def _eval_from(rank, world_size, cwd, argv):
    from ds_moe_div.evaluation.runner import main

    os.chdir(cwd)
    return main(argv)


@pytest.mark.slow
def test_eval_from_another_directory_and_of_moved_data(tmp_path, capfd):
    import shutil

    from ds_moe_div.data.readers import FIXTURE
    from tests.dist_utils import run_on_ranks

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "data").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(FIXTURE, project / "data" / "corpus.jsonl.gz")
    data = run_on_ranks(_train_from, world_size=1, args=(str(project), str(tmp_path / "cache")), timeout=300)[0]
    assert data["corpus"] == str(project / "data" / "corpus.jsonl.gz")  # stored absolute
    assert data["cache_dir"] == str(tmp_path / "cache")
    argv = ["--run-dir", str(project / "runs" / "r"), "--max-batches", "2", "--permutation-seeds", "0",
            "--no-progress"]
    assert run_on_ranks(_eval_from, world_size=1, args=(str(elsewhere), argv), timeout=300)[0] == 0
    assert rundir.report_path(rundir.eval_dir(project / "runs" / "r", "global_step2")).is_file()
    shutil.move(project / "data", tmp_path / "moved")  # the data moved: named, with the fix
    assert run_on_ranks(_eval_from, world_size=1, args=(str(elsewhere), argv), timeout=300)[0] == 2
    err = capfd.readouterr().err
    assert "data.corpus=" in err and "--override data.corpus=<where it is now>" in err
    fixed = [*argv, "--override", f"data.corpus={tmp_path / 'moved' / 'corpus.jsonl.gz'}", "--out", str(tmp_path / "o")]
    assert run_on_ranks(_eval_from, world_size=1, args=(str(elsewhere), fixed), timeout=300)[0] == 0
    assert rundir.report_path(tmp_path / "o").is_file()
