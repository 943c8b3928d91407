"""Numbers are refused before anything is written: non-finite or out-of-range experiment settings (for
every dataclass, by field name) and DeepSpeed optimizer/scheduler numbers; `auto` coefficients never
become 0 or NaN when the calibration batch's term is 0."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from ds_moe_div.composer import ObjectiveComposer
from ds_moe_div.config import load_experiment
from ds_moe_div.config_loader import ConfigError, check_number, load_config
from ds_moe_div.ds_config import DeepSpeedConfigError, check_ds_config
from ds_moe_div.model import ModelOutput
from ds_moe_div.routing import RoutingRecord


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("key", ["objectives.variance.coef", "objectives.balance.coef", "objectives.divergence.coef",
                                 "objectives.orthogonality.auto_target", "model.moe.capacity_factor",
                                 "data.val_fraction"])
def test_non_finite_numbers_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' is (nan|inf|-inf): numbers in the config must be finite"):
        load_experiment(None, [f"{key}={value}"])


def test_non_finite_numbers_in_a_json_file_are_refused(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text('{"objectives": {"divergence": {"coef": NaN}}}')
    with pytest.raises(ConfigError, match="'objectives.divergence.coef' is nan"):
        load_experiment(path)


@pytest.mark.parametrize("key,value,requirement", [
    ("objectives.balance.coef", -0.01, ">= 0"), ("objectives.variance.coef", -1.0, ">= 0"),
    ("objectives.divergence.eps", 0.0, "> 0"), ("objectives.variance.auto_target", -1e-3, "> 0"),
    ("objectives.z_loss.warmup_steps", -5, ">= 0"), ("model.moe.capacity_factor", 0.0, "> 0"),
    ("train.micro_batch_size", 0, ">= 1"), ("model.norm_eps", -1e-5, "> 0")])
def test_out_of_range_numbers_are_refused(key, value, requirement):
    with pytest.raises(ConfigError, match=rf"'{key}' = {value!r} is out of range: it must be {requirement}"):
        load_experiment(None, [f"{key}={json.dumps(value)}"])


def test_range_rules_apply_to_any_dataclass_by_field_name():
    """A knob added later with a conventional name is covered without code of its own."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class New:
        gate_coef: float = 0.0
        lr: float = 1e-3

    globals()["New"] = New  # get_type_hints resolves names at module level
    try:
        with pytest.raises(ConfigError, match="'gate_coef' = -1.0 is out of range"):
            load_config(New, None, ["gate_coef=-1.0"])
        with pytest.raises(ConfigError, match="'lr' = 0.0 is out of range"):
            load_config(New, None, ["lr=0"])
        assert load_config(New, None, ["gate_coef=0.5"]).gate_coef == 0.5
    finally:
        del globals()["New"]
    check_number("anything", 3, "x")  # names without a rule: any finite number


BASE_DS = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                     "weight_decay": 0.1}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3,
                                                        "warmup_num_steps": 10}}}


@pytest.mark.parametrize("path,value,message", [
    ("optimizer.params.lr", math.inf, "optimizer.params.lr is inf in the DeepSpeed config: every number must be finite"),
    ("optimizer.params.lr", 0.0, r"optimizer.params.lr=0.0 in the DeepSpeed config is out of range: it must be > 0"),
    ("optimizer.params.eps", math.nan, "optimizer.params.eps is nan"),
    ("optimizer.params.weight_decay", -0.1, "weight_decay=-0.1 .* must be >= 0"),
    ("optimizer.params.betas", [0.9, 1.0], r"optimizer.params.betas\[1\]=1.0 .* in \[0, 1\)"),
    ("gradient_clipping", -1.0, "gradient_clipping=-1.0 .* >= 0"),
    ("scheduler.params.warmup_max_lr", math.inf, "warmup_max_lr is inf"),
    ("scheduler.params.warmup_num_steps", -3, "warmup_num_steps=-3 .* >= 0")])
def test_deepspeed_numbers_are_refused(path, value, message):
    ds = json.loads(json.dumps(BASE_DS))
    parent = ds
    for key in path.split(".")[:-1]:
        parent = parent.setdefault(key, {})
    parent[path.split(".")[-1]] = value
    with pytest.raises(DeepSpeedConfigError, match=message):
        check_ds_config(ds, load_experiment(None), world_size=2, on_cpu=True)


def test_an_infinite_lr_read_from_a_file_is_refused(tmp_path):
    from ds_moe_div.ds_config import load_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(BASE_DS).replace('"lr": 0.001', '"lr": Infinity'))
    with pytest.raises(DeepSpeedConfigError, match="optimizer.params.lr is inf"):
        check_ds_config(load_ds_config(path), load_experiment(None), world_size=2, on_cpu=True)


# ---- auto coefficients ------------------------------------------------------------------------------------------

T, E = 12, 4


def _output(k: int, *, uniform: bool, seed: int = 0) -> ModelOutput:
    g = torch.Generator().manual_seed(seed)
    logits = torch.zeros(T, E) if uniform else torch.randn(T, E, generator=g)
    probs = logits.softmax(-1)
    weights, idx = probs.topk(k, -1)
    record = RoutingRecord(layer_id=0, logits_TE=logits, probs_TE=probs, indices_TK=idx,
                           weights_TK=weights / weights.sum(-1, keepdim=True), kept_TK=torch.ones(T, k, dtype=torch.bool),
                           l_aux=probs.mean() * E, capacity=T, expert_outputs_TKM=torch.randn(T, k, 8, generator=g))
    return ModelOutput(lm_loss=torch.tensor(2.0), token_nll_BS=torch.zeros(2, 6), routing=(record,))


def _auto_composer():
    cfg = load_experiment(None, ['objectives.orthogonality.coef="auto"', 'objectives.variance.coef="auto"']).objectives
    return ObjectiveComposer(cfg, num_domains=1)


def test_auto_coefficient_with_k1_stays_at_the_target_with_a_warning():
    """Orthogonality with k = 1 is exactly 0 on every batch: the coefficient is the target, never 0/NaN."""
    composer = _auto_composer()
    with pytest.warns(UserWarning, match="orthogonality.coef=auto: the term is 0.0 .* the target 0.0001"):
        res = composer(_output(1, uniform=False), domain_ids_BS=None, step=0)
    assert res.coefs["orthogonality"] == 1e-4 and "orthogonality" not in composer.calibrated
    assert math.isfinite(float(res.total)) and "orthogonality" in composer.active()
    assert "variance" in composer.calibrated  # non-zero on the same batch: calibrated at once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per term, not per batch
        composer(_output(1, uniform=False, seed=1), domain_ids_BS=None, step=1)


def test_auto_coefficient_calibrates_on_the_first_non_zero_batch():
    """Uniform routing: the variance term is 0 (pending, at its target); the next routed batch calibrates it."""
    composer = _auto_composer()
    with pytest.warns(UserWarning, match="variance.coef=auto"):
        first = composer(_output(2, uniform=True), domain_ids_BS=None, step=0)
    assert float(first.unscaled["variance"]) == 0.0 and first.coefs["variance"] == 1e-3
    assert "variance" not in composer.calibrated
    second = composer(_output(2, uniform=False), domain_ids_BS=None, step=1)
    coef = composer.calibrated["variance"]
    assert second.coefs["variance"] == coef and coef > 0 and math.log10(coef) == round(math.log10(coef))
    assert 10 ** -0.5 <= abs(coef * float(second.unscaled["variance"])) / 1e-3 <= 10 ** 0.5
    third = composer(_output(2, uniform=True), domain_ids_BS=None, step=2)  # calibrated once: stays
    assert third.coefs["variance"] == coef
    restored = _auto_composer()
    restored.load_state_dict(composer.state_dict())
    assert restored.coefficient("variance", 5) == coef
