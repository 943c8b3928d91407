"""`model.pretrained` through the normal trainer: checks at config time, then one 2-rank EP=2 ZeRO-2 run with
every objective on (the shipped ds_config), checkpoints, resume from step 1 equal to the uninterrupted step 2,
`ds-moe-div eval` (held-out PPL, router-permutation
delta-PPL, routing statistics), `ds-moe-div export` and a reload in transformers.
"""
from __future__ import annotations

import configparser
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from ds_moe_div import cli
from ds_moe_div.config import load_experiment
from ds_moe_div.hf.families import FAMILIES
from ds_moe_div.hf.load import load_pretrained, read_config
from ds_moe_div.hf.session import check_model_config, with_autoep, with_pretrained_tokenizer
from tests import hf_fixtures
from tests.dist_utils import run_command, run_on_ranks

tiny_dirs = hf_fixtures.tiny_dirs  # session fixture
pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
DS_ZERO2 = ROOT / "ds_configs" / "ds_zero2_cpu.json"
TERMS = ("balance", "z_loss", "divergence", "orthogonality", "variance")


def test_transformers_pin_is_the_installed_one():
    """transformers 5.23.0 breaks DeepSpeed 0.19.8's mixtral/qwen3_moe presets inside initialize; the
    distributed parity test runs those presets through deepspeed.initialize with the pinned version."""
    import transformers
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    pins = [r.strip() for r in cfg["options.extras_require"]["hf"].replace("\n", ";").split(";") if r.strip()]
    assert "transformers==5.22.2" in pins and {"safetensors", "peft"} <= {p.split(">")[0] for p in pins}
    assert transformers.__version__ == "5.22.2"


def test_contradicting_from_scratch_keys_refused(tiny_dirs):
    hf_config, family = read_config(tiny_dirs["olmoe"])
    ok = load_experiment(None, [f"model.pretrained={tiny_dirs['olmoe']}", "model.moe.num_experts=8", "model.d_model=32"])
    check_model_config(ok.model, hf_config, family)  # set, but agreeing with the checkpoint
    bad = load_experiment(None, [f"model.pretrained={tiny_dirs['olmoe']}", "model.d_model=64", "model.moe.k=4",
                                 "model.moe.capacity_factor=2.0"])
    with pytest.raises(ValueError, match=r"model.d_model=64 but the checkpoint has 32.*model.moe.k=4 but the "
                                         r"checkpoint has 2.*capacity_factor.*dropless"):
        check_model_config(bad.model, hf_config, family)


def test_checkpoint_tokenizer_and_autoep_block(tiny_dirs):
    cfg = with_pretrained_tokenizer(load_experiment(None, [f"model.pretrained={tiny_dirs['olmoe']}"]))
    assert cfg.data.tokenizer.path == str(tiny_dirs["olmoe"] / "tokenizer.json")

    class Stub:
        def autoep_block(self, *, ep_size):
            return FAMILIES["mixtral"].autoep_block(ep_size=ep_size)
    assert with_autoep({}, Stub(), ep_size=2)["expert_parallel"]["autoep_size"] == 2
    with pytest.raises(ValueError, match="expert_parallel block"):
        with_autoep({"expert_parallel": {"enabled": True, "autoep_size": 1}}, Stub(), ep_size=2)


def _scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _train_on_ranks(rank, world_size, pretrained, run_dir):
    import shutil

    import torch.distributed as dist

    from ds_moe_div.session import build
    from ds_moe_div.train import run

    def config(directory, *extra):
        coefs = [f"objectives.{t}.coef=0.01" for t in TERMS]
        return load_experiment(None, [f"model.pretrained={pretrained}", "model.moe.ep_size=2", "data.seq_len=32",
                                      f"data.cache_dir={run_dir}/cache", f"train.run_dir={directory}", "train.steps=2",
                                      "train.log_interval=1", "train.eval_interval=2", "train.eval_batches=1",
                                      "train.save_interval=1", "train.heatmap_interval=2", "train.show_progress=false",
                                      *coefs, *extra])

    ds = json.loads(DS_ZERO2.read_text())
    ds["scheduler"]["params"].update(warmup_num_steps=1, warmup_min_ratio=1.0)  # steps that move the weights
    state = build(config(run_dir), ds)
    model = state.engine.module
    run(state)
    ids = torch.arange(2, 34).view(2, 16)
    with torch.no_grad():
        logits = model.logits(ids)
    result = {"logits": logits, "local": model.moe_layers()[0].num_local_experts,
              "counts_after_step": float(model.moe_layers()[0].tokens_per_expert.sum())}
    # Resume from the step-1 checkpoint in a copy of the run: step 2 must repeat exactly.
    resumed_dir = f"{run_dir}_resumed"
    if rank == 0:
        shutil.copytree(f"{run_dir}/checkpoints/global_step1", f"{resumed_dir}/checkpoints/global_step1")
        Path(f"{resumed_dir}/checkpoints/latest").write_text("global_step1")
    dist.barrier()
    state = build(config(resumed_dir, "train.resume=true"), ds)
    assert state.step == 1
    run(state)
    return result


@pytest.mark.slow
def test_pretrained_run_with_every_objective_exports_to_transformers(tiny_dirs, tmp_path):
    run_dir = tmp_path / "run"
    ranks = run_on_ranks(_train_on_ranks, world_size=2, timeout=600, args=(str(tiny_dirs["olmoe"]), str(run_dir)))
    assert all(r["local"] == 4 for r in ranks)  # 8 experts over EP=2
    assert all(r["counts_after_step"] == 0 for r in ranks)  # AutoEP's counter restarts every step
    first, resumed = _scalars(run_dir / "tensorboard"), _scalars(Path(f"{run_dir}_resumed") / "tensorboard")
    for tag in ["train/lm_loss", *(f"moe/{t}_unscaled" for t in TERMS)]:
        assert resumed[tag][2] == pytest.approx(first[tag][2], rel=1e-6, abs=1e-9), tag
    assert "routing/mutual_information" in first or any(t.startswith("routing/") for t in first)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["pretrained"] == str(tiny_dirs["olmoe"])
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    evaluated = run_command([sys.executable, "-m", "ds_moe_div", "eval", "--run-dir", str(run_dir), "--max-batches",
                             "1", "--permutation-seeds", "1", "--no-progress"], cwd=tmp_path, env=env, timeout=300)
    assert evaluated.returncode == 0, evaluated.stdout
    report = json.loads(next((run_dir / "eval").rglob("report.json")).read_text())
    assert set(report["delta_ppl"]) >= {"layer_0", "layer_1"} and report["lm_loss"] > 0
    assert len(report["routing_matrices"]["layer_0"]) > 0
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["export", str(run_dir), str(out)]) == 2  # non-empty: refused, nothing touched
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert cli.main(["export", str(run_dir), str(out), "--overwrite", "--max-shard-size", "40KB"]) == 0
    reloaded = load_pretrained(out)
    reloaded.set_experts_implementation("eager")
    with torch.no_grad():
        logits = reloaded(torch.arange(2, 34).view(2, 16)).logits
    assert (logits - ranks[0]["logits"]).abs().max().item() <= 1e-5
    with torch.no_grad():
        before = load_pretrained(tiny_dirs["olmoe"])(torch.arange(2, 34).view(2, 16)).logits
    assert (logits - before).abs().max().item() > 1e-3  # the run trained the exported weights
