"""Tiny random Hugging Face MoE checkpoints, one per family, built from config classes (no hub).

    path = make_tiny(family="deepseek_v3", out_dir="models/tiny_dsv3", seed=0)

The router is made non-trivial so that parity tests can fail: router weights are drawn much larger than
the default init (confident, well-separated top-k), DeepSeek families use group-limited routing, and
DeepSeek-V3's `e_score_correction_bias` is random. Each directory holds config.json, sharded
safetensors with an index (hub per-expert layout), generation_config.json and a byte-level BPE
tokenizer with the project's special tokens (<|pad|>, <|eos|>), so `data.tokenizer.path` can point at
its tokenizer.json.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ds_moe_div.hf.families import FAMILIES

TINY_TEXT = ("The router picks experts. Experts specialise on domains: code, math, prose. "
             "def add(a, b): return a + b. The integral of x is x squared over two. ") * 20


def tiny_config(family: str, *, vocab_size: int, seed: int = 0):
    """A transformers config of `family` with 2-3 layers, hidden 32, 8 routed experts, top-2."""
    import transformers as T

    common = {"vocab_size": vocab_size, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4,
                  "max_position_embeddings": 128, "tie_word_embeddings": False, "bos_token_id": None,
                  "eos_token_id": 1, "pad_token_id": 0}
    deepseek = {"num_hidden_layers": 3, "intermediate_size": 48, "moe_intermediate_size": 24, "n_routed_experts": 8,
                    "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16,
                    "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8, "n_group": 4, "topk_group": 2}
    builders = {
        "mixtral": lambda: T.MixtralConfig(**common, num_hidden_layers=2, intermediate_size=24, num_local_experts=8,
                                           num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**common, num_hidden_layers=2, intermediate_size=48,
                                              moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                              num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
        "olmoe": lambda: T.OlmoeConfig(**common, num_hidden_layers=2, intermediate_size=24, num_experts=8,
                                       num_experts_per_tok=2),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**common, num_hidden_layers=2, intermediate_size=48,
                                              moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                              head_dim=8, norm_topk_prob=True),
        "deepseek_v2": lambda: T.DeepseekV2Config(**common, **deepseek, q_lora_rank=None,
                                                  topk_method="group_limited_greedy", routed_scaling_factor=1.5),
        "deepseek_v3": lambda: T.DeepseekV3Config(**common, **deepseek, q_lora_rank=12, routed_scaling_factor=2.5,
                                                  norm_topk_prob=True),
    }
    if family not in builders:
        raise ValueError(f"no tiny config for {family!r}; families: {', '.join(FAMILIES)}")
    return builders[family]()


def tiny_model(family: str, *, vocab_size: int, seed: int = 0, overrides: dict | None = None):
    """A randomly initialised transformers model of `family` with a non-trivial router (fp32, eager experts).
    `overrides`: config attributes to change, e.g. {"num_experts": 32} (names through the config's attribute_map)."""
    import transformers as T

    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size=vocab_size, seed=seed)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.copy_(torch.randn(param.shape, generator=gen))  # ~50x the default std
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand(buf.shape, generator=gen) - 0.5)
    return model.eval()


def tiny_tokenizer():
    """A byte-level BPE trained on a few lines, with the project's <|pad|> (0) and <|eos|> (1)."""
    from transformers import PreTrainedTokenizerFast

    from ds_moe_div.data.config import TokenizerConfig
    from ds_moe_div.data.tokenize import EOS, PAD, train_tokenizer

    tok = train_tokenizer([TINY_TEXT], TokenizerConfig(vocab_size=320, min_frequency=1), show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def make_tiny(*, family: str, out_dir: str | Path, seed: int = 0, max_shard_size: str = "64KB",
              overrides: dict | None = None) -> Path:
    """Write a tiny random checkpoint of `family` to `out_dir` (sharded safetensors + index + tokenizer);
    `overrides` as in `tiny_model` (a larger random model of the same shape family)."""
    out = Path(out_dir)
    tokenizer = tiny_tokenizer()
    model = tiny_model(family, vocab_size=len(tokenizer), seed=seed, overrides=overrides)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, max_shard_size=max_shard_size, save_original_format=True)
    tokenizer.save_pretrained(out)
    return out
