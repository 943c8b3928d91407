"""Decoder-only MoE language model: RMSNorm, rotary causal attention (SDPA), SwiGLU experts in
DeepSpeed-MoE layers. No distributed code lives here: the MoE layers' process groups are DeepSpeed's.

    model = MoELanguageModel(cfg.model, vocab_size=4096, seq_len=256, seed=1234, ep_rank=0)
    out = model(input_ids_BS, labels_BS=labels, collect_expert_outputs=False)
    out.lm_loss, out.routing[0].probs_TE

Shape suffixes (docs/SHAPES.md): B sequences, S positions, T = B*S tokens, V vocabulary, M model dim,
H heads, A head dim, F rotary frequencies (A / 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ds_moe_div.config import ModelConfig
from ds_moe_div.data.loader import IGNORE_INDEX  # labels the loss skips (padding targets)
from ds_moe_div.moe import RoutedMoE, reinit_experts
from ds_moe_div.routing import RoutingRecord


@dataclass(frozen=True)
class ModelOutput:
    lm_loss: torch.Tensor  # mean next-token NLL over non-ignored targets
    token_nll_BS: torch.Tensor  # per-target NLL, 0 where the label is ignored
    routing: tuple[RoutingRecord, ...]  # one per MoE layer, in depth order


class SwiGLU(nn.Module):
    """The feed-forward of dense layers and of every expert (no 'expert' in parameter names: DeepSpeed
    picks expert parameters by that substring)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles_SF = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles_SF.cos(), angles_SF.sin()


def apply_rotary(x_BHSA, cos_SF, sin_SF):
    x1, x2 = x_BHSA.float().chunk(2, dim=-1)
    cos, sin = cos_SF[: x_BHSA.shape[2]], sin_SF[: x_BHSA.shape[2]]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x_BHSA.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSM, cos, sin):
        B, S, M = x_BSM.shape
        q, k, v = self.qkv(x_BSM).view(B, S, 3, self.n_heads, M // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y_BHSA = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y_BHSA.transpose(1, 2).reshape(B, S, M))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, is_moe: bool) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if is_moe:
            m = cfg.moe
            self.ffn = RoutedMoE(cfg.d_model, SwiGLU(cfg.d_model, cfg.d_ff), layer_id=layer_id,
                                 num_experts=m.num_experts, ep_size=m.ep_size, k=m.k,
                                 capacity_factor=m.capacity_factor, eval_capacity_factor=m.eval_capacity_factor,
                                 min_capacity=m.min_capacity, use_residual=m.use_residual,
                                 noisy_gate_policy=m.noisy_gate_policy, drop_tokens=m.drop_tokens,
                                 use_rts=m.use_rts, top2_2nd_expert_sampling=m.top2_2nd_expert_sampling)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x, cos, sin, collect_expert_outputs: bool):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, RoutedMoE):
            out, record = self.ffn(h, collect_expert_outputs=collect_expert_outputs)
            return x + out, record
        return x + self.ffn(h), None


class MoELanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, *, vocab_size: int, seq_len: int, seed: int, ep_rank: int = 0) -> None:
        """`seed` makes initialisation reproducible; `ep_rank` (this rank's index in its expert-parallel
        group) places each local expert at its global id so initial weights do not depend on ep_size."""
        super().__init__()
        self.cfg = cfg
        moe_ids = set(cfg.moe_layer_ids())
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i, i in moe_ids) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        cos, sin = rotary_tables(seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights(seed, ep_rank)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self, seed: int, ep_rank: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        out_std = self.cfg.init_std / (2 * self.cfg.n_layers) ** 0.5
        for name, param in self.named_parameters():
            if "deepspeed_experts" in name or param.dim() < 2:
                continue  # experts below; norms keep their ones
            std = out_std if name.endswith(("proj.weight", "w_down.weight")) else self.cfg.init_std
            with torch.no_grad():
                param.copy_(torch.empty(param.shape).normal_(0.0, std, generator=gen))
        for module in self.moe_layers():
            reinit_experts(module, seed=seed, ep_rank=ep_rank, std=self.cfg.init_std, out_std=out_std)

    def moe_layers(self) -> list[RoutedMoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, RoutedMoE)]

    def forward(self, input_ids_BS: torch.Tensor, *, labels_BS: torch.Tensor,
                collect_expert_outputs: bool = False) -> ModelOutput:
        x = self.embed(input_ids_BS)
        records = []
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # the recomputation's outputs (its routing record included) are discarded
                x, record = checkpoint(block, x, self.rope_cos, self.rope_sin, collect_expert_outputs,
                                       use_reentrant=False)
            else:
                x, record = block(x, self.rope_cos, self.rope_sin, collect_expert_outputs)
            if record is not None:
                records.append(record)
        logits_BSV = self.lm_head(self.norm(x)).float()
        nll = F.cross_entropy(logits_BSV.flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="none").view_as(labels_BS)
        num_targets = (labels_BS != IGNORE_INDEX).sum().clamp(min=1)
        return ModelOutput(lm_loss=nll.sum() / num_targets, token_nll_BS=nll, routing=tuple(records))
