"""What the trainer does differently when `model.pretrained` names a Hugging Face MoE directory.

    cfg = with_pretrained_tokenizer(cfg)          # data uses the checkpoint's tokenizer.json
    model = build_pretrained(cfg)                 # checked against the config, then loaded (fp32)
    ds = with_autoep(ds, model, ep_size=cfg.model.moe.ep_size)   # DeepSpeed replaces the MoE blocks
    engine = deepspeed.initialize(model=model, config=ds, ...)   # then: model.attach_routing()

The checkpoint decides the architecture: a from-scratch model key that is set (differs from its default)
and contradicts the checkpoint is refused, naming both values; the capacity keys of DeepSpeed's native
MoE are refused because AutoEP is dropless.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ds_moe_div.config import ExperimentConfig, ModelConfig, MoEConfig
from ds_moe_div.hf.load import read_config
from ds_moe_div.hf.model import PretrainedMoELM

# (model config key, what the checkpoint says): compared when the key was set explicitly.
_ARCH = (
    ("d_model", lambda c, f: c.hidden_size),
    ("n_layers", lambda c, f: c.num_hidden_layers),
    ("n_heads", lambda c, f: c.num_attention_heads),
    ("vocab_size", lambda c, f: c.vocab_size),
    ("tie_embeddings", lambda c, f: bool(getattr(c, "tie_word_embeddings", False))),
    ("moe.num_experts", lambda c, f: f.num_experts(c)),
    ("moe.k", lambda c, f: f.top_k(c)),
)
# Keys of DeepSpeed's native (capacity-based) MoE layer that have no meaning for AutoEP's dropless layer.
_NATIVE_ONLY = ("capacity_factor", "eval_capacity_factor", "min_capacity", "noisy_gate_policy", "use_residual",
                "layer_pattern", "first_dense_layers", "use_rts", "top2_2nd_expert_sampling")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_model_config(model_cfg: ModelConfig, hf_config, family) -> None:
    """Refuse from-scratch keys that contradict the checkpoint (see the module docstring)."""
    default, default_moe = ModelConfig(), MoEConfig()
    problems = []
    for key, theirs in _ARCH:
        ours = _get(model_cfg, key)
        if ours != _get(default, key) and ours is not None and ours != theirs(hf_config, family):
            problems.append(f"model.{key}={ours!r} but the checkpoint has {theirs(hf_config, family)!r}")
    for key in _NATIVE_ONLY:
        if getattr(model_cfg.moe, key) != getattr(default_moe, key):
            problems.append(f"model.moe.{key} is set but imported models run DeepSpeed's dropless AutoEP layer")
    if problems:
        raise ValueError(f"model.pretrained={model_cfg.pretrained} decides the architecture: " + "; ".join(problems)
                         + ". Remove these keys from the experiment config (or its overrides).")


def with_pretrained_tokenizer(cfg: ExperimentConfig) -> ExperimentConfig:
    """With model.pretrained and no data.tokenizer.path: the checkpoint's own tokenizer.json."""
    if cfg.model.pretrained is None or cfg.data.tokenizer.path is not None:
        return cfg
    path = Path(cfg.model.pretrained) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing: model.pretrained needs the checkpoint's tokenizer.json (or set "
                         f"data.tokenizer.path to a tokenizer with the same vocabulary)")
    tokenizer = dataclasses.replace(cfg.data.tokenizer, path=str(path))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tokenizer))


def build_pretrained(cfg: ExperimentConfig, *, tokenizer_vocab: int | None = None) -> PretrainedMoELM:
    hf_config, family = read_config(cfg.model.pretrained)
    check_model_config(cfg.model, hf_config, family)
    if tokenizer_vocab is not None and tokenizer_vocab > hf_config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens but {cfg.model.pretrained} embeds only "
                         f"{hf_config.vocab_size}: use the checkpoint's tokenizer (leave data.tokenizer.path unset)")
    model = PretrainedMoELM.from_pretrained(cfg.model.pretrained, ep_size=cfg.model.moe.ep_size)
    if cfg.model.activation_checkpointing:
        model.enable_activation_checkpointing()
    model.train()
    return model


def with_autoep(ds: dict, model: PretrainedMoELM, *, ep_size: int) -> dict:
    """`ds` with the family's `expert_parallel` block (a block already there is refused unless identical)."""
    block = model.autoep_block(ep_size=ep_size)
    if "expert_parallel" in ds and ds["expert_parallel"] != block:
        raise ValueError(f"the DeepSpeed config has its own expert_parallel block {ds['expert_parallel']}; remove it: "
                         f"ds_moe_div sets it from the checkpoint's family and model.moe.ep_size ({block})")
    return {**ds, "expert_parallel": block}
