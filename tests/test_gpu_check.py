"""scripts/gpu_check.{sh,py} on a machine without CUDA: the dry run prints the plan, a real run refuses in
one line, and the summary/MFU logic works on recorded stage results. The GPU run itself writes
docs/results/gpu_check/ on a GPU machine."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(cmd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_dry_run_prints_every_stage_with_the_bf16_config():
    for cmd in ([sys.executable, str(SCRIPT), "--dry-run"], ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"]):
        result = _run(cmd)
        assert result.returncode == 0, result.stderr
        for stage in ("e2e ", "e2e-resume", "parity", "throughput"):
            assert f"  {stage}" in result.stdout, stage
        assert "ds_zero2_gpu_bf16.json" in result.stdout and "--resume" in result.stdout
        assert "H200 989" in result.stdout and "results.json" in result.stdout


def test_without_a_gpu_it_refuses_in_one_line():
    result = _run([sys.executable, str(SCRIPT)])
    assert result.returncode == 3 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("gpu_check: no CUDA GPU")
    if shutil.which("nvidia-smi") is None:
        had_venv = (ROOT / ".venv-gpu").exists()
        shell = _run(["bash", str(ROOT / "scripts" / "gpu_check.sh")])
        assert shell.returncode == 3 and shell.stderr.count("\n") == 1 and "no CUDA GPU" in shell.stderr
        assert shell.stdout == "" and (ROOT / ".venv-gpu").exists() == had_venv  # refused before installing


def test_bf16_peak_table_by_device_name():
    gpu_check = _module()
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("Tesla T4") is None


@pytest.mark.parametrize("bf16_error", [4.6e-3, 0.3])
def test_summary_tables_throughput_and_fails_on_a_parity_error(tmp_path, bf16_error):
    gpu_check = _module()
    root = tmp_path / "e2e_run" / "checkpoints" / "global_step30"
    root.mkdir(parents=True)
    (root / "complete").write_text("{}")
    (root.parent / "latest").write_text("global_step30")
    tol = gpu_check.PARITY_TOLERANCE
    parity = {"world_size": 1, "lost_use_error_min": 0.21,
              "fp32": {"max_relative_error": 2e-7, "ok": True, "tolerance": tol["fp32"]},
              "bf16": {"max_relative_error": bf16_error, "ok": bf16_error < tol["bf16"], "tolerance": tol["bf16"]}}
    (tmp_path / "parity.json").write_text(json.dumps(parity))
    config = {"params_m": 10.0, "batch": 16, "seq": 256, "step_ms": 20.0, "tokens_per_s": 204800.0,
              "model_tflops": 98.9, "mfu": 0.1, "peak_memory_gib": 1.5}
    (tmp_path / "throughput.json").write_text(json.dumps({"device": "NVIDIA H200", "peak_bf16_tflops": 989.0,
                                                          "configs": {"default": config}}))
    stages = {name: {"rc": 0, "seconds": 1.0} for name in ("e2e", "e2e-resume", "parity", "throughput")}
    result, lines, ok = gpu_check.summarize(stages, tmp_path)
    text = "\n".join(lines)
    assert "| default | 10.0 | 16 x 256 | 20.0 | 204,800 | 98.9 | 10.0% | 1.50 |" in text
    assert ok == (bf16_error < tol["bf16"]) and text.endswith("PASS" if ok else "FAIL")
    assert result["stages"]["e2e"]["latest_complete"] == "global_step30"


def _stages_on_cpu(rank, world_size, tmp):
    gpu_check = _module()
    tiny = {"tiny": {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}, "batch": 2, "seq": 16,
                     "vocab": 512}}
    gpu_check.throughput_worker(Path(tmp) / "throughput.json", configs=tiny,
                                ds_path=ROOT / "ds_configs" / "ds_zero2_cpu.json", steps=1, warmup=1)
    gpu_check.parity_worker(Path(tmp) / "parity.json")
    return {name: json.loads((Path(tmp) / f"{name}.json").read_text()) for name in ("throughput", "parity")}


@pytest.mark.slow
def test_throughput_and_parity_stages_run_on_cpu(tmp_path):
    """The GPU stages' code (model, engine, every objective, timing, FLOPs; ZeRO-2 fp32/bf16 parity) on one
    CPU rank."""
    from tests.dist_utils import run_on_ranks

    result = run_on_ranks(_stages_on_cpu, world_size=1, args=(str(tmp_path),), timeout=300)[0]
    throughput, parity = result["throughput"], result["parity"]
    row = throughput["configs"]["tiny"]
    assert throughput["device"] == "cpu" and throughput["peak_bf16_tflops"] is None
    assert row["tokens_per_s"] > 0 and row["model_tflops"] > 0 and row["mfu"] is None and row["params_m"] > 0
    assert parity["world_size"] == 1 and parity["fp32"]["ok"] and parity["bf16"]["ok"]
    assert parity["lost_use_error_min"] > 4 * parity["bf16"]["tolerance"]
