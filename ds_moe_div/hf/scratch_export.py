"""A from-scratch ds_moe_div model (`ds_moe_div.model.MoELanguageModel`) as a transformers Mixtral.

    hf_config = mixtral_config(cfg.model, vocab_size=4096, seq_len=256)
    hf_state = mixtral_state_dict(model.state_dict(), cfg.model)        # or read_native_checkpoint(tag_dir)

The architecture is Mixtral's: RMSNorm, rotary attention without bias (our fused `qkv` is split into
q/k/v), SwiGLU experts, a softmax top-k router whose top-k weights are renormalised. Refused: what
Mixtral cannot express (dense layers, `every_other`, residual MoE, top-1 routing, whose weight
DeepSpeed does not renormalise) and, for equal outputs, token dropping must not happen: transformers
is dropless, DeepSpeed's capacity is not (use a large eval_capacity_factor to compare).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

_EXPERT = re.compile(r"^blocks\.(\d+)\.ffn\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(w_gate|w_up|w_down)\.weight$")


def check_exportable(model_cfg) -> None:
    moe = model_cfg.moe
    problems = [what for what, bad in (
        ("moe.first_dense_layers > 0 (Mixtral has no dense layers)", moe.first_dense_layers > 0),
        ("moe.layer_pattern='every_other'", moe.layer_pattern != "all"),
        ("moe.use_residual=true", moe.use_residual),
        ("moe.k=1 (DeepSpeed's top-1 weight is not renormalised, Mixtral's is)", moe.k == 1),
        ("moe.noisy_gate_policy", moe.noisy_gate_policy is not None)) if bad]
    if problems:
        raise ValueError("this from-scratch model has no Hugging Face counterpart: " + "; ".join(problems))


def mixtral_config(model_cfg, *, vocab_size: int, seq_len: int, eos_token_id: int | None = None,
                   pad_token_id: int | None = None):
    from transformers import MixtralConfig
    check_exportable(model_cfg)
    return MixtralConfig(vocab_size=vocab_size, hidden_size=model_cfg.d_model, intermediate_size=model_cfg.d_ff,
                         num_hidden_layers=model_cfg.n_layers, num_attention_heads=model_cfg.n_heads,
                         num_key_value_heads=model_cfg.n_heads, head_dim=model_cfg.d_model // model_cfg.n_heads,
                         max_position_embeddings=seq_len, rms_norm_eps=model_cfg.norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": model_cfg.rope_theta},
                         num_local_experts=model_cfg.moe.num_experts, num_experts_per_tok=model_cfg.moe.k,
                         tie_word_embeddings=model_cfg.tie_embeddings, sliding_window=None,
                         bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def mixtral_state_dict(state: dict[str, torch.Tensor], model_cfg) -> dict[str, torch.Tensor]:
    """Our full state dict (global expert ids) in MixtralForCausalLM's in-memory names."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    m = model_cfg.d_model
    for key, value in state.items():
        if key.startswith("rope_"):
            continue
        match = _EXPERT.match(key)
        if match:
            experts.setdefault((int(match[1]), match[3]), {})[int(match[2])] = value
            continue
        if key == "embed.weight":
            out["model.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["model.norm.weight"] = value
        elif key.startswith("blocks."):
            i, rest = key.split(".", 2)[1:]
            prefix = f"model.layers.{i}."
            if rest == "attn.qkv.weight":
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split(m, dim=0)):
                    out[f"{prefix}self_attn.{name}.weight"] = part
            else:
                names = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                         "attn.proj.weight": "self_attn.o_proj.weight", "ffn.deepspeed_moe.gate.wg.weight": "mlp.gate.weight"}
                if rest not in names:
                    raise ValueError(f"no Mixtral counterpart for {key}")
                out[prefix + names[rest]] = value
        else:
            out[key] = value
    for (i, proj), by_id in experts.items():
        stacked = torch.stack([by_id[e] for e in range(model_cfg.moe.num_experts)])
        experts[(i, proj)] = stacked
    for i in {i for i, _ in experts}:
        prefix = f"model.layers.{i}.mlp.experts."
        out[prefix + "gate_up_proj"] = torch.cat([experts[(i, "w_gate")], experts[(i, "w_up")]], dim=1)
        out[prefix + "down_proj"] = experts[(i, "w_down")]
    if model_cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def read_native_checkpoint(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Non-expert weights (mp_rank_00) + every expert file (global expert ids in their keys)."""
    state = dict(torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"])
    for file in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        state.update(torch.load(file, map_location="cpu", weights_only=False))
    return state
