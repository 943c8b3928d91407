"""A from-scratch model on the Hugging Face path (`model.backend: "autoep"`): the project's ModelConfig as a
small configuration of one supported family, randomly initialised with transformers' `from_config`, then
run through exactly the code of imported models (PretrainedMoELM, DeepSpeed's AutoEP layer, export).

    hf_config = scratch_config(cfg.model, vocab_size=4096, seq_len=128)   # a transformers Qwen3MoeConfig
    model = build_scratch(cfg.model, vocab_size=4096, seq_len=128, seed=1234)
    ds = with_autoep(ds, model, ep_size=cfg.model.moe.ep_size)            # then deepspeed.initialize

Every rank builds the full model from the same seed, so the initial weights do not depend on ep_size
(AutoEP keeps each rank's slice of the experts). The mapping is one function of the config, so a
checkpoint's run_config.json rebuilds the same transformers config for `eval` and `export`.

Families: qwen3_moe (the default, softmax router as DeepSpeed's native gate) and deepseek_v3 (sigmoid router
whose `e_score_correction_bias` carries a Loss-Free Balancing bias into the exported model; see
`_deepseek_v3_config`). Mapping (qwen3_moe): d_model -> hidden_size, n_layers -> num_hidden_layers, n_heads -> attention and
key/value heads (head_dim d_model / n_heads, as the native attention), d_ff -> moe_intermediate_size and
the dense layers' intermediate_size, moe.num_experts -> num_experts, moe.k -> num_experts_per_tok,
rope_theta, norm_eps -> rms_norm_eps, init_std -> initializer_range, tie_embeddings, seq_len ->
max_position_embeddings; the layers outside `ModelConfig.moe_layer_ids()` (first_dense_layers,
layer_pattern "every_other") become `mlp_only_layers`. `norm_topk_prob` is True for k > 1: DeepSpeed's
top-2 gate renormalises the selected probabilities, its top-1 gate does not (and a renormalised top-1
weight is always 1, which leaves the router without an LM gradient).
"""
from __future__ import annotations

import torch

from ds_moe_div.config import ModelConfig
from ds_moe_div.hf.families import FAMILIES

SCRATCH_FAMILIES = ("qwen3_moe", "deepseek_v3")


def scratch_config(model_cfg: ModelConfig, *, vocab_size: int, seq_len: int, pad_id: int | None = None,
                   eos_id: int | None = None):
    """The transformers config of `model_cfg.family` that the from-scratch ModelConfig describes."""
    import transformers as T

    if model_cfg.family not in SCRATCH_FAMILIES:
        raise ValueError(f"model.family={model_cfg.family!r}: from-scratch AutoEP models are built as "
                         f"{', '.join(SCRATCH_FAMILIES)}; set model.family to one of them")
    if model_cfg.family == "deepseek_v3":
        return _deepseek_v3_config(model_cfg, vocab_size=vocab_size, seq_len=seq_len, pad_id=pad_id, eos_id=eos_id)
    moe_ids = set(model_cfg.moe_layer_ids())
    return T.Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=model_cfg.d_model, intermediate_size=model_cfg.d_ff,
        num_hidden_layers=model_cfg.n_layers, num_attention_heads=model_cfg.n_heads,
        num_key_value_heads=model_cfg.n_heads, head_dim=model_cfg.d_model // model_cfg.n_heads,
        max_position_embeddings=seq_len, initializer_range=model_cfg.init_std, rms_norm_eps=model_cfg.norm_eps,
        tie_word_embeddings=model_cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": model_cfg.rope_theta},
        moe_intermediate_size=model_cfg.d_ff, num_experts=model_cfg.moe.num_experts,
        num_experts_per_tok=model_cfg.moe.k, norm_topk_prob=model_cfg.moe.k > 1, decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(model_cfg.n_layers) if i not in moe_ids], output_router_logits=False,
        pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None)


def _deepseek_v3_config(model_cfg: ModelConfig, *, vocab_size: int, seq_len: int, pad_id, eos_id):
    """DeepSeek-V3 shape: sigmoid router with a selection-only `e_score_correction_bias` (where Loss-Free
    Balancing's bias is exported), MLA attention (no query compression, key/value rank d_model / 2, per-head
    rotary and non-rotary halves of d_model / n_heads), one group, no shared expert (a zero-width one, which
    adds nothing), scaling factor 1, the first `moe.first_dense_layers` layers dense."""
    import transformers as T

    head_dim = model_cfg.d_model // model_cfg.n_heads
    if model_cfg.moe.layer_pattern != "all" or head_dim % 4:
        raise ValueError(f"model.family='deepseek_v3' needs model.moe.layer_pattern='all' (dense layers come first, "
                         f"model.moe.first_dense_layers) and d_model / n_heads divisible by 4 (got "
                         f"{model_cfg.moe.layer_pattern!r}, {head_dim}); use model.family='qwen3_moe' otherwise")
    return T.DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=model_cfg.d_model, intermediate_size=model_cfg.d_ff,
        moe_intermediate_size=model_cfg.d_ff, num_hidden_layers=model_cfg.n_layers,
        num_attention_heads=model_cfg.n_heads, num_key_value_heads=model_cfg.n_heads,
        n_shared_experts=0, n_routed_experts=model_cfg.moe.num_experts, num_experts_per_tok=model_cfg.moe.k,
        routed_scaling_factor=1.0, n_group=1, topk_group=1, norm_topk_prob=model_cfg.moe.k > 1,
        first_k_dense_replace=model_cfg.moe.first_dense_layers, q_lora_rank=None,
        kv_lora_rank=model_cfg.d_model // 2, qk_rope_head_dim=head_dim // 2, qk_nope_head_dim=head_dim // 2,
        v_head_dim=head_dim, max_position_embeddings=seq_len, initializer_range=model_cfg.init_std,
        rms_norm_eps=model_cfg.norm_eps, tie_word_embeddings=model_cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": model_cfg.rope_theta},
        pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None)


def build_scratch(model_cfg: ModelConfig, *, vocab_size: int, seq_len: int, seed: int):
    """A randomly initialised PretrainedMoELM (fp32, eager attention) of the config; train mode."""
    from transformers import AutoModelForCausalLM

    from ds_moe_div.hf.model import PretrainedMoELM

    hf_config = scratch_config(model_cfg, vocab_size=vocab_size, seq_len=seq_len)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # the caller's RNG stream is not consumed
        torch.manual_seed(seed)
        hf_model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
    model = PretrainedMoELM(hf_model, family=FAMILIES[hf_config.model_type])
    if model_cfg.activation_checkpointing:
        model.enable_activation_checkpointing()
    model.train()
    return model
