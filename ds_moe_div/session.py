"""Everything a training run holds, built once and validated before any step: `build(cfg, ds) -> TrainState`.

Order matters and is the reason this module exists: configs are cross-checked and the run directory is
checked before anything is written; data is prepared on rank 0 first; the model is built with the same
seed on every rank; DeepSpeed creates the expert groups; then the composer learns which group reduces
the divergence statistics; finally a checkpoint is loaded (resume or init_from).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch.distributed as dist

from ds_moe_div import checkpoint, config_paths, fileio, reshard, rundir
from ds_moe_div.composer import ObjectiveComposer
from ds_moe_div.config import ExperimentConfig
from ds_moe_div.config_loader import dump_config, to_dict
from ds_moe_div.data import BatchLoader, PreparedData, check_enough, prepare_data
from ds_moe_div.distributed import (
    RankInfo,
    divergence_group,
    init_distributed,
    main_rank_first,
    seed_everything,
    set_cpu_threads,
)
from ds_moe_div.ds_config import check_ds_config, engine_config
from ds_moe_div.evaluation.heldout import heldout_sums, summarize
from ds_moe_div.guard import RunGuard
from ds_moe_div.hf import autoep, scratch
from ds_moe_div.hf import session as hf_session
from ds_moe_div.hf.vocab import check_vocabulary
from ds_moe_div.lm_loss import GlobalTokenMean
from ds_moe_div.log_window import LogWindow
from ds_moe_div.loss_free import LossFreeBalancer
from ds_moe_div.metrics.accumulator import RoutingAccumulator
from ds_moe_div.model import MoELanguageModel
from ds_moe_div.monitor import HPARAM_METRICS, Monitor, check_ds_monitor, run_hparams
from ds_moe_div.runlock import RunLock, lock_run_dir
from ds_moe_div.selection_bias import enable_selection_bias, selection_biases


@dataclass
class TrainState:
    cfg: ExperimentConfig
    info: RankInfo
    engine: object
    composer: ObjectiveComposer
    data: PreparedData
    loader: BatchLoader
    monitor: Monitor
    micro_batch_size: int
    arch: dict
    step: int = 0
    window: LogWindow = field(default_factory=LogWindow)
    balancer: LossFreeBalancer | None = None  # objectives.balance.method = loss_free
    guard: RunGuard | None = None  # non-finite losses and stop signals (None: unchecked)
    lock: RunLock | None = None  # the run dir's lock (rank 0)
    lm_mean: GlobalTokenMean | None = None  # data with a loss mask: token-weighted LM mean of the global batch

    def __post_init__(self):
        self.train_iter = iter(self.loader)

    def evaluate(self, split: str = "val") -> dict:
        """Held-out LM loss over `eval_batches` global batches, overall and per domain (all ranks reduced)."""
        names = self.data.domain_names
        loader = BatchLoader(self.data.splits[split], micro_batch_size=self.micro_batch_size, rank=self.info.rank,
                             world_size=self.info.world_size, shuffle=False, loop=False)
        self.engine.eval()
        sums = heldout_sums(self.engine, islice(loader, self.cfg.train.eval_batches), num_domains=len(names))
        self.engine.train()
        summary = summarize(sums, names)
        result = {f"eval/{split}_lm_loss": summary.lm_loss or 0.0}
        for name, domain in summary.per_domain.items():
            if domain.tokens > 0:
                result[f"eval/{split}_lm_loss/{name}"] = domain.lm_loss
        return result

    def save(self) -> Path | None:
        """Checkpoint this step; skipped (None, with a warning) when its loss or weights are non-finite."""
        if self.guard is not None and not self.guard.may_save(self.engine.module):
            if self.info.is_main:
                print(f"ds_moe_div: warning: step {self.step} is not saved: its loss or weights are non-finite; "
                      f"the last complete checkpoint stays {self.guard.last_saved or 'none'}", flush=True)
            return None
        client = {"step": self.step, "loader": self.loader_state(), "composer": self.composer.state_dict()}
        tag_dir = checkpoint.save(self.engine, self.cfg.train.run_dir, step=self.step, client=client,
                                  run_config=to_dict(self.cfg), arch=self.arch, rank=self.info.rank,
                                  tokenizer=self.data.tokenizer_path, shape=self.shape)
        if self.guard is not None:
            self.guard.last_saved = tag_dir.name
        return tag_dir

    @property
    def shape(self) -> dict:
        """What a resume must share with the checkpoint (imported models: resharded, see reshard.py)."""
        return {"world_size": self.info.world_size, "ep_size": self.cfg.model.moe.ep_size}

    def close(self) -> None:
        """End of the run, however it ends: flush TensorBoard, release the run dir."""
        self.monitor.close()
        if self.lock is not None:
            self.lock.release()

    def loader_state(self) -> dict:
        return self.loader.state_dict()


def build(cfg: ExperimentConfig, ds: dict) -> TrainState:
    cfg = config_paths.absolute(cfg)  # config.json and checkpoints name the data wherever eval runs from
    info = init_distributed()
    set_cpu_threads(info)
    from deepspeed.accelerator import get_accelerator
    micro, gas = check_ds_config(ds, cfg, world_size=info.world_size,
                                 on_cpu=get_accelerator().device_name() == "cpu")
    check_ds_monitor(ds, tensorboard_dir=rundir.tensorboard_dir(cfg.train.run_dir))
    lock = lock_run_dir(cfg.train.run_dir, is_main=info.is_main)  # before any look at (or write to) the run dir
    try:
        return _build(cfg, ds, info, micro, gas, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(cfg: ExperimentConfig, ds: dict, info: RankInfo, micro: int, gas: int, lock) -> TrainState:
    checkpoint.check_run_dir(cfg.train.run_dir, resume=cfg.train.resuming)
    if cfg.model.pretrained:
        cfg = hf_session.with_pretrained_tokenizer(cfg)
        check_vocabulary(cfg.data.tokenizer.path, cfg.model.pretrained)  # before any data is prepared
    with main_rank_first(info):
        data = prepare_data(cfg.data, show_progress=info.is_main and cfg.train.show_progress)
    check_enough(data.splits["train"], micro * info.world_size)
    _check_objective_inputs(cfg, data)
    seed_everything(cfg.train.seed)
    if cfg.model.pretrained:  # a Hugging Face MoE through DeepSpeed's AutoEP (ds_moe_div/hf)
        model = hf_session.build_pretrained(cfg, tokenizer_vocab=data.vocab_size)
        vocab = model.config.vocab_size
        if cfg.model.lora is not None:  # converted and adapted here, before the optimizer exists (hf/lora.py)
            from ds_moe_div.hf import lora
            model = lora.prepare(model, cfg.model.lora, ep_size=cfg.model.moe.ep_size, seed=cfg.train.seed,
                                 ep_rank=info.ep_rank(cfg.model.moe.ep_size), verbose=info.is_main)
        else:
            ds = hf_session.with_autoep(ds, model, ep_size=cfg.model.moe.ep_size)
    elif cfg.model.backend == "autoep":  # from scratch, as a small HF family model on the same path
        vocab = _vocab_size(cfg, data)
        model = scratch.build_scratch(cfg.model, vocab_size=vocab, seq_len=cfg.data.seq_len, seed=cfg.train.seed)
        ds = hf_session.with_autoep(ds, model, ep_size=cfg.model.moe.ep_size)
    else:
        vocab = _vocab_size(cfg, data)
        model = MoELanguageModel(cfg.model, vocab_size=vocab, seq_len=cfg.data.seq_len, seed=cfg.train.seed,
                                 ep_rank=info.ep_rank(cfg.model.moe.ep_size))
    ds = engine_config(ds, micro, gas, info.world_size, steps=cfg.train.steps)  # what the engine runs
    resharding = reshard.plan(cfg, world_size=info.world_size)  # an imported model resumed on another shape
    if resharding is not None:
        ds = reshard.with_universal(ds, resharding)
    loss_free = cfg.objectives.balance.method == "loss_free"
    if loss_free and not cfg.model.uses_autoep:  # the bias buffers exist before DeepSpeed places the module
        enable_selection_bias([layer.gate for layer in model.moe_layers()])
    engine = _initialize(model, ds, info, cfg)
    if loss_free and cfg.model.uses_autoep:  # AutoEP's layers exist only now; the checkpoint loads later
        autoep.enable_expert_bias(model)
    layer = model.moe_layers()[0]
    composer = ObjectiveComposer(cfg.objectives, num_domains=len(data.domain_names),
                                 divergence_group=divergence_group(cfg.objectives.divergence.scope, layer),
                                 world_group=dist.group.WORLD)
    loader = BatchLoader(data.splits["train"], micro_batch_size=micro, rank=info.rank, world_size=info.world_size,
                         seed=cfg.train.seed, sampling=cfg.data.sampling)
    arch = checkpoint.architecture(to_dict(cfg.model), vocab, tokenizer=data.tokenizer_path)
    run_dir = Path(cfg.train.run_dir)
    state = TrainState(cfg=cfg, info=info, engine=engine, composer=composer, data=data, loader=loader,
                       monitor=Monitor(rundir.tensorboard_dir(run_dir), enabled=False), micro_batch_size=micro,
                       arch=arch, window=_log_window(cfg, model, data), lock=lock,
                       balancer=_balancer(cfg, model) if loss_free else None,
                       guard=RunGuard(max_nonfinite_steps=cfg.train.max_nonfinite_steps),
                       lm_mean=GlobalTokenMean(world_size=info.world_size, group=dist.group.WORLD)
                       if cfg.data.format == "instruction" else None)
    _restore(state, resharding)
    # Only now, with every check and the checkpoint load behind us, does the run write anything. After a
    # resume, TensorBoard drops the events a killed run wrote past the checkpoint: one curve.
    state.monitor = Monitor(rundir.tensorboard_dir(run_dir), enabled=info.is_main, ds_monitor=engine.monitor,
                            purge_step=state.step + 1 if cfg.train.resuming else None)
    if info.is_main:
        _write_run_files(state, ds)
    return state


def _log_window(cfg: ExperimentConfig, model: MoELanguageModel, data: PreparedData) -> LogWindow:
    if not cfg.train.routing_stats:
        return LogWindow()
    layer_ids = tuple(layer.layer_id for layer in model.moe_layers())
    acc = RoutingAccumulator(num_layers=len(layer_ids), num_domains=len(data.domain_names),
                             num_experts=getattr(model, "num_experts", cfg.model.moe.num_experts),
                             k=getattr(model, "k", cfg.model.moe.k), layer_ids=layer_ids,
                             window_steps=cfg.train.log_interval)
    return LogWindow(acc, data.domain_names, expert_overlap=cfg.train.expert_overlap)


def _balancer(cfg: ExperimentConfig, model) -> LossFreeBalancer:
    """Loss-Free Balancing's update over the model's selection biases: the native gates' `selection_bias`,
    or the AutoEP layers' `expert_bias` of an imported model (looked up after DeepSpeed placed the module)."""
    layers = model.moe_layers()
    biases = autoep.enable_expert_bias(model) if cfg.model.uses_autoep else \
        selection_biases([layer.gate for layer in layers])
    return LossFreeBalancer(biases, gamma=cfg.objectives.balance.gamma,
                            layer_ids=[layer.layer_id for layer in layers], group=dist.group.WORLD)


def _check_objective_inputs(cfg: ExperimentConfig, data: PreparedData) -> None:
    if cfg.objectives.divergence.coef != 0 and len(data.domain_names) < 2:
        raise ValueError(f"objectives.divergence.coef={cfg.objectives.divergence.coef} needs domain labels with at "
                         f"least 2 classes, but the data has {len(data.domain_names)} ({data.domain_names}); set "
                         f"data.domain_column to a label column or set the coef to 0")


def _vocab_size(cfg: ExperimentConfig, data: PreparedData) -> int:
    vocab = cfg.model.vocab_size or data.vocab_size
    if vocab < data.vocab_size:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's {data.vocab_size}: "
                         f"remove model.vocab_size (it defaults to the tokenizer's) or raise it")
    return vocab


def _initialize(model, ds_dict: dict, info: RankInfo, cfg: ExperimentConfig):
    import deepspeed
    trainable = [p for p in model.parameters() if p.requires_grad]  # all of them, except in a LoRA run
    from ds_moe_div.hf.autoep import engine_view
    with engine_view(model) if cfg.model.lora is not None else contextlib.nullcontext():
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_dict)
    if cfg.model.uses_autoep:
        model.attach_routing()  # AutoEP replaced the MoE blocks inside initialize
    ep_group = model.moe_layers()[0].expert_parallel_group()
    if dist.get_rank(group=ep_group) != info.ep_rank(cfg.model.moe.ep_size):
        raise RuntimeError("DeepSpeed's expert-parallel layout differs from the one expert initialisation assumed")
    return engine


def _restore(state: TrainState, resharding: reshard.Reshard | None = None) -> None:
    train = state.cfg.train
    if train.resuming:
        tag, note = rundir.resume_tag(train.run_dir, train.resume_from)
        if state.info.is_main:
            print(f"ds_moe_div: resuming from {tag}" + (f" ({note})" if note else ""), flush=True)
        if resharding is not None:
            client = reshard.load(state.engine, resharding, arch=state.arch, rank=state.info.rank,
                                  global_batch=state.loader.global_batch)
        else:
            client = checkpoint.load(state.engine, train.run_dir, arch=state.arch, rank=state.info.rank,
                                     module_only=False, tag=tag, shape=state.shape)
        state.guard.last_saved = tag
        state.step = client["step"]
        state.loader.load_state_dict(client["loader"])
        state.composer.load_state_dict(client["composer"])
        state.train_iter = iter(state.loader)
    elif train.init_from:
        checkpoint.load(state.engine, train.init_from, arch=state.arch, rank=state.info.rank, module_only=True)


def _write_run_files(state: TrainState, ds: dict) -> None:
    run_dir = Path(state.cfg.train.run_dir)
    dump_config(state.cfg, rundir.config_path(run_dir, state.step))
    fileio.write_json(rundir.ds_config_path(run_dir), ds)
    state.monitor.text("config", "```json\n" + json.dumps(to_dict(state.cfg), indent=2) + "\n```")
    if state.step == 0:  # one HParams-tab entry per run
        state.monitor.hparams(run_hparams(to_dict(state.cfg)), HPARAM_METRICS)
