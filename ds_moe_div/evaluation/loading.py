"""A checkpoint, ready to evaluate on 1 or N ranks: its config, its data, and an engine without optimizer.

    loaded = load_for_eval("runs/tiny", micro_batch_size=8)      # run dir, checkpoints/ dir or tag dir
    loaded.engine(input_ids_BS, labels_BS=labels)                 # eval mode, weights of the checkpoint

The experiment config is rebuilt from the checkpoint's run_config.json. ep_size falls back to 1 when it
does not divide the world size: module-only loading works across EP sizes (one file per global expert).
The engine gets a minimal DeepSpeed config (micro batch only, bf16 on GPU), never an optimizer.
Data and tokenizer paths are found with `config_paths.locate`: runs store them absolute; relative ones
(older runs) resolve against the directory the run was launched from, the run dir, then the cwd; a path
that is nowhere fails naming it and the fix (`eval --override data.corpus_dir=...`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ds_moe_div import checkpoint, config_paths, rundir
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
from ds_moe_div.selection_bias import enable_selection_bias

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


@contextlib.contextmanager
def working_dir(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def load_for_eval(path, *, micro_batch_size: int | None = None, show_progress: bool = True,
                  path_overrides: dict[str, str] | None = None) -> LoadedCheckpoint:
    """Collective: every rank calls it. Initialises torch.distributed if needed. `path_overrides`
    ({"data.corpus_dir": "/new/place"}) point a run at data that moved."""
    root, tag = checkpoint.resolve_checkpoint(path)
    tag_dir = (root / tag).resolve()
    run_config = rundir.read_run_config(tag_dir)
    saved, base = config_paths.locate(run_config["config"], run_dir=rundir.run_dir_of(tag_dir),
                                      overrides=path_overrides)
    info = init_distributed()
    set_cpu_threads(info)
    cfg = eval_config(saved, info.world_size)
    micro = micro_batch_size or default_micro_batch(cfg, rundir.run_dir_of(tag_dir))
    with main_rank_first(info), working_dir(base):
        data = prepare_data(cfg.data, show_progress=show_progress and info.is_main)
    vocab = int(run_config["architecture"]["vocab_size"])
    if data.vocab_size > vocab:
        raise checkpoint.CheckpointError(f"the tokenizer of {cfg.data.corpus!r} has {data.vocab_size} tokens, the "
                                         f"checkpoint's model {vocab}: the data changed since training")
    model, engine, dtype = _build_model(cfg, vocab=vocab, tokenizer_vocab=data.vocab_size, micro=micro,
                                        world_size=info.world_size, ep_rank=info.ep_rank(cfg.model.moe.ep_size),
                                        base=base)
    arch = checkpoint.architecture(to_dict(cfg.model), vocab, tokenizer=data.tokenizer_path)
    checkpoint.load(engine, tag_dir, arch=arch, rank=info.rank, module_only=True)
    if cfg.model.pretrained and cfg.model.lora is not None:  # evaluate merged weights (a router permutation
        model.lora_peft_model.merge_and_unload()            # then permutes the adapted router, not the base)
    engine.eval()
    return LoadedCheckpoint(tag_dir=tag_dir, step=int(run_config.get("step", 0)), saved_config=saved,
                            cfg=cfg, info=info, engine=engine, model=model, data=data, micro_batch_size=micro,
                            dtype=dtype, launch_dir=base)



def _build_model(cfg: ExperimentConfig, *, vocab: int, tokenizer_vocab: int, micro: int, world_size: int,
                 ep_rank: int, base: Path):
    """The run's model in an inference engine, routing as trained (Loss-Free biases on), weights not loaded
    yet: an imported model, a from-scratch AutoEP one (their AutoEP layers are built inside initialize; a
    LoRA run's are converted and adapted here, hf/lora.py), or the native one. -> (model, engine, dtype)"""
    ep_size = cfg.model.moe.ep_size
    if cfg.model.uses_autoep:
        from ds_moe_div.hf import autoep, scratch
        from ds_moe_div.hf import session as hf_session
        if cfg.model.pretrained:
            with working_dir(base):
                model = hf_session.build_pretrained(cfg, tokenizer_vocab=tokenizer_vocab)
        else:
            model = scratch.build_scratch(cfg.model, vocab_size=vocab, seq_len=cfg.data.seq_len, seed=cfg.train.seed)
        if cfg.model.lora is not None:
            from ds_moe_div.hf import lora
            lora.prepare(model, cfg.model.lora, ep_size=ep_size, seed=cfg.train.seed, ep_rank=ep_rank, verbose=False)
            engine, dtype = _engine(model, micro, world_size)
        else:
            engine, dtype = _engine(model, micro, world_size, autoep=model.autoep_block(ep_size=ep_size))
        model.attach_routing()
        if cfg.objectives.balance.method == "loss_free":  # with the checkpoint's expert_bias
            autoep.enable_expert_bias(model)
        return model, engine, dtype
    model = MoELanguageModel(cfg.model, vocab_size=vocab, seq_len=cfg.data.seq_len, seed=cfg.train.seed,
                             ep_rank=ep_rank)
    if cfg.objectives.balance.method == "loss_free":  # with the checkpoint's selection bias
        enable_selection_bias([layer.gate for layer in model.moe_layers()])
    return model, *_engine(model, micro, world_size)


def _engine(model: MoELanguageModel, micro: int, world_size: int, autoep: dict | None = None):
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_gpu = get_accelerator().device_name() != "cpu"
    config = inference_config(micro, world_size, on_gpu=on_gpu)
    if autoep is not None:
        config = {**config, "expert_parallel": autoep}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine, "bf16" if on_gpu else "fp32"


@dataclass
class LoadedModel:
    """A checkpoint's model and tokenizer only (no data): for generation and task scoring."""
    tag_dir: Path
    step: int
    cfg: ExperimentConfig
    engine: object
    model: MoELanguageModel  # or hf.model.PretrainedMoELM for a model.pretrained run
    tokenizer: object  # tokenizers.Tokenizer
    pad_id: int
    eos_id: int
    dtype: str

    def scorer(self, batch_size: int = 16):
        from ds_moe_div.evaluation.scoring import ModelScorer
        return ModelScorer(self.model, self.tokenizer, eos_id=self.eos_id, pad_id=self.pad_id,
                           max_length=self.cfg.data.seq_len, batch_size=batch_size)


def load_model_only(path, *, tag: str | None = None) -> LoadedModel:
    """One process, EP=1, whatever ep_size the run trained with: the weights and the checkpoint's own
    tokenizer.json (the corpus is not needed). A `model.pretrained` run builds the imported Hugging Face model
    (AutoEP layers, EP=1) and takes EOS/pad from the checkpoint's tokenizer (a hub tokenizer without <|eos|>:
    its tokenizer_config/generation_config/config; no pad token: pad with EOS, masked out of every score)."""
    from ds_moe_div.data.tokenize import load_tokenizer, special_ids

    root, found = checkpoint.resolve_checkpoint(rundir.tag_dir(path, tag) if tag else path)
    tag_dir = (root / found).resolve()
    run_config = rundir.read_run_config(tag_dir)
    tokenizer_file = rundir.tokenizer_path(tag_dir)
    if not tokenizer_file.is_file():
        raise checkpoint.CheckpointError(f"{tokenizer_file} is missing: this checkpoint was saved without its "
                                         "tokenizer; evaluate it with `eval --run-dir` (which rebuilds the data)")
    info = init_distributed()
    if info.world_size != 1:
        raise ValueError(f"generation and task scoring run on one process (world size {info.world_size}); "
                         "start them with python -m ds_moe_div, not the deepspeed launcher")
    set_cpu_threads(info)
    cfg = eval_config(run_config["config"], 1)
    vocab = int(run_config["architecture"]["vocab_size"])
    tokenizer = load_tokenizer(tokenizer_file, project_tokens=False)  # a checkpoint's own: EOS found below
    model, engine, dtype = _build_model(cfg, vocab=vocab, tokenizer_vocab=tokenizer.get_vocab_size(), micro=1,
                                        world_size=1, ep_rank=0, base=Path.cwd())
    arch = checkpoint.architecture(to_dict(cfg.model), vocab, tokenizer=tokenizer_file)
    checkpoint.load(engine, tag_dir, arch=arch, rank=0, module_only=True)
    if cfg.model.pretrained and cfg.model.lora is not None:  # generate / score with merged weights
        model.lora_peft_model.merge_and_unload()
    engine.eval()
    pad_id, eos_id = special_ids(tokenizer)
    if eos_id is None and cfg.model.pretrained:  # a hub tokenizer: its own end-of-text token
        from ds_moe_div.evaluation.special_tokens import hf_special_ids
        pad_id, eos_id = hf_special_ids(tokenizer, cfg.model.pretrained)
    if eos_id is None:
        raise checkpoint.CheckpointError(f"{tokenizer_file} has no end-of-text token (<|eos|>): generation and "
                                         "task scoring need one")
    if pad_id is None:
        pad_id = eos_id  # padding is masked out of every score
    return LoadedModel(tag_dir=tag_dir, step=int(run_config.get("step", 0)), cfg=cfg, engine=engine, model=model,
                       tokenizer=tokenizer, pad_id=pad_id, eos_id=eos_id, dtype=dtype)
