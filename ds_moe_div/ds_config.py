"""The DeepSpeed JSON stays a plain DeepSpeed file; this module loads it and cross-checks it once,
before any training step, against the experiment config and the world size.

Every error names the key and the fix. `resolve_batch` returns the (micro, accumulation) pair both
configs agree on. The experiment config owns the length of training: a scheduler with a length
(WarmupDecayLR, WarmupCosineLR) gets `total_num_steps = train.steps` when the file leaves it out, and a
file that sets another value is refused (otherwise `--override train.steps=5000` on a 300-step schedule
would train 4,700 steps at the floor learning rate without a word).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ds_moe_div.config import ExperimentConfig


class DeepSpeedConfigError(ValueError):
    pass


# DeepSpeed schedulers whose shape depends on the number of optimizer steps.
SCHEDULERS_WITH_LENGTH = ("WarmupDecayLR", "WarmupCosineLR")


def scheduler_has_length(ds: dict) -> bool:
    """The DeepSpeed config's scheduler takes total_num_steps."""
    return ds.get("scheduler", {}).get("type") in SCHEDULERS_WITH_LENGTH


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
    check_numbers(ds)
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
    _check_schedule(ds, cfg.train.steps)
    return resolve_batch(ds, cfg, world_size=world_size)


# Dotted keys of the DeepSpeed JSON (optimizer and scheduler params, whatever their type) -> (test, range).
NUMBER_RANGES = {
    "optimizer.params.lr": (lambda v: v > 0, "> 0"),
    "optimizer.params.eps": (lambda v: v > 0, "> 0"),
    "optimizer.params.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optimizer.params.betas": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "gradient_clipping": (lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
    "scheduler.params.warmup_min_lr": (lambda v: v >= 0, ">= 0"),
    "scheduler.params.warmup_max_lr": (lambda v: v > 0, "> 0"),
    "scheduler.params.warmup_num_steps": (lambda v: v >= 0, ">= 0"),
    "scheduler.params.warmup_min_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "scheduler.params.cos_min_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "scheduler.params.total_num_steps": (lambda v: v >= 1, ">= 1"),
}


def check_numbers(ds: dict, path: str = "") -> None:
    """Every number of the DeepSpeed JSON is finite (Python's json reads NaN and Infinity), and the
    optimizer's and scheduler's numbers are in range (NUMBER_RANGES): an infinite learning rate would
    otherwise train to NaN without a word."""
    items = ds.items() if isinstance(ds, dict) else enumerate(ds) if isinstance(ds, list) else ()
    for key, value in items:
        dotted = f"{path}.{key}" if path and isinstance(key, str) else (f"{path}[{key}]" if path else str(key))
        if isinstance(value, (dict, list)):
            check_numbers(value, dotted)
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if not math.isfinite(value):
            raise DeepSpeedConfigError(f"{dotted} is {value} in the DeepSpeed config: every number must be finite")
        rule = NUMBER_RANGES.get(dotted.split("[")[0])
        if rule is not None and not rule[0](value):
            raise DeepSpeedConfigError(f"{dotted}={value!r} in the DeepSpeed config is out of range: it must be "
                                       f"{rule[1]}")


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


def _check_schedule(ds: dict, steps: int) -> None:
    if not scheduler_has_length(ds):
        return
    total = ds["scheduler"].get("params", {}).get("total_num_steps")
    if total is not None and total != steps:
        raise DeepSpeedConfigError(
            f"scheduler.params.total_num_steps={total} but train.steps={steps}: the learning-rate schedule would "
            f"{'stop decaying' if total < steps else 'never finish decaying'} at step {min(total, steps)}; remove "
            f"total_num_steps from the DeepSpeed config (it is then set to train.steps) or make the two agree")


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


def engine_config(ds: dict, micro: int, gas: int, world_size: int, *, steps: int | None = None) -> dict:
    """The dict handed to deepspeed.initialize: the user's file with the agreed batch sizes filled in and,
    given `steps`, a length-dependent scheduler's total_num_steps."""
    resolved = dict(ds)
    resolved.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas,
                    train_batch_size=micro * gas * world_size)
    if steps is not None and scheduler_has_length(ds):
        scheduler = ds["scheduler"]
        resolved["scheduler"] = dict(scheduler, params={"total_num_steps": steps, **scheduler.get("params", {})})
    return resolved


def inference_config(micro: int, world_size: int, *, on_gpu: bool) -> dict:
    """The engine config of an evaluation (no optimizer, no ZeRO, bf16 on GPU), through `engine_config`."""
    return engine_config({"steps_per_print": 10**9, "bf16": {"enabled": on_gpu}}, micro, 1, world_size)
