"""Variance loss L_v (methods spec, section 4; Guo et al. 2025).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ds_moe_div.tensor_ops import at_least_fp32, masked_mean_T, nonzero_or_one, num_valid


def topk_score_matrix(*, indices_TK: Tensor, weights_TK: Tensor, kept_TK: Tensor | None = None,
                      num_experts: int) -> Tensor:
    """Post-top-k score matrix S[t, e] = gate weight of expert e if token t selected it (and the slot
    survived the capacity limit), else 0. Micro-batch level, one layer."""
    weights_TK = at_least_fp32(weights_TK)
    if kept_TK is not None:
        weights_TK = torch.where(kept_TK, weights_TK, torch.zeros_like(weights_TK))
    scores_TE = weights_TK.new_zeros(weights_TK.shape[0], num_experts)
    return scores_TE.scatter_add(1, indices_TK.clamp(0, num_experts - 1), weights_TK)


def variance_loss(*, scores_TE: Tensor | None = None, probs_TE: Tensor | None = None,
                  mask_T: Tensor | None = None, form: Literal["tokens", "experts"] = "tokens",
                  reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """Variance loss L_v of one layer on the micro-batch (Guo et al. 2025, spec section 4); minimising
    it MAXIMISES routing variance. T = number of valid tokens (mask_T True).
      tokens (Eq. 7, needs scores_TE = `topk_score_matrix`):
          L = -(1/E) sum_j mean_t (S[t,j] - mean_t S[t,j])^2   (population variance over tokens);
          reduction="sum" multiplies by T (the paper's scale).
      experts (released code, needs probs_TE = dense softmax):
          L = -mean_t var_j p[t, j]  (unbiased variance across experts); "sum" sums over tokens.
    Tokens that all route alike give 0 for "tokens" and a negative value for "experts".
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if form == "tokens":
        if scores_TE is None:
            raise ValueError("variance form 'tokens' needs scores_TE")
        return _token_variance_loss(at_least_fp32(scores_TE), mask_T, reduction)
    if form != "experts":
        raise ValueError(f"form must be 'tokens' or 'experts', got {form!r}")
    if probs_TE is None:
        raise ValueError("variance form 'experts' needs probs_TE")
    neg_var_T = -at_least_fp32(probs_TE).var(dim=-1, correction=1)
    mean = masked_mean_T(neg_var_T, mask_T)
    return mean * num_valid(neg_var_T, mask_T) if reduction == "sum" else mean


def _token_variance_loss(scores_TE: Tensor, mask_T: Tensor | None, reduction: str) -> Tensor:
    if mask_T is None:
        mask_T = torch.ones(scores_TE.shape[0], dtype=torch.bool, device=scores_TE.device)
    num_tokens = num_valid(scores_TE, mask_T)
    valid_TE = mask_T[:, None].expand_as(scores_TE)
    scores_TE = torch.where(valid_TE, scores_TE, torch.zeros_like(scores_TE))
    mean_E = scores_TE.sum(0) / nonzero_or_one(num_tokens)
    dev_TE = torch.where(valid_TE, scores_TE - mean_E, torch.zeros_like(scores_TE))
    loss = -(dev_TE.square().sum(0) / nonzero_or_one(num_tokens)).mean()
    return loss * num_tokens if reduction == "sum" else loss
