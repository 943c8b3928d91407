"""The DeepSpeed JSON is cross-checked once against the experiment config, with errors naming the fix."""
import json
from pathlib import Path

import pytest

from ds_moe_div.config import ExperimentConfig, load_experiment
from ds_moe_div.config_loader import ConfigError
from ds_moe_div.ds_config import (
    DeepSpeedConfigError,
    check_ds_config,
    engine_config,
    load_ds_config,
)

ROOT = Path(__file__).resolve().parents[1]
BASE = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 2}}


def check(ds=None, world_size=2, **overrides):
    cfg = load_experiment(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    return check_ds_config(dict(BASE, **(ds or {})), cfg, world_size=world_size, on_cpu=True)


def test_every_shipped_file_loads_and_validates():
    ds_files = sorted((ROOT / "ds_configs").glob("*.json"))
    experiments = sorted((ROOT / "ds_configs" / "experiments").glob("*.json"))
    assert ds_files and experiments
    for path in experiments:
        cfg = load_experiment(path)
        for ds_path in ds_files:
            ds = load_ds_config(ds_path)
            if ds.get("bf16", {}).get("enabled"):
                continue  # GPU file: checked against on_cpu=False below
            micro, gas = check_ds_config(ds, cfg, world_size=2, on_cpu=True)
            assert micro >= 1 and gas >= 1
    for ds_path in ds_files:
        check_ds_config(load_ds_config(ds_path), ExperimentConfig(), world_size=8, on_cpu=False)


def test_zero3_is_refused_with_the_fix():
    with pytest.raises(DeepSpeedConfigError, match="stage=3 is not supported.*use stage 2"):
        check({"zero_optimization": {"stage": 3}})


@pytest.mark.parametrize("key", ["contiguous_gradients", "reduce_scatter"])
def test_zero2_needs_contiguous_gradients_and_reduce_scatter(key):
    with pytest.raises(DeepSpeedConfigError, match=f"zero_optimization.{key}=false"):
        check({"zero_optimization": {"stage": 2, key: False}})


def test_num_experts_must_divide_by_ep_size():
    with pytest.raises(ConfigError, match="num_experts=6 is not divisible by ep_size=4"):
        load_experiment(None, ["model.moe.num_experts=6", "model.moe.ep_size=4"])


def test_ep_size_must_divide_world_size():
    with pytest.raises(DeepSpeedConfigError, match="ep_size=4 does not divide the world size 2"):
        check(**{"model.moe.ep_size": 4})


def test_batch_sizes_must_agree():
    with pytest.raises(DeepSpeedConfigError, match="batch sizes disagree.*train.micro_batch_size=8"):
        check(**{"train.micro_batch_size": 8})
    with pytest.raises(DeepSpeedConfigError, match="train_batch_size=10"):
        check({"train_batch_size": 10})
    assert check({"train_batch_size": 16, "gradient_accumulation_steps": 2}) == (4, 2)
    assert check({"train_micro_batch_size_per_gpu": None, "train_batch_size": 32}) == (16, 1)


def test_missing_optimizer_and_fp16_on_cpu():
    with pytest.raises(DeepSpeedConfigError, match="no 'optimizer' section"):
        check_ds_config({"train_micro_batch_size_per_gpu": 1}, ExperimentConfig(), world_size=1, on_cpu=True)
    with pytest.raises(DeepSpeedConfigError, match="fp16.enabled is true but this run is on CPU"):
        check({"fp16": {"enabled": True}})


def test_unreadable_files(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match="pass --deepspeed_config"):
        load_ds_config(None)
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,,}')
    with pytest.raises(DeepSpeedConfigError, match="line 1"):
        load_ds_config(bad)


def test_engine_config_fills_agreed_batch_sizes():
    resolved = engine_config(BASE, 4, 2, 2)
    assert resolved["train_batch_size"] == 16 and "train_batch_size" not in BASE


def test_unknown_experiment_key_names_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'objectives.divergence'"):
        load_experiment(None, ["objectives.divergense.coef=0.1"])


COSINE = {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 3, "cos_min_ratio": 0.1}}


def test_scheduler_length_follows_train_steps():
    cfg = load_experiment(None, ["train.steps=40"])
    micro, gas = check_ds_config(dict(BASE, scheduler=COSINE), cfg, world_size=2, on_cpu=True)
    resolved = engine_config(dict(BASE, scheduler=COSINE), micro, gas, 2, steps=cfg.train.steps)
    assert resolved["scheduler"]["params"] == {"warmup_num_steps": 3, "cos_min_ratio": 0.1, "total_num_steps": 40}
    assert "total_num_steps" not in COSINE["params"]  # the user's dict is not modified
    warmup_only = {"type": "WarmupLR", "params": {"warmup_num_steps": 3}}
    assert engine_config(dict(BASE, scheduler=warmup_only), micro, gas, 2, steps=40)["scheduler"] == warmup_only


@pytest.mark.parametrize("total, steps, words", [(300, 1000, "stop decaying at step 300"),
                                                 (1000, 300, "never finish decaying at step 300")])
def test_scheduler_length_that_disagrees_with_train_steps_is_refused(total, steps, words):
    scheduler = {"type": "WarmupDecayLR", "params": {"total_num_steps": total, "warmup_num_steps": 3}}
    with pytest.raises(DeepSpeedConfigError, match=rf"total_num_steps={total} but train.steps={steps}: .*{words}.*"
                                                  "remove total_num_steps"):
        check({"scheduler": scheduler}, **{"train.steps": steps})
    check({"scheduler": scheduler}, **{"train.steps": total})
