"""Train a DeepSpeed-MoE language model with the specialisation objectives.

    deepspeed --num_gpus 2 scripts/train.py --deepspeed_config ds_configs/ds_zero2_cpu.json \
        --config ds_configs/experiments/tiny.json [--override objectives.divergence.coef=0.01] [--resume]

The loop reads on one screen: `train_step`, `maybe_log`, `maybe_eval`, `maybe_save`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ds_moe_div import checkpoint, faults, progress
from ds_moe_div.cli import prog
from ds_moe_div.composer import ObjectiveComposer
from ds_moe_div.config import ExperimentConfig, load_experiment
from ds_moe_div.config_loader import ConfigError
from ds_moe_div.ds_config import DeepSpeedConfigError, load_ds_config
from ds_moe_div.guard import step_applied
from ds_moe_div.interrupt import Interrupted
from ds_moe_div.log_window import LogWindow
from ds_moe_div.metrics.tensorboard import log_routing_pictures
from ds_moe_div.nonfinite import NonFiniteLossError
from ds_moe_div.session import TrainState, build


def parse_args(argv=None) -> argparse.Namespace:
    import deepspeed

    parser = argparse.ArgumentParser(prog=prog("train"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment config (JSON or YAML); defaults apply when omitted")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. objectives.divergence.coef=0.01 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.run_dir")
    parser.add_argument("--resume-from", metavar="TAG", help="continue from this checkpoint tag of train.run_dir "
                        "(e.g. global_step300); sets train.resume_from")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return deepspeed.add_config_arguments(parser).parse_args(argv)


def load_configs(args) -> tuple[ExperimentConfig, dict]:
    overrides = list(args.override) + (["train.resume=true"] if args.resume else [])
    if getattr(args, "resume_from", None):
        overrides.append(f"train.resume_from={json.dumps(args.resume_from)}")
    return load_experiment(args.config, overrides), load_ds_config(args.deepspeed_config)


def train_step(engine, batches: Iterator[dict], composer: ObjectiveComposer, window: LogWindow, *, step: int,
               balancer=None, lm_mean=None) -> torch.Tensor:
    """Optimizer step `step` (0-based): `gradient_accumulation_steps` micro-batches from `batches`, one
    engine.backward each; the losses and routing records go to `window`. `balancer` (Loss-Free
    Balancing, `loss_free.LossFreeBalancer`) counts every micro-batch and updates its biases once, after
    the optimizer step. `lm_mean` (`lm_loss.GlobalTokenMean`, data with a loss mask) makes each micro-batch's
    LM loss its share of the global batch's token-weighted mean. Returns the sum of the micro-batches' total losses (detached, on the device:
    non-finite if any of them was)."""
    collect = composer.needs_expert_outputs or window.needs_expert_outputs
    step_loss = None
    micro_batches = [{k: v.to(engine.device, non_blocking=True) for k, v in next(batches).items()}
                     for _ in range(engine.gradient_accumulation_steps())]
    if lm_mean is not None:
        lm_mean.start_step(micro_batches)
    for batch in micro_batches:
        out = engine(batch["input_ids"], labels_BS=batch["labels"], collect_expert_outputs=collect)
        if lm_mean is not None:
            out = lm_mean(out, labels_BS=batch["labels"])
        losses = composer(out, domain_ids_BS=batch["domain_ids"], step=step)
        engine.backward(losses.total)
        engine.step()
        window.add(losses, out, batch)
        if balancer is not None:
            balancer.add(out.routing, batch["domain_ids"].reshape(-1) >= 0)
        step_loss = losses.total.detach() if step_loss is None else step_loss + losses.total.detach()
    window.end_step()
    if hasattr(engine.module, "end_of_step"):  # imported models: AutoEP's token counter restarts each step
        engine.module.end_of_step()
    if balancer is not None:
        balancer.step()
    return step_loss


def maybe_log(state: TrainState, bar) -> dict:
    if state.step % state.cfg.train.log_interval and state.step != state.cfg.train.steps:
        return {}
    scalars = state.window.flush(world_size=state.info.world_size, lr=state.engine.get_lr()[0],
                                 grad_norm=state.engine.get_global_grad_norm())
    if state.balancer is not None:
        scalars.update(state.balancer.scalars())
    state.monitor.scalars(scalars, state.step)
    stats = state.window.routing_stats
    if stats is not None and state.step % state.cfg.train.heatmap_interval == 0:
        log_routing_pictures(state.monitor, stats, state.data.domain_names, state.step)
    bar.set_postfix(lm=f"{scalars['train/lm_loss']:.3f}", tok_s=f"{scalars['train/tokens_per_s']:.0f}")
    return scalars


def maybe_eval(state: TrainState) -> dict:
    if state.step % state.cfg.train.eval_interval and state.step != state.cfg.train.steps:
        return {}
    result = state.evaluate()
    state.monitor.scalars(result, state.step)
    return result


def maybe_save(state: TrainState, *, stop: bool = False) -> Path | None:
    """Checkpoint at save intervals, the last step, and a step a stop signal ended (`stop`)."""
    if state.step % state.cfg.train.save_interval and state.step != state.cfg.train.steps and not stop:
        return None
    return state.save()


def run(state: TrainState) -> dict[str, float]:
    """Train to train.steps; returns the last logged scalars (train and held-out losses among them).
    Raises Interrupted (SIGINT/SIGTERM: after saving this step), NonFiniteLossError or
    checkpoint.DiskFullError. See guard.py for the per-step checks."""
    train, guard, last = state.cfg.train, state.guard, {}
    # A tqdm bar on a terminal; one log line every log_interval steps elsewhere (see progress.py).
    with progress.bar(total=train.steps, initial=state.step, desc="train", unit="step",
                      enabled=state.info.is_main and train.show_progress, log_every=train.log_interval) as bar, \
            guard.signals:
        while state.step < train.steps:
            loss = train_step(state.engine, state.train_iter, state.composer, state.window, step=state.step,
                              balancer=state.balancer, lm_mean=state.lm_mean)
            state.step += 1
            faults.inject("step", step=state.step, rank=state.info.rank)
            stop = guard.after_step(loss, step=state.step, applied=step_applied(state.engine))
            last.update(maybe_log(state, bar))
            last.update(maybe_eval(state))
            saved = maybe_save(state, stop=stop)
            bar.update(1)
            if stop and state.step < train.steps:  # on the last step the run is simply done
                raise Interrupted(guard.stop_signal, state.step, saved.name if saved else None)
    return last


def main(argv=None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    # DeepSpeed 0.19.8's ZeRO calls a torch collective torch deprecates, once per step and rank.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    args = parse_args(argv)
    try:
        cfg, ds = load_configs(args)
        state = build(cfg, ds)
    except (ConfigError, DeepSpeedConfigError, checkpoint.CheckpointError, ValueError) as e:
        print(f"ds_moe_div: error: {e}", file=sys.stderr)
        return 2
    started = time.time()
    try:
        last = run(state)
    except (Interrupted, NonFiniteLossError, checkpoint.DiskFullError) as e:
        print(f"ds_moe_div: {'error: ' if not isinstance(e, Interrupted) else ''}{e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        state.close()
    if state.info.is_main:
        print("\n" + progress.training_summary(cfg.train.run_dir, steps=state.step, seconds=time.time() - started,
                                                last=last))
    return 0


if __name__ == "__main__":
    sys.exit(main())
