"""End to end: the real `deepspeed` launcher on 2 CPU ranks, resume equality, EP and ZeRO equivalence.

These tests are the slow part of the suite (~2-3 minutes together on 2 cores).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ds_moe_div.distributed import deepspeed_executable
from ds_moe_div.fileio import free_port
from tests.dist_utils import run_command, run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "ds_configs" / "experiments" / "smoke.json"
DS_ZERO2 = ROOT / "ds_configs" / "ds_zero2_cpu.json"
TERMS = ("balance", "z_loss", "divergence", "orthogonality", "variance")

pytestmark = pytest.mark.slow


def launch(tmp_path: Path, *overrides: str, ranks: int = 2, timeout: int = 420) -> subprocess.CompletedProcess:
    """Run scripts/train.py through the deepspeed launcher; kill the whole process group on timeout."""
    port = free_port()
    cmd = [deepspeed_executable(), "--num_gpus", str(ranks), "--master_port", str(port), str(ROOT / "scripts/train.py"),
           "--deepspeed_config", str(DS_ZERO2), "--config", str(SMOKE)]
    for o in overrides:
        cmd += [o] if o.startswith("--") else ["--override", o]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = run_command(cmd, cwd=tmp_path, env=env, timeout=timeout)
    result.port = port
    return result


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def pictures(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    return acc.Tags()


@pytest.fixture(scope="module")
def smoke_run(smoke_reference):
    return smoke_reference  # tests/conftest.py: one launcher run for this module and tests/test_faults.py


def test_launcher_run_leaves_no_shared_memory_buffers(tmp_path):
    """DeepSpeed's CPU all-reduce buffers (67 MB a rank in /dev/shm) are unlinked once mapped."""
    result = launch(tmp_path, "train.run_dir=run", "train.steps=1")
    assert result.returncode == 0, result.stdout[-6000:]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{result.port}_*"))


def test_launcher_run_logs_every_enabled_term_and_checkpoints(smoke_run):
    run_dir, stdout = smoke_run
    tags = scalars(run_dir / "tensorboard")
    for name in TERMS:
        for tag in (f"moe/{name}", f"moe/{name}_unscaled", f"moe/{name}/layer_0", f"moe/{name}/layer_1"):
            assert tag in tags, f"{tag} missing from {sorted(tags)}"
            assert len(tags[tag]) == 6
    for tag in ("train/lm_loss", "train/loss", "train/tokens_per_s", "train/lr", "eval/val_lm_loss",
                "routing/d_inter/layer_0", "routing/dropped_fraction/layer_1"):
        assert tag in tags, tag
    for tag in ("routing/mi/layer_0", "routing/purity/mean", "routing/max_violation/layer_1", "routing/entropy/code/layer_0"):
        assert tag in tags, tag
    for name in ("max_violation_global", "routing_variance", "expert_overlap", "coselection_jaccard",  # paper metrics
                 "expert_output_norm"):  # L_o is on: the selected experts' outputs are collected
        assert len(tags[f"routing/{name}/layer_0"]) == 6 and len(tags[f"routing/{name}/mean"]) == 6, name
    assert all(v > 0 for v in tags["routing/expert_output_norm/mean"].values())
    images = pictures(run_dir / "tensorboard")
    assert {"routing/heatmap/layer_0", "routing/heatmap/all_layers"} <= set(images["images"])
    assert "routing/load/layer_1" in images["histograms"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step6"
    assert (run_dir / "checkpoints" / "global_step3" / "run_config.json").is_file()
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 6
    assert "tensorboard --logdir" in stdout
    # Off a terminal: one progress line per logged step, no tqdm redraws; the summary names the final losses.
    assert "train: step 3/6 (50%)" in stdout and not any("\r" in line for line in stdout.split("\n") if "train:" in line)
    assert "final train LM loss:" in stdout and "final held-out LM loss:" in stdout


def test_resume_continues_exactly_like_an_uninterrupted_run(smoke_run, tmp_path):
    full_dir, _ = smoke_run
    first = launch(tmp_path, "train.run_dir=run", "train.log_interval=1", "train.steps=3")
    assert first.returncode == 0, first.stdout[-6000:]
    second = launch(tmp_path, "train.run_dir=run", "train.log_interval=1", "--resume")
    assert second.returncode == 0, second.stdout[-6000:]
    full, resumed = scalars(full_dir / "tensorboard"), scalars(tmp_path / "run" / "tensorboard")
    for tag in ("train/lm_loss", "moe/divergence_unscaled", "moe/orthogonality_unscaled"):
        for step in (4, 5, 6):
            assert resumed[tag][step] == pytest.approx(full[tag][step], rel=1e-5, abs=1e-6), (tag, step)


def test_failed_start_keeps_what_was_written(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    again = launch(tmp_path, "train.run_dir=run")  # fresh start over existing checkpoints: refused
    assert again.returncode != 0 and "pass --resume" in again.stdout
    model_file = copy / "checkpoints" / "global_step6" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # a truncated checkpoint
    corrupt = launch(tmp_path, "train.run_dir=run", "--resume")
    assert corrupt.returncode != 0 and "cannot load checkpoint" in corrupt.stdout
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before


def _losses_on_ranks(rank, world_size, overrides, ds_overrides, tmp):
    from ds_moe_div.config import load_experiment
    from ds_moe_div.session import build
    from ds_moe_div.train import train_step

    cfg = load_experiment(SMOKE, [f"train.run_dir={tmp}/r", "train.show_progress=false", *overrides])
    ds = json.loads(DS_ZERO2.read_text())
    ds.update(ds_overrides)
    state = build(cfg, ds)
    losses = []
    for _ in range(3):
        train_step(state.engine, state.train_iter, state.composer, state.window, step=state.step)
        state.step += 1
        last = state.window.last
        losses.append([float(last.lm)] + [float(v) for v in last.unscaled.values()])
        state.window.reset()
    return losses


@pytest.mark.parametrize("variant", ["ep_size_2", "zero_stage_0", "zero_stage_1"])
def test_ep2_and_zero0_match_ep1_zero2(variant, tmp_path):
    """Over 3 optimizer steps, every loss term agrees to 1e-4 relative. Measured on the 2-core CPU:
    identical (max difference 0.0); the tolerance leaves room for other reduction orders (GPU, NCCL)."""
    base = run_on_ranks(_losses_on_ranks, args=([], {}, str(tmp_path / "a")), timeout=300)
    overrides, ds = {"ep_size_2": (["model.moe.ep_size=2"], {}),
                     "zero_stage_0": ([], {"zero_optimization": {"stage": 0}}),
                     "zero_stage_1": (["model.moe.ep_size=2"], {"zero_optimization": {"stage": 1}})}[variant]
    other = run_on_ranks(_losses_on_ranks, args=(overrides, ds, str(tmp_path / "b")), timeout=300)
    for rank_a, rank_b in zip(base, other):
        for step_a, step_b in zip(rank_a, rank_b):
            assert step_b == pytest.approx(step_a, rel=1e-4, abs=1e-6)


def _init_from(rank, world_size, source, tmp, overrides):
    import torch

    from ds_moe_div.checkpoint import CheckpointError
    from ds_moe_div.config import load_experiment
    from ds_moe_div.session import build

    cfg = load_experiment(SMOKE, [f"train.run_dir={tmp}", f"train.init_from={source}", "train.show_progress=false",
                                  *overrides])
    try:
        state = build(cfg, json.loads(DS_ZERO2.read_text()))
    except CheckpointError as e:
        return str(e)
    saved = torch.load(Path(source) / "checkpoints" / "global_step6" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    module = state.engine.module.state_dict()
    same = all(torch.equal(module[k], v) for k, v in saved.items() if k in module)
    return {"step": state.step, "same_weights": same, "checked": sum(k in module for k in saved)}


def test_init_from_starts_a_new_run_from_another_runs_weights(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    result = run_on_ranks(_init_from, world_size=1, timeout=300,
                          args=(str(run_dir), str(tmp_path / "ft"), ["objectives.divergence.coef=0"]))[0]
    assert result["step"] == 0 and result["same_weights"] and result["checked"] > 0
    mismatch = run_on_ranks(_init_from, world_size=1, timeout=300,
                            args=(str(run_dir), str(tmp_path / "bad"), ["model.d_model=32"]))[0]
    assert "does not match the model" in mismatch and "d_model: checkpoint 64 vs config 32" in mismatch
    # Another split seed trains another tokenizer (same vocabulary size): refused, naming the fix; the
    # checkpoint's own tokenizer.json, as the message says, loads.
    retokenized = run_on_ranks(_init_from, world_size=1, timeout=300,
                               args=(str(run_dir), str(tmp_path / "tok"), ["data.split_seed=7"]))[0]
    tokenizer = run_dir / "checkpoints" / "global_step6" / "tokenizer.json"
    assert "trained with another tokenizer" in retokenized and f"data.tokenizer.path={tokenizer}" in retokenized
    reused = run_on_ranks(_init_from, world_size=1, timeout=300,
                          args=(str(run_dir), str(tmp_path / "tok2"), ["data.split_seed=7",
                                                                       f"data.tokenizer.path={tokenizer}"]))[0]
    assert reused["same_weights"]


def test_global_batch_balance_is_one_value_on_every_rank_and_independent_of_ep(tmp_path):
    """balance.scope=global_batch: L_aux (term 1 of the logged list) is the global batch's value, the same
    on both ranks, where the micro-batch scope gives each rank its own; EP=2 trains exactly like EP=1."""
    scope = 'objectives.balance.scope="global_batch"'
    ep1 = run_on_ranks(_losses_on_ranks, args=([scope], {}, str(tmp_path / "a")), timeout=300)
    ep2 = run_on_ranks(_losses_on_ranks, args=([scope, "model.moe.ep_size=2"], {}, str(tmp_path / "b")), timeout=300)
    for step in range(3):
        assert ep1[0][step][1] == ep1[1][step][1] and ep2[0][step][1] == ep2[1][step][1]
    for rank_a, rank_b in zip(ep1, ep2):
        for step_a, step_b in zip(rank_a, rank_b):
            assert step_b == pytest.approx(step_a, rel=1e-4, abs=1e-6)
    micro = run_on_ranks(_losses_on_ranks, args=([], {}, str(tmp_path / "c")), timeout=300)
    assert micro[0][0][1] != micro[1][0][1]
