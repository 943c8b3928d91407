"""What one MoE layer's router did on one micro-batch, as tensors for losses and metrics.

Shape legend: T tokens of the micro-batch (B*S, row-major, padding included), E routed experts,
K = top-k slots per token, M model dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingRecord:
    """Routing of one MoE layer for one micro-batch (local to this rank; nothing is reduced).

    `probs_TE`, `logits_TE` and `weights_TK` are differentiable (fp32). `indices_TK` are the experts
    each token chose before the capacity limit; `kept_TK` is False where the limit dropped the slot
    (the slot's expert output is then zero and its weight is zero).
    """

    layer_id: int
    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    indices_TK: torch.Tensor
    weights_TK: torch.Tensor
    kept_TK: torch.Tensor
    l_aux: torch.Tensor
    capacity: int
    # Unweighted outputs of each token's selected experts in token-major order; only collected
    # when a loss needs them (orthogonality), else None.
    expert_outputs_TKM: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[-1]

    @property
    def k(self) -> int:
        return self.indices_TK.shape[-1]

    def expert_counts(self, mask_T: torch.Tensor | None = None, *, after_capacity: bool = False) -> torch.Tensor:
        """Routing slots per expert [E] (float), over `mask_T` tokens, before or after the capacity drop."""
        slots = self.kept_TK if after_capacity else torch.ones_like(self.kept_TK)
        if mask_T is not None:
            slots = slots & mask_T[:, None]
        return torch.bincount(self.indices_TK[slots], minlength=self.num_experts).float()
