"""The DeepSpeed JSON stays a plain DeepSpeed file; this module loads it and cross-checks it once,
before any training step, against the experiment config and the world size.

Every error names the key and the fix. `resolve_batch` returns the (micro, accumulation) pair both
configs agree on.
"""
from __future__ import annotations

import json
from pathlib import Path

from ds_moe_div.config import ExperimentConfig


class DeepSpeedConfigError(ValueError):
    pass


def load_ds_config(path) -> dict:
    if path is None:
        raise DeepSpeedConfigError("no DeepSpeed config: pass --deepspeed_config ds_configs/ds_zero2_cpu.json "
                                   "(or another file in ds_configs/)")
    p = Path(path)
    if not p.is_file():
        raise DeepSpeedConfigError(f"DeepSpeed config {p} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"{p}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def check_ds_config(ds: dict, cfg: ExperimentConfig, *, world_size: int, on_cpu: bool) -> tuple[int, int]:
    """Validate `ds` against `cfg`; return (micro_batch_size, gradient_accumulation_steps)."""
    _check_zero(ds.get("zero_optimization", {}))
    ep = cfg.model.moe.ep_size
    if world_size % ep:
        raise DeepSpeedConfigError(f"model.moe.ep_size={ep} does not divide the world size {world_size}: "
                                   f"launch a multiple of {ep} ranks or change ep_size")
    if "optimizer" not in ds:
        raise DeepSpeedConfigError("the DeepSpeed config has no 'optimizer' section: add one (e.g. AdamW with "
                                   "\"torch_adam\": true on CPU) so DeepSpeed builds the MoE parameter groups")
    if on_cpu and ds.get("fp16", {}).get("enabled"):
        raise DeepSpeedConfigError("fp16.enabled is true but this run is on CPU: use fp32 (or bf16 on GPU)")
    return resolve_batch(ds, cfg, world_size=world_size)


def _check_zero(zero: dict) -> None:
    stage = int(zero.get("stage", 0))
    if stage == 3:
        raise DeepSpeedConfigError("zero_optimization.stage=3 is not supported with DeepSpeed's native MoE layers: "
                                   "use stage 2 (with contiguous_gradients and reduce_scatter) or stage 1")
    if stage == 2:
        for key in ("contiguous_gradients", "reduce_scatter"):
            if zero.get(key, True) is False:
                raise DeepSpeedConfigError(f"zero_optimization.{key}=false: DeepSpeed's ZeRO stage 2 with MoE "
                                           f"requires it; set \"{key}\": true or use stage 1")


def resolve_batch(ds: dict, cfg: ExperimentConfig, *, world_size: int) -> tuple[int, int]:
    micro = _agree("train_micro_batch_size_per_gpu", ds.get("train_micro_batch_size_per_gpu"),
                   "train.micro_batch_size", cfg.train.micro_batch_size)
    gas = _agree("gradient_accumulation_steps", ds.get("gradient_accumulation_steps"),
                 "train.gradient_accumulation_steps", cfg.train.gradient_accumulation_steps)
    total = ds.get("train_batch_size")
    if micro is None:
        if total is None:
            raise DeepSpeedConfigError("no batch size: set train_micro_batch_size_per_gpu in the DeepSpeed config "
                                       "or train.micro_batch_size in the experiment config")
        micro = total // ((gas or 1) * world_size)
    gas = gas or (total // (micro * world_size) if total else 1)
    if total is not None and total != micro * gas * world_size:
        raise DeepSpeedConfigError(
            f"train_batch_size={total} != micro ({micro}) x gradient_accumulation_steps ({gas}) x world size "
            f"({world_size}) = {micro * gas * world_size}: drop train_batch_size or make them agree")
    if micro < 1 or gas < 1:
        raise DeepSpeedConfigError(f"batch sizes must be >= 1 (micro={micro}, gradient_accumulation_steps={gas})")
    return micro, gas


def _agree(ds_key: str, ds_value, cfg_key: str, cfg_value):
    if ds_value is not None and cfg_value is not None and ds_value != cfg_value:
        raise DeepSpeedConfigError(f"batch sizes disagree: DeepSpeed {ds_key}={ds_value} but {cfg_key}={cfg_value}; "
                                   f"set one of them (the other may be left out)")
    return cfg_value if cfg_value is not None else ds_value


def engine_config(ds: dict, micro: int, gas: int, world_size: int) -> dict:
    """The dict handed to deepspeed.initialize: the user's file with the agreed batch sizes filled in."""
    resolved = dict(ds)
    resolved.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas,
                    train_batch_size=micro * gas * world_size)
    return resolved
