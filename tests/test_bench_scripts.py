"""The benchmark scripts still run: each at the tiniest sizes (1 round, 1 step), as a subprocess.

Functional only: they exit 0 and print their table headers; no timing is asserted (~5-10 s each).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.dist_utils import run_command

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--d-model", "32", "--layers", "1", "--experts", "4", "--k", "2", "--batch", "2", "--seq", "16",
        "--vocab", "512", "--steps", "1", "--repeats", "1"]

pytestmark = pytest.mark.slow


def assert_prints(out: str, *headers: str) -> None:
    """Every header (a table column, a row name, a summary line) is in the script's output."""
    missing = [h for h in headers if h not in out]
    assert not missing, f"missing from the output: {missing}\n{out[-3000:]}"


def run_script(name: str, *args: str, timeout: int = 90):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = run_command([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-6000:]
    return result.stdout


def test_bench_scaling_compares_with_plain_deepspeed_moe():
    out = run_script("bench_scaling.py", "--skip-scaling", *TINY)
    assert "== ds_moe_div baseline vs plain DeepSpeed-MoE ==" in out
    assert_prints(out, "step ms", "ratio", "tokens/s", "plain DeepSpeed-MoE (l_aux)", "ds_moe_div baseline (l_aux)")


def test_bench_step_prints_every_variant():
    out = run_script("bench_step.py", *TINY)
    assert_prints(out, "variant", "step ms", "ratio", "MFU", "baseline (l_aux)", "all objectives",
                  "aux + routing + paper + overlap", "paper metrics: step time ratio")


def test_bench_hf_prints_the_ratio_to_plain_transformers():
    pytest.importorskip("transformers")
    out = run_script("bench_hf.py", "--family", "qwen3_moe", "--batch", "2", "--seq", "16", "--steps", "1",
                     "--repeats", "1", timeout=180)
    assert_prints(out, "step ms", "tokens/s", "ds_moe_div (AutoEP, l_aux)", "plain transformers (grouped_mm)",
                  "ratio (ds_moe_div / plain tokens/s)", "ds_moe_div LoRA r=8", "ratio (LoRA / full fine-tuning",
                  "trainable parameters: full")


def test_bench_paths_prints_both_backends_and_the_ratio():
    pytest.importorskip("transformers")
    out = run_script("bench_paths.py", "--config", str(ROOT / "ds_configs" / "experiments" / "smoke.json"),
                     "--steps", "1", "--repeats", "1", timeout=180)
    assert_prints(out, "ms/step", "native", "autoep", "ratio (autoep / native step time)", "load average")


def test_bench_hf_memory_prints_peak_per_rank_against_its_share():
    pytest.importorskip("transformers")
    out = run_script("bench_hf.py", "--family", "olmoe", "--no-throughput", "--memory", "--batch", "2", "--seq", "16",
                     "--steps", "1", timeout=300)
    assert_prints(out, "== peak host memory while loading", "share MiB", "peak/share", "shard by shard",
                  "whole model (transformers, then AutoEP slices)", "== peak host memory of training",
                  "ratio (LoRA / full)")
