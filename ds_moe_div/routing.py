"""What one MoE layer's router did on one micro-batch, as tensors for losses and metrics.

The one interface between a MoE layer and everything downstream (composer, metrics, evaluation): a layer
returns one `RoutingRecord` per forward, explicitly (no module attributes). DeepSpeed-MoE layers build it
in `moe.py`; any other router (e.g. a dropless token-choice top-k router returning top scores [T, K],
selected experts [T, K] and counts [E]) fills the same fields, with `capacity=None` and `kept_TK` all True.

Shape legend (docs/SHAPES.md): T tokens of the micro-batch (B*S, row-major, padding included), E routed
experts, K = top-k slots per token, M model dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingRecord:
    """Routing of one MoE layer for one micro-batch (local to this rank; nothing is reduced).

    `probs_TE`, `logits_TE` and `weights_TK` are differentiable (fp32). `indices_TK` are the experts
    each token chose before the capacity limit; `kept_TK` is False where the limit dropped the slot
    (the slot's expert output is then zero and its weight is zero). `l_aux` is the load-balancing loss
    the layer's gate returned for this micro-batch (DeepSpeed's own). `capacity`: slots per expert,
    None for a dropless layer.
    """

    layer_id: int
    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    indices_TK: torch.Tensor
    weights_TK: torch.Tensor
    kept_TK: torch.Tensor
    l_aux: torch.Tensor
    capacity: int | None = None
    # Unweighted outputs of each token's selected experts in token-major order; only collected
    # when a loss needs them (orthogonality), else None.
    expert_outputs_TKM: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[-1]

    @property
    def k(self) -> int:
        return self.indices_TK.shape[-1]
