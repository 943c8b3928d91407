"""Tensor primitives shared by the losses (`ds_moe_div.objectives`) and the measurements
(`ds_moe_div.metrics`): dtype promotion, safe denominators, masked means, KL, and the (sequence, domain)
units of a micro-batch. Shape legend: docs/SHAPES.md.
"""
from __future__ import annotations

import torch
from torch import Tensor


def at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def nonzero_or_one(x: Tensor) -> Tensor:
    """Safe denominator: divisions by an empty count give 0 instead of NaN."""
    return torch.where(x > 0, x, torch.ones_like(x))


def masked_mean_T(values_T: Tensor, mask_T: Tensor | None) -> Tensor:
    if mask_T is None:
        return values_T.sum() / max(values_T.shape[0], 1)
    total = torch.where(mask_T, values_T, torch.zeros_like(values_T)).sum()
    return total / nonzero_or_one(mask_T.sum().to(values_T.dtype))


def num_valid(values_T: Tensor, mask_T: Tensor | None) -> Tensor:
    count = values_T.shape[0] if mask_T is None else mask_T.sum()
    return torch.as_tensor(count, dtype=values_T.dtype, device=values_T.device)


def kl(p_E: Tensor, m_E: Tensor, floor: float | None = None) -> Tensor:
    """KL(p || m) in nats over the last dim, 0 log 0 = 0; `floor` keeps log finite at exact zeros.

    Written as sum p (log p - log m) rather than as a difference of entropies: for the nearly equal
    distributions of an untrained router the entropy difference loses most of its digits.
    """
    floor = torch.finfo(p_E.dtype).tiny if floor is None else floor
    return (p_E * (p_E.clamp_min(floor).log() - m_E.clamp_min(floor).log())).sum(-1)


def unit_index_T(domain_ids_BS: Tensor, num_domains: int) -> tuple[Tensor, Tensor]:
    """Per token: index b * num_domains + d of its (sequence, domain) unit, and whether it is labelled."""
    num_seqs, seq_len = domain_ids_BS.shape
    domain_T = domain_ids_BS.reshape(-1)
    seq_T = torch.arange(num_seqs, device=domain_T.device).repeat_interleave(seq_len)
    return seq_T * num_domains + domain_T.clamp(min=0), domain_T >= 0


def sum_units(probs_LTE: Tensor, unit_T: Tensor, valid_T: Tensor, num_units: int) -> tuple[Tensor, Tensor]:
    """Sum of probs and token count per unit; unlabelled tokens are zeroed (no boolean indexing, no sync)."""
    num_layers, _, num_experts = probs_LTE.shape
    src_LTE = torch.where(valid_T[None, :, None], probs_LTE, torch.zeros_like(probs_LTE))
    sums_LUE = probs_LTE.new_zeros(num_layers, num_units, num_experts).index_add(1, unit_T, src_LTE)
    counts_U = probs_LTE.new_zeros(num_units).index_add(0, unit_T, valid_T.to(probs_LTE.dtype))
    return sums_LUE, counts_U
