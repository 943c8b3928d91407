"""The two load-balancing losses an imported MoE can be trained with, named as what they are.

`deepspeed_l_aux`: DeepSpeed's per-layer l_aux (sharded_moe.topkgating), one value per MoE layer and
micro-batch; it is what every `RoutingRecord.l_aux` of an imported model holds, so `objectives.balance`
(scope micro_batch, averaged over layers) works as for from-scratch models.

`hf_pooled_aux_loss`: transformers' `aux_loss` (`output_router_logits=True`; mixtral, qwen2_moe, olmoe,
qwen3_moe), pooled over all MoE layers before the product. For one layer it is k times DeepSpeed's
l_aux, so the families' coefficients (0.001, OLMoE 0.01) do not transfer 1:1 to `objectives.balance.coef`.
Under expert parallelism transformers computes it on each rank's local tokens only; the project's own
`objectives.balance.scope=global_batch` is the all-reduced alternative.

Shape legend (docs/SHAPES.md): L MoE layers, T tokens, E routed experts, K top-k slots.
"""
from __future__ import annotations

import torch


def deepspeed_l_aux(*, probs_TE: torch.Tensor, indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """l_aux = E / K * sum_e mean_t(p_te) * mean_t(1[e in topk_t])   (DeepSpeed's topkgating; all tokens).

    probs_TE: router probabilities (differentiable); indices_TK: the selected experts."""
    k = indices_TK.shape[-1]
    chosen_TE = torch.zeros_like(probs_TE).scatter_(1, indices_TK, 1.0)
    return (probs_TE.mean(0) * chosen_TE.mean(0)).sum() * num_experts / k


def hf_pooled_aux_loss(*, logits_LTE: torch.Tensor, top_k: int, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """aux = E * sum_e f_e * P_e with, over all layers l and (unmasked) tokens t together,
    f_e = #{(l, t): e in topk(softmax(logits_lt))} / #(l, t) and P_e = mean_{l,t} softmax(logits_lt)_e
    (transformers' load_balancing_loss_func; ~K when perfectly balanced).

    logits_LTE: router logits of every MoE layer [L, T, E]; mask_T: True for real tokens (None: all)."""
    num_layers, _, num_experts = logits_LTE.shape
    probs_LTE = torch.softmax(logits_LTE.float(), dim=-1)
    chosen_LTE = torch.zeros_like(probs_LTE).scatter_(2, probs_LTE.topk(top_k, dim=-1).indices, 1.0)
    weight_LT = torch.ones(probs_LTE.shape[:2], device=probs_LTE.device) if mask_T is None else \
        mask_T.float().reshape(1, -1).expand(num_layers, -1)
    rows = weight_LT.sum()
    f_E = (chosen_LTE * weight_LT.unsqueeze(-1)).sum((0, 1)) / rows
    p_E = (probs_LTE * weight_LT.unsqueeze(-1)).sum((0, 1)) / rows
    return num_experts * (f_E * p_E).sum()


def hf_aux_loss_from_records(records, *, top_k: int, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """hf_pooled_aux_loss of a forward's routing records (their fp32 router logits)."""
    return hf_pooled_aux_loss(logits_LTE=torch.stack([r.logits_TE for r in records]), top_k=top_k, mask_T=mask_T)
