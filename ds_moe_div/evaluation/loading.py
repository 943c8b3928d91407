"""A checkpoint, ready to evaluate on 1 or N ranks: its config, its data, and an engine without optimizer.

    loaded = load_for_eval("runs/tiny", micro_batch_size=8)      # run dir, checkpoints/ dir or tag dir
    loaded.engine(input_ids_BS, labels_BS=labels)                 # eval mode, weights of the checkpoint

The experiment config is rebuilt from the checkpoint's run_config.json. ep_size falls back to 1 when it
does not divide the world size: module-only loading works across EP sizes (one file per global expert).
The engine gets a minimal DeepSpeed config (micro batch only, bf16 on GPU), never an optimizer.
Relative data paths in the config (corpus_dir, ...) are relative to where the run was launched: when
train.run_dir was relative, that directory is the run dir minus it, and the data is prepared from there
(the paths are not rewritten: they are part of the data cache key).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ds_moe_div import checkpoint, rundir
from ds_moe_div.config import ExperimentConfig
from ds_moe_div.config_loader import from_dict, to_dict
from ds_moe_div.data import PreparedData, prepare_data
from ds_moe_div.distributed import (
    RankInfo,
    init_distributed,
    main_rank_first,
    set_cpu_threads,
)
from ds_moe_div.ds_config import inference_config
from ds_moe_div.model import MoELanguageModel

DEFAULT_MICRO_BATCH = 8


@dataclass
class LoadedCheckpoint:
    tag_dir: Path
    step: int
    saved_config: dict  # run_config.json's "config", as the run resolved it
    cfg: ExperimentConfig  # the same, with the evaluation's ep_size
    info: RankInfo
    engine: object
    model: MoELanguageModel
    data: PreparedData
    micro_batch_size: int
    dtype: str
    launch_dir: Path  # where relative data paths of the config resolve

    @property
    def run_dir(self) -> Path:
        return rundir.run_dir_of(self.tag_dir)


def eval_config(saved: dict, world_size: int) -> ExperimentConfig:
    cfg = from_dict(ExperimentConfig, saved)
    if world_size % cfg.model.moe.ep_size == 0:
        return cfg
    moe = dataclasses.replace(cfg.model.moe, ep_size=1)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))


def default_micro_batch(cfg: ExperimentConfig, run_dir: Path) -> int:
    """The training micro batch (experiment config, else the run's ds_config.json), else 8."""
    if cfg.train.micro_batch_size is not None:
        return cfg.train.micro_batch_size
    try:
        return int(json.loads(rundir.ds_config_path(run_dir).read_text())["train_micro_batch_size_per_gpu"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_MICRO_BATCH


def launch_dir(cfg: ExperimentConfig, run_dir: Path) -> Path:
    """The directory the run was launched from (the current one unless the run dir tells otherwise)."""
    relative = Path(cfg.train.run_dir)
    run_dir = run_dir.resolve()
    if relative.is_absolute() or run_dir.parts[-len(relative.parts):] != relative.parts:
        return Path.cwd()
    return run_dir.parents[len(relative.parts) - 1]


@contextlib.contextmanager
def working_dir(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def load_for_eval(path, *, micro_batch_size: int | None = None, show_progress: bool = True) -> LoadedCheckpoint:
    """Collective: every rank calls it. Initialises torch.distributed if needed."""
    root, tag = checkpoint.resolve_checkpoint(path)
    tag_dir = (root / tag).resolve()
    run_config = rundir.read_run_config(tag_dir)
    info = init_distributed()
    set_cpu_threads(info)
    cfg = eval_config(run_config["config"], info.world_size)
    micro = micro_batch_size or default_micro_batch(cfg, rundir.run_dir_of(tag_dir))
    base = launch_dir(cfg, rundir.run_dir_of(tag_dir))
    with main_rank_first(info), working_dir(base):
        data = prepare_data(cfg.data, show_progress=show_progress and info.is_main)
    vocab = int(run_config["architecture"]["vocab_size"])
    if data.vocab_size > vocab:
        raise checkpoint.CheckpointError(f"the tokenizer of {cfg.data.corpus!r} has {data.vocab_size} tokens, the "
                                         f"checkpoint's model {vocab}: the data changed since training")
    if cfg.model.pretrained:  # an imported Hugging Face MoE: its AutoEP layers are built inside initialize
        from ds_moe_div.hf import session as hf_session
        with working_dir(base):
            model = hf_session.build_pretrained(cfg, tokenizer_vocab=data.vocab_size)
        engine, dtype = _engine(model, micro, info.world_size, autoep=model.autoep_block(ep_size=cfg.model.moe.ep_size))
        model.attach_routing()
    else:
        model = MoELanguageModel(cfg.model, vocab_size=vocab, seq_len=cfg.data.seq_len, seed=cfg.train.seed,
                                 ep_rank=info.ep_rank(cfg.model.moe.ep_size))
        engine, dtype = _engine(model, micro, info.world_size)
    arch = checkpoint.architecture(to_dict(cfg.model), vocab, tokenizer=data.tokenizer_path)
    checkpoint.load(engine, tag_dir, arch=arch, rank=info.rank, module_only=True)
    engine.eval()
    return LoadedCheckpoint(tag_dir=tag_dir, step=int(run_config.get("step", 0)), saved_config=run_config["config"],
                            cfg=cfg, info=info, engine=engine, model=model, data=data, micro_batch_size=micro,
                            dtype=dtype, launch_dir=base)


def _engine(model: MoELanguageModel, micro: int, world_size: int, autoep: dict | None = None):
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_gpu = get_accelerator().device_name() != "cpu"
    config = inference_config(micro, world_size, on_gpu=on_gpu)
    if autoep is not None:
        config = {**config, "expert_parallel": autoep}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine, "bf16" if on_gpu else "fp32"
