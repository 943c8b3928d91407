"""Balancing baselines (baselines spec, section 1): DeepSeek's sequence-wise balance loss and the
Loss-Free Balancing bias update, as pure keyword-only functions.

    .venv/bin/python -m pytest tests/test_balancing.py -q

Shape suffixes (docs/SHAPES.md): B sequences, S positions, E routed experts, K top-k slots.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ds_moe_div.tensor_ops import at_least_fp32


def sequence_balance_loss(*, probs_BSE: Tensor, indices_BSK: Tensor, mask_BS: Tensor | None = None) -> Tensor:
    """DeepSeek-V2/V3 sequence-wise balance loss of one layer (`balance.scope: sequence`), unscaled:

        L = mean over sequences s with T_s > 0 of  sum_j f[s, j] * P[s, j]
        f[s, j] = E / (K * T_s) * sum_t 1[j in topk(t)]      (selections before capacity; no gradient)
        P[s, j] = (1 / T_s) * sum_t p[t, j]                  (dense router probabilities, normalised)

    over the T_s valid (mask True) tokens of sequence s. Balanced routing gives 1 (the scale of
    DeepSpeed's l_aux); all of a sequence on k experts gives E/k. 0 when no sequence has a valid token.
    """
    probs_BSE = at_least_fp32(probs_BSE)
    num_experts, k = probs_BSE.shape[-1], indices_BSK.shape[-1]
    weight_BS = (torch.ones(probs_BSE.shape[:2], device=probs_BSE.device) if mask_BS is None
                 else mask_BS).to(probs_BSE.dtype)
    counts_BE = probs_BSE.new_zeros(probs_BSE.shape[0], num_experts)
    counts_BE.scatter_add_(1, indices_BSK.flatten(1).long(), weight_BS[..., None].expand_as(indices_BSK).flatten(1))
    tokens_B = weight_BS.sum(1)
    safe_B = tokens_B.clamp(min=1.0)[:, None]
    f_BE = num_experts * counts_BE / (k * safe_B)
    p_BE = (probs_BSE * weight_BS[..., None]).sum(1) / safe_B
    per_seq_B = (f_BE * p_BE).sum(-1)
    present_B = tokens_B > 0
    return (per_seq_B * present_B).sum() / present_B.sum().clamp(min=1)


def loss_free_bias_update(*, bias_E: Tensor, counts_E: Tensor, gamma: float) -> Tensor:
    """Loss-Free Balancing (Wang et al. 2024, arXiv 2408.15664, Alg. 1; DeepSeek-V3), one optimizer step:

        b_j <- b_j + gamma * sign(mean_i c_i - c_j)

    c = tokens routed to each expert over the GLOBAL batch of the step (the caller sums its micro-steps
    and all-reduces once over the data- and expert-parallel ranks). Not mean-centred (as the paper and
    Megatron's `_update_router_expert_bias`; torchtitan centres the delta): an expert at exactly the mean
    load keeps its bias. Leading dims of bias/counts (e.g. layers) broadcast; returns a new tensor in
    bias_E's dtype (the sign is taken in float64, so large counts do not round to the mean).
    """
    counts = counts_E.to(torch.float64)
    delta = torch.sign(counts.mean(-1, keepdim=True) - counts)
    return bias_E + gamma * delta.to(bias_E.dtype)
