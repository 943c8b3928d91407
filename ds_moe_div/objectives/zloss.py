"""Router z-loss (methods spec, section 2).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ds_moe_div.tensor_ops import at_least_fp32, masked_mean_T


def router_z_loss(*, logits_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss  L_z = mean_t (logsumexp_j logits[t, j])^2  over valid tokens.

    logits_TE: one layer's router logits for the micro-batch. mask_T: True for valid tokens
    (None = all valid). No valid token gives 0.
    """
    z_T = torch.logsumexp(at_least_fp32(logits_TE), dim=-1).square()
    return masked_mean_T(z_T, mask_T)
