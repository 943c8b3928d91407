"""Train a DeepSpeed-MoE language model with the specialisation objectives.

    deepspeed --num_gpus 2 scripts/train.py --deepspeed_config ds_configs/ds_zero2_cpu.json \
        --config ds_configs/experiments/tiny.json [--override objectives.divergence.coef=0.01] [--resume]

The loop reads on one screen: `train_step`, `maybe_log`, `maybe_eval`, `maybe_save`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from ds_moe_div import checkpoint
from ds_moe_div.composer import ObjectiveComposer
from ds_moe_div.config import ExperimentConfig, load_experiment
from ds_moe_div.config_loader import ConfigError
from ds_moe_div.ds_config import DeepSpeedConfigError, load_ds_config
from ds_moe_div.log_window import LogWindow
from ds_moe_div.metrics.tensorboard import log_routing_pictures
from ds_moe_div.session import TrainState, build


def parse_args(argv=None) -> argparse.Namespace:
    import deepspeed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment config (JSON or YAML); defaults apply when omitted")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. objectives.divergence.coef=0.01 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.run_dir")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return deepspeed.add_config_arguments(parser).parse_args(argv)


def load_configs(args) -> tuple[ExperimentConfig, dict]:
    overrides = list(args.override) + (["train.resume=true"] if args.resume else [])
    return load_experiment(args.config, overrides), load_ds_config(args.deepspeed_config)


def train_step(engine, batches: Iterator[dict], composer: ObjectiveComposer, window: LogWindow, *, step: int) -> None:
    """Optimizer step `step` (0-based): `gradient_accumulation_steps` micro-batches from `batches`, one
    engine.backward each; the losses and routing records go to `window`."""
    for _ in range(engine.gradient_accumulation_steps()):
        batch = {k: v.to(engine.device, non_blocking=True) for k, v in next(batches).items()}
        out = engine(batch["input_ids"], labels_BS=batch["labels"], collect_expert_outputs=composer.needs_expert_outputs)
        losses = composer(out, domain_ids_BS=batch["domain_ids"], step=step)
        engine.backward(losses.total)
        engine.step()
        window.add(losses, out, batch)
    if hasattr(engine.module, "end_of_step"):  # imported models: AutoEP's token counter restarts each step
        engine.module.end_of_step()



def maybe_log(state: TrainState, bar) -> None:
    if state.step % state.cfg.train.log_interval and state.step != state.cfg.train.steps:
        return
    scalars = state.window.flush(world_size=state.info.world_size, lr=state.engine.get_lr()[0],
                                 grad_norm=state.engine.get_global_grad_norm())
    state.monitor.scalars(scalars, state.step)
    stats = state.window.routing_stats
    if stats is not None and state.step % state.cfg.train.heatmap_interval == 0:
        log_routing_pictures(state.monitor, stats, state.data.domain_names, state.step)
    bar.set_postfix(lm=f"{scalars['train/lm_loss']:.3f}", tok_s=f"{scalars['train/tokens_per_s']:.0f}")


def maybe_eval(state: TrainState) -> None:
    if state.step % state.cfg.train.eval_interval and state.step != state.cfg.train.steps:
        return
    state.monitor.scalars(state.evaluate(), state.step)


def maybe_save(state: TrainState) -> None:
    if state.step % state.cfg.train.save_interval and state.step != state.cfg.train.steps:
        return
    state.save()


def run(state: TrainState) -> None:
    train = state.cfg.train
    with tqdm(total=train.steps, initial=state.step, disable=not (state.info.is_main and train.show_progress),
              desc="train", unit="step", dynamic_ncols=True) as bar:
        while state.step < train.steps:
            train_step(state.engine, state.train_iter, state.composer, state.window, step=state.step)
            state.step += 1
            maybe_log(state, bar)
            maybe_eval(state)
            maybe_save(state)
            bar.update(1)
    state.monitor.close()


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
    run(state)
    if state.info.is_main:
        run_dir = Path(cfg.train.run_dir).resolve()
        print(f"\nDone: {state.step} steps in {time.time() - started:.0f} s.\n"
              f"  checkpoints: {run_dir / 'checkpoints'}\n"
              f"  TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}\n"
              f"  config:      {run_dir / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
