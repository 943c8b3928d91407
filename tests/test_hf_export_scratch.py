"""A from-scratch checkpoint (native DeepSpeed-MoE) exported as a Mixtral: transformers reloads it with the
logits of our model and generates text; what Mixtral cannot express is refused."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

from ds_moe_div import cli, rundir
from ds_moe_div.config import ExperimentConfig, load_experiment
from ds_moe_div.config_loader import from_dict
from ds_moe_div.hf.scratch_export import check_exportable, read_native_checkpoint
from ds_moe_div.model import MoELanguageModel
from tests.dist_utils import run_command

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
pytest.importorskip("transformers")


def test_refuses_what_mixtral_cannot_express():
    for override in ("model.moe.first_dense_layers=1", "model.moe.k=1", "model.moe.use_residual=true"):
        with pytest.raises(ValueError, match="no Hugging Face counterpart"):
            check_exportable(load_experiment(None, ["model.backend=native", override]).model)


def test_scratch_checkpoint_exports_reloads_with_our_logits_and_generates(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run_dir = tmp_path / "run"
    overrides = ["model.backend=native", f"train.run_dir={run_dir}", "train.steps=2", "train.save_interval=2", "train.eval_interval=2",
                 "train.heatmap_interval=2", f"data.cache_dir={tmp_path / 'cache'}"]
    cmd = [sys.executable, "-m", "ds_moe_div", "train", "--deepspeed_config", str(ROOT / "ds_configs/ds_zero2_cpu.json"),
           "--config", str(ROOT / "ds_configs/experiments/smoke.json")]
    for o in overrides:
        cmd += ["--override", o]
    trained = run_command(cmd, cwd=tmp_path, env=env, timeout=300)
    assert trained.returncode == 0, trained.stdout[-3000:]
    out = tmp_path / "hf"
    assert cli.main(["export", str(run_dir), str(out), "--max-shard-size", "200KB"]) == 0

    tag_dir = rundir.latest_tag_dir(run_dir)
    saved = rundir.read_run_config(tag_dir)
    cfg = from_dict(ExperimentConfig, saved["config"]).model
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, eval_capacity_factor=100.0))  # no drops
    ours = MoELanguageModel(cfg, vocab_size=saved["architecture"]["vocab_size"], seq_len=32, seed=0).eval()
    ours.load_state_dict(read_native_checkpoint(tag_dir), strict=False)
    assert all(torch.equal(v, read_native_checkpoint(tag_dir)[k]) for k, v in ours.state_dict().items()
               if not k.startswith("rope_"))
    seen = []
    ours.lm_head.register_forward_hook(lambda m, a, o: seen.append(o))
    ids = torch.randint(2, saved["architecture"]["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.model_type == "mixtral"
    with torch.no_grad():
        ours(ids, labels_BS=ids)
        assert (hf(ids).logits - seen[0]).abs().max().item() < 1e-5
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok("def add", return_tensors="pt").input_ids
    generated = hf.generate(prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt.shape[1] and isinstance(tok.decode(generated[0]), str)
