"""scripts/gpu_study.sh on CPU: the dry run prints the plan and writes nothing; without a GPU it refuses."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: str, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(cmd, check=False, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)


def snapshot() -> set[Path]:
    return {p for p in ROOT.rglob("*") if ".git" not in p.parts and "__pycache__" not in p.parts
            and ".pytest_cache" not in p.parts}


def test_dry_run_prints_the_plan_and_writes_nothing():
    before = snapshot()
    result = run("bash", "scripts/gpu_study.sh", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "6 single-rank runs" in out and "13,107,200 tokens per run" in out
    assert "d_model 384, 6 layers, 16 experts top-2, dropless (AutoEP), seq 512, mixed packing" in out
    assert "l_aux 0.001 (global_batch)" in out and "whole split" in out
    assert "--include localhost:0" in out and "ds_zero2_gpu_bf16_study.json" in out
    assert out.rstrip().endswith("dry run: nothing was run or written")
    assert snapshot() == before


def test_refuses_without_a_gpu_in_one_line():
    result = run(sys.executable, "scripts/gpu_study.py", CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "needs one" in result.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine would start the study")
def test_the_shell_script_refuses_before_installing_anything():
    result = run("bash", "scripts/gpu_study.sh")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no NVIDIA GPU" in result.stderr


def test_power_script_sample_size(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import power
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert power.main(["--sd", "1", "--target", "3.1", "--n", "3"]) == 0
    out = capsys.readouterr().out
    assert "n =   3: MDE 3.097" in out and "n for MDE 3.1: 3" in out  # (4.3027 + 1.0607) / sqrt(3)
    assert power.main(["--sd", "1", "--family", "4", "--n", "10"]) == 0
    assert "alpha 0.05/4 = 0.0125" in capsys.readouterr().out


def test_summary_table_has_the_paired_effect(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_study
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from ds_moe_div.sweep.aggregate import collect, summarise
    from ds_moe_div.sweep.effects import effects
    from tests.test_sweep_effects import make_plan

    plan = make_plan(tmp_path, contrasts=["b"])
    results = collect(list(plan.runs), plan.eval)
    found, _ = effects(results, contrasts=[("b", "a")], endpoints=("lm_loss",))
    text = gpu_study.summary_table(found, summarise(results, variants=plan.variants, reference="a"))
    assert "| a | 3 | 3.1000 ± 0.100 |  |" in text
    assert "| b | 3 | 2.9833 ± 0.076 | -0.1167 [" in text and "MDE" in text


def test_results_are_copied_rebuilt_from_runs_csv_and_summarised(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_study
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from ds_moe_div.sweep.runner import Outcome
    from tests.test_sweep_effects import make_plan

    plan = make_plan(tmp_path, contrasts=["b"])
    outcomes = [Outcome(run, True, True, "trained and evaluated in 60 s", 60.0) for run in plan.runs]
    out = tmp_path / "docs_results_gpu"
    text = gpu_study.write_results(plan, outcomes, 1.5, out)
    assert "| b | 3 | 2.9833 ± 0.076 | -0.1167 [" in text
    for name in ("runs.csv", "comparison.md", "effects.md", "effects.csv", "loss_curves.png", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    assert f"--runs-csv {out / 'runs.csv'}" in (out / "effects.md").read_text()
    summary = (out / "summary.md").read_text()
    assert "9 runs side by side" in summary and "1.5 min wall" in summary and "- a/seed0: ok, 1.0 min" in summary
