"""The experiment config: one tree of frozen dataclasses, loaded strictly from JSON or YAML.

    cfg = load_experiment("ds_configs/experiments/tiny.json", overrides=["objectives.divergence.coef=0.01"])

Vocabulary follows DeepSpeed: `num_experts`, `ep_size`, `k`, `l_aux`; loss weights are `*.coef`.
Every objective is computed per MoE layer and combined over layers with `objectives.layer_reduction`
(`mean`, the default, or `sum`) before its coefficient is applied. The DeepSpeed JSON is a separate,
plain DeepSpeed file (see `ds_moe_div.ds_config`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ds_moe_div.config_loader import load_config
from ds_moe_div.data.config import DataConfig


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8
    k: int = 2
    ep_size: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True
    noisy_gate_policy: Literal["Jitter", "RSample"] | None = None
    # DeepSpeed samples the second expert with Gumbel noise by default; off here for determinism.
    top2_2nd_expert_sampling: bool = False
    use_rts: bool = True
    use_residual: bool = False
    layer_pattern: Literal["all", "every_other"] = "all"
    first_dense_layers: int = 0

    def __post_init__(self):
        _require(self.num_experts >= 2, "num_experts must be >= 2")
        _require(1 <= self.k <= self.num_experts, f"k={self.k} must be in [1, num_experts={self.num_experts}]")
        _require(self.ep_size >= 1 and self.num_experts % self.ep_size == 0,
                 f"num_experts={self.num_experts} is not divisible by ep_size={self.ep_size}: choose an ep_size "
                 "that divides num_experts")


# Keys of DeepSpeed's native capacity-based gate that AutoEP's dropless layer does not have.
# (drop_tokens=false is what AutoEP does anyway, so only the capacity keys proper are listed.)
NATIVE_ONLY_MOE_KEYS = ("capacity_factor", "eval_capacity_factor", "min_capacity", "noisy_gate_policy",
                        "top2_2nd_expert_sampling", "use_rts", "use_residual")


def _set_native_keys(moe: MoEConfig) -> list[str]:
    default = MoEConfig()
    return [k for k in NATIVE_ONLY_MOE_KEYS if getattr(moe, k) != getattr(default, k)]


@dataclass(frozen=True)
class LoraConfig:
    """LoRA post-training of a `model.pretrained` checkpoint (ds_moe_div/hf/lora.py): adapters of rank `r`
    scaled by alpha / r on `targets`: "attention" (every projection of `self_attn`), "experts" (the routed
    experts' 3-D weights), or attention projection names ("q_proj", "kv_b_proj", ...). The router stays
    "frozen", trains in "full", or gets its own "lora"; everything else is frozen."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention", "experts")
    router: Literal["frozen", "full", "lora"] = "frozen"

    def __post_init__(self):
        _require(self.r >= 1, f"model.lora.r={self.r} must be >= 1")
        _require(self.alpha > 0, f"model.lora.alpha={self.alpha} must be > 0")
        _require(0 <= self.dropout < 1, f"model.lora.dropout={self.dropout} must be in [0, 1)")
        _require(len(self.targets) > 0, 'model.lora.targets is empty: use ["attention", "experts"] or a subset')
        _require(not (self.dropout and "experts" in self.targets),
                 f"model.lora.dropout={self.dropout} with experts in model.lora.targets: peft's LoRA on 3-D expert "
                 "weights has no dropout; set model.lora.dropout=0 or drop \"experts\" from the targets")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int | None = None  # None: the tokenizer's vocabulary size
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = True
    # Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant): less memory,
    # one more forward per block. Routing records and losses come from the first forward only.
    activation_checkpointing: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)
    # A local Hugging Face MoE directory (config.json + safetensors + tokenizer) to post-train instead of a
    # from-scratch model; it decides the architecture (see ds_moe_div/hf/session.py). moe.ep_size applies.
    pretrained: str | None = None
    # From-scratch models only. "native": DeepSpeed's capacity-based MoE layer (ds_moe_div/model.py);
    # "autoep": this config as a small Hugging Face `family` model (transformers' from_config) on DeepSpeed's
    # dropless AutoEP layer, the path of imported models (ds_moe_div/hf/scratch.py).
    backend: Literal["native", "autoep"] = "autoep"
    family: Literal["qwen3_moe", "deepseek_v3"] = "qwen3_moe"
    lora: LoraConfig | None = None  # LoRA instead of full fine-tuning (needs pretrained)

    def __post_init__(self):
        _require(self.pretrained is None or self.family == "qwen3_moe", f"model.family={self.family!r} with "
                 f"model.pretrained: the checkpoint's config.json decides the family; remove model.family")
        _require(self.lora is None or self.pretrained is not None,
                 "model.lora needs model.pretrained (a Hugging Face MoE directory to adapt); remove model.lora "
                 "to train a from-scratch model in full")
        if self.backend == "autoep" and self.pretrained is None:
            keys = _set_native_keys(self.moe)
            _require(not keys, f"model.backend='autoep' runs DeepSpeed's dropless AutoEP layer, which has no "
                     f"{', '.join('model.moe.' + k for k in keys)}: remove them (or use model.backend='native')")
        _require(self.d_model % self.n_heads == 0, f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        _require((self.d_model // self.n_heads) % 2 == 0, "head dim (d_model / n_heads) must be even for rotary")
        _require(self.moe.first_dense_layers < self.n_layers, "moe.first_dense_layers leaves no MoE layer")

    @property
    def uses_autoep(self) -> bool:
        """The model runs through DeepSpeed's AutoEP layer: imported (`pretrained`) or backend "autoep"."""
        return self.pretrained is not None or self.backend == "autoep"

    def moe_layer_ids(self) -> tuple[int, ...]:
        step = 2 if self.moe.layer_pattern == "every_other" else 1
        return tuple(range(self.moe.first_dense_layers, self.n_layers, step))


@dataclass(frozen=True)
class BalanceConfig:
    """Load balancing (baselines spec, section 1). `method`: "aux" = the GShard/Switch loss L_aux at `coef`;
    "loss_free" = Loss-Free Balancing (Wang et al. 2024): a per-expert bias on the router scores for top-k
    selection only, updated after every optimizer step by `gamma * sign(mean load - load)`, plus the loss
    at `coef` when nonzero (DeepSeek-V3: scope "sequence", coef 1e-4); "none" = neither (coef must be 0).
    `scope` of the loss: `micro_batch` = DeepSpeed's own l_aux, per rank and micro-batch; `global_batch` =
    expert frequencies of the whole data-parallel batch (Qiu et al. 2025); `sequence` = DeepSeek's
    sequence-wise balance loss, averaged over sequences. ST-MoE = method "aux" with z_loss.coef > 0."""
    coef: float = 0.01
    scope: Literal["micro_batch", "global_batch", "sequence"] = "micro_batch"
    warmup_steps: int = 0
    method: Literal["aux", "loss_free", "none"] = "aux"
    gamma: float = 1e-3

    def __post_init__(self):
        _require(self.gamma > 0, f"objectives.balance.gamma={self.gamma} must be > 0 (Loss-Free bias update rate)")
        _require(self.method != "none" or self.coef == 0, f"objectives.balance.method='none' with "
                 f"objectives.balance.coef={self.coef}: set objectives.balance.coef=0 (no balancing) or use "
                 "method 'aux'")


@dataclass(frozen=True)
class ZLossConfig:
    """ST-MoE router z-loss: mean_t logsumexp(logits)^2."""
    coef: float = 0.0
    warmup_steps: int = 0


@dataclass(frozen=True)
class DivergenceConfig:
    """Expert Divergence Learning (Li et al.): JSD between per-domain routing distributions."""
    coef: float = 0.0
    form: Literal["pairwise_neglog", "generalized"] = "pairwise_neglog"
    average: Literal["sequence", "token"] = "sequence"
    # Domain means over the global batch (data-parallel group), the expert-parallel group only, or
    # this rank's micro-batch only.
    scope: Literal["global", "expert_parallel", "micro_batch"] = "global"
    eps: float = 1e-6
    warmup_steps: int = 0
    # Domain weights w_d of the `generalized` form: token share (the spec's definition, the default) or,
    # with average="sequence", the share of (sequence, domain) units. With average="token" both agree.
    domain_weights: Literal["tokens", "sequences"] = "tokens"


@dataclass(frozen=True)
class OrthogonalityConfig:
    """Guo et al. Eq. 5: orthogonality of the outputs of the experts a token selects."""
    coef: float | Literal["auto"] = 0.0
    # pairwise: Eq. 5 (default); span: the released code's projection form; cosine: pairwise on
    # unit-normalised outputs (sum of cos^2, scale-free: a control for a norm-penalty reading).
    form: Literal["pairwise", "span", "cosine"] = "pairwise"
    reduction: Literal["mean", "sum"] = "mean"
    eps: float = 1e-6
    auto_target: float = 1e-4
    warmup_steps: int = 0


@dataclass(frozen=True)
class VarianceConfig:
    """Guo et al. Eq. 7: maximise the variance of routing scores (the loss is the negative variance)."""
    coef: float | Literal["auto"] = 0.0
    form: Literal["tokens", "experts"] = "tokens"
    reduction: Literal["mean", "sum"] = "mean"
    auto_target: float = 1e-3
    warmup_steps: int = 0


@dataclass(frozen=True)
class ObjectivesConfig:
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    z_loss: ZLossConfig = field(default_factory=ZLossConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    orthogonality: OrthogonalityConfig = field(default_factory=OrthogonalityConfig)
    variance: VarianceConfig = field(default_factory=VarianceConfig)
    layer_reduction: Literal["mean", "sum"] = "mean"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    # None: take DeepSpeed's train_micro_batch_size_per_gpu / gradient_accumulation_steps; when both
    # are given they must agree.
    micro_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    seed: int = 1234
    run_dir: str = "runs/default"
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    save_interval: int = 100
    # Domain x expert routing statistics reduced over each logging window (routing/... tags), and
    # heatmaps + load histograms every heatmap_interval steps.
    routing_stats: bool = True
    heatmap_interval: int = 100
    # Expert Overlap and the experts' mean output norm in the routing window: the model hands out its
    # selected experts' outputs every micro-step (always so when the orthogonality loss is on). Off by
    # default: it changes the combine path.
    expert_overlap: bool = False
    resume: bool = False  # continue from the latest checkpoint in run_dir
    # Resume from this tag of run_dir's checkpoints (implies resume); None: the newest complete one.
    resume_from: str | None = None
    # Stop (exit code 3) after this many consecutive optimizer steps with a non-finite loss (or skipped by
    # DeepSpeed for non-finite gradients); such steps are never saved.
    max_nonfinite_steps: int = 5
    init_from: str | None = None  # start a new run from these checkpoint weights
    show_progress: bool = True

    def __post_init__(self):
        for name in ("steps", "log_interval", "eval_interval", "save_interval", "heatmap_interval"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1")
        _require(not (self.resume and self.init_from), "train.resume and train.init_from exclude each other: resume "
                 "continues this run, init_from starts a new one from another run's weights")
        _require(not (self.resume_from and self.init_from), "train.resume_from and train.init_from exclude each "
                 "other: resume_from continues this run from one of its tags, init_from starts a new run")
        _require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps must be >= 1")

    @property
    def resuming(self) -> bool:
        """This run continues run_dir's checkpoints (`resume` or `resume_from`)."""
        return self.resume or self.resume_from is not None


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_experiment(path=None, overrides=()) -> ExperimentConfig:
    """Load and validate an experiment config (JSON/YAML) with `a.b=v` overrides."""
    return load_config(ExperimentConfig, path, overrides)
