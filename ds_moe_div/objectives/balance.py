"""Load balance over the global batch (methods spec, section 1). DeepSpeed's own per-micro-batch
`l_aux` comes from its gate; this is the `balance.scope: global_batch` form.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ds_moe_div.objectives.straight_through import straight_through_sums
from ds_moe_div.tensor_ops import at_least_fp32, nonzero_or_one


def global_load_balance_loss(*, probs_LTE: Tensor, indices_LTK: Tensor, mask_T: Tensor | None = None,
                             group: dist.ProcessGroup | None = None) -> Tensor:
    """GShard/Switch L_aux over the global batch (`balance.scope: global_batch`, Qiu et al. 2025), per layer:

        L[l] = E * sum_j f[l, j] * P[l, j]
        f[l, j] = (top-k slots of valid tokens that chose j) / (K * valid tokens)   (counted before capacity)
        P[l, j] = mean over valid tokens of p[t, j]

    with both counts taken over the concatenated micro-batches of all ranks of `group` (the
    data-parallel group the router's gradient is averaged over; None or size 1: this micro-batch).
    f carries no gradient. ONE all-reduce of the detached [counts, probability sums, tokens] buffer;
    the probability sums are then made straight-through (value: global sum, gradient: N x local), as
    in `global_domain_means`, so every rank returns the global value and DeepSpeed's gradient averaging
    yields exactly the gradient of the loss on the concatenated batch. Unlike DeepSpeed's per-micro-batch
    `l_aux` (which counts only the first choice for k = 2 and includes padding), f counts all K slots of
    valid tokens; for k = 1 and no padding the single-rank value equals DeepSpeed's.
    Returns the [L] losses (0 for a global batch without valid tokens).
    """
    probs_LTE = at_least_fp32(probs_LTE)
    num_layers, _, num_experts = probs_LTE.shape
    k = indices_LTK.shape[-1]
    valid_T = torch.ones(probs_LTE.shape[1], dtype=torch.bool, device=probs_LTE.device) if mask_T is None else mask_T
    weight_T = valid_T.to(probs_LTE.dtype)
    counts_LE = torch.zeros(num_layers, num_experts, dtype=probs_LTE.dtype, device=probs_LTE.device)
    counts_LE.scatter_add_(1, indices_LTK.flatten(1), weight_T[None, :, None].expand(num_layers, -1, k).flatten(1))
    psum_LE = (probs_LTE * weight_T[None, :, None]).sum(1)
    (psum_LE,), (counts_LE, tokens) = straight_through_sums([psum_LE], [counts_LE, weight_T.sum()], group)
    denominator = nonzero_or_one(tokens)
    f_LE = counts_LE / (k * denominator)
    return num_experts * (f_LE * psum_LE).sum(-1) / denominator
