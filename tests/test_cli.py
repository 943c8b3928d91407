"""The command line: one program name in every --help, --version, and the off-terminal progress lines."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_moe_div import __version__, progress
from ds_moe_div.cli import COMMANDS, PROG, main

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ds_moe_div {__version__}"


def _help(cmd: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    result = subprocess.run([sys.executable, *cmd, "--help"], capture_output=True, text=True, cwd=ROOT, env=env, check=False,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_every_subcommand_and_launch_script_shows_one_program_name():
    cases = {("-m", "ds_moe_div", name): name for name in COMMANDS}
    cases.update({("scripts/train.py",): "train", ("scripts/evaluate.py",): "eval",
                  ("scripts/prepare_corpus.py",): "prepare-corpus", ("-m", "ds_moe_div.sweep"): "sweep",
                  ("-m", "ds_moe_div.corpus"): "prepare-corpus"})
    for cmd, name in cases.items():
        text = _help(list(cmd))
        assert text.startswith(f"usage: {PROG} {name}"), (cmd, text[:200])
        assert "ds-moe-div" not in text and "ds_moe_div.sweep" not in text, cmd
    top = _help(["-m", "ds_moe_div"])
    assert "ds-moe-div" not in top and f"{PROG} --version" in top


def test_off_a_terminal_progress_is_one_line_every_log_every_updates():
    stream = io.StringIO()
    with progress.bar(total=10, initial=2, desc="train", unit="step", enabled=True, log_every=4, stream=stream) as bar:
        assert isinstance(bar, progress.LineProgress)
        for step in range(3, 11):
            bar.set_postfix(lm=f"{step / 10:.3f}")
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["train: step 4/10", "train: step 8/10", "train: step 10/10"]
    assert "lm=0.400" in lines[0] and "eta" in lines[0] and "eta" not in lines[-1]
    assert "\r" not in stream.getvalue()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_progress_is_a_tqdm_bar_and_disabled_means_silent():
    from tqdm import tqdm

    with progress.bar(total=3, desc="train", unit="step", enabled=True, log_every=1, stream=_Terminal()) as bar:
        assert isinstance(bar, tqdm) and not bar.disable
    stream = io.StringIO()
    with progress.bar(total=3, desc="train", unit="step", enabled=False, log_every=1, stream=stream) as bar:
        bar.update(3)
    assert stream.getvalue() == ""


def test_training_summary_names_the_final_losses_and_the_run_paths(tmp_path):
    text = progress.training_summary(tmp_path / "run", steps=6, seconds=75.2,
                                     last={"train/lm_loss": 3.21, "eval/val_lm_loss": 3.5})
    assert "6 steps in 1m15s" in text
    assert "final train LM loss:     3.2100" in text and "final held-out LM loss:  3.5000 (val split)" in text
    from ds_moe_div import rundir
    run = (tmp_path / "run").resolve()
    assert f"tensorboard --logdir {rundir.tensorboard_dir(run)}" in text and str(rundir.checkpoint_root(run)) in text


@pytest.mark.parametrize("bad", [0, -1])
def test_line_progress_refuses_a_nonpositive_interval(bad):
    with pytest.raises(ValueError, match="log_every"):
        progress.LineProgress(total=3, desc="x", unit="step", log_every=bad)


def test_readme_example_overrides_change_the_tiny_config():
    """The README's training example must show an override that changes something vs tiny.json."""
    import re

    from ds_moe_div.config import load_experiment
    from ds_moe_div.config_loader import flatten, to_dict

    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Running your own experiments"):]
    block = block[:block.index("```", block.index("```bash") + 7)]
    overrides = re.findall(r"--override (\S+)", block)
    config = re.search(r"--config (\S+)", block).group(1)
    assert overrides and config.endswith("tiny.json")
    base = flatten(to_dict(load_experiment(ROOT / config)))
    for item in overrides:
        changed = flatten(to_dict(load_experiment(ROOT / config, [item])))
        assert changed != base, f"README override {item} is tiny.json's own value"


def test_wrapped_iteration_logs_about_every_tenth_off_a_terminal():
    stream = io.StringIO()
    items = list(progress.wrap(range(20), total=20, desc="tokenize", unit="doc", enabled=True, stream=stream))
    assert items == list(range(20))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("tokenize: doc 20/20 (100%)")
