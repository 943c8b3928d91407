"""Mean L2 norm of the selected experts' outputs (issue 16, item 6): the pairwise orthogonality loss
grows with the squared norms of the outputs (|y_j|^2 cos^2 per pair), so lowering it can mean smaller
outputs rather than more orthogonal ones; this norm shows which.

    .venv/bin/python -m pytest tests/test_metrics_output_norm.py -q

Shape suffixes (docs/SHAPES.md): T tokens, K top-k slots, M model dim. `y[t, k]` is the output of token
t's k-th selected expert NOT multiplied by its gate weight (`RoutingRecord.expert_outputs_TKM`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ds_moe_div.tensor_ops import at_least_fp32


def output_norm_sums(*, outputs_TKM: Tensor, kept_TK: Tensor, weight_T: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sum over kept slots of sum_t w_t ||y[t, k]||_2, sum over kept slots of w_t), both float64 0-d:
    the numerator and denominator of the mean norm, which add over micro-batches and ranks.
    weight_T: 1 for a token to count, 0 for padding (None: every token). Dropped slots (kept False)
    do not count: their expert never ran."""
    norm_TK = at_least_fp32(outputs_TKM).norm(dim=-1).to(torch.float64)
    weight_TK = kept_TK.to(torch.float64)
    if weight_T is not None:
        weight_TK = weight_TK * weight_T.to(torch.float64)[:, None]
    # where, not a product: a dropped slot may hold garbage (even inf) that must not leak into the sum.
    return torch.where(weight_TK > 0, norm_TK * weight_TK, torch.zeros_like(norm_TK)).sum(), weight_TK.sum()


def expert_output_norm(*, outputs_TKM: Tensor, kept_TK: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """mean over kept slots (t, k) of valid tokens (mask_T True; None: all) of ||y[t, k]||_2, float64.
    NaN when no slot counts."""
    total, slots = output_norm_sums(outputs_TKM=outputs_TKM, kept_TK=kept_TK, weight_T=mask_T)
    return torch.where(slots > 0, total / slots.clamp(min=1.0), torch.full_like(total, float("nan")))
