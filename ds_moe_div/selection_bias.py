"""Loss-Free Balancing on DeepSpeed's gate: a per-expert bias that changes which experts a token selects
and nothing else (Wang et al. 2024; baselines spec, section 1).

    enable_selection_bias([layer.gate for layer in model.moe_layers()])   # before deepspeed.initialize

The bias lives on each `RoutingGate` as the fp32 buffer `selection_bias` [E] (0 at start). It is part
of the module's state dict, so DeepSpeed's checkpoint carries it and resume restores it exactly. Its
name must not contain "expert": DeepSpeed's MoE checkpointing treats every state-dict entry of an MoE
layer whose name contains "expert" as an expert-parallel tensor (saved per expert rank).

`biased_gating` calls DeepSpeed's own `top1gating` / `top2gating` / `topkgating` with the biased
router probabilities `p + b` as their "logits": their softmax is monotone per token, so they select
(and order, and apply the capacity limit to) exactly the top-k of p + b. DeepSpeed's gate weights and
l_aux are then recomputed from the UNBIASED probabilities p at the selected experts, with DeepSpeed's
formulas (k = 1: p of the chosen expert; k >= 2: p renormalised over the kept slots; l_aux with the
mean unbiased p and the biased selection). Only the bias's selection effect reaches the model: no
gradient flows into or through b.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from deepspeed.moe import sharded_moe as ds_moe
from torch import Tensor

BUFFER = "selection_bias"


def enable_selection_bias(gates: Sequence[torch.nn.Module]) -> list[Tensor]:
    """Give each gate a zero fp32 `selection_bias` buffer [E] (idempotent); returns the buffers in order."""
    biases = []
    for gate in gates:
        if gate.noisy_gate_policy is not None or gate.top2_2nd_expert_sampling:
            raise ValueError("objectives.balance.method='loss_free' needs deterministic selection: set "
                             "model.moe.noisy_gate_policy=null and model.moe.top2_2nd_expert_sampling=false")
        if gate._buffers.get(BUFFER) is None:
            gate.register_buffer(BUFFER, torch.zeros(gate.wg.weight.shape[0], dtype=torch.float32,
                                                     device=gate.wg.weight.device))
        biases.append(gate._buffers[BUFFER])
    return biases


def selection_biases(gates: Sequence[torch.nn.Module]) -> list[Tensor]:
    """The gates' current bias buffers (look them up again after `.to()` / DeepSpeed moved the module)."""
    return [gate._buffers[BUFFER] for gate in gates]


def unbiased_gate_weights(*, probs_TE: Tensor, indices_KT: Tensor) -> Tensor:
    """DeepSpeed's slot-major gate weights [K, T] for the selected experts `indices_KT` (-1 = dropped),
    from unbiased probabilities: w = p[t, i] (k = 1), else p[t, i] / max(sum over kept slots, eps)."""
    kept_KT = indices_KT >= 0
    picked_KT = probs_TE.gather(1, indices_KT.clamp(min=0).t().long()).t() * kept_KT
    if indices_KT.shape[0] == 1:
        return picked_KT
    denom_T = picked_KT.sum(0).clamp(min=torch.finfo(picked_KT.dtype).eps)
    return picked_KT / denom_T


def deepspeed_l_aux(*, probs_TE: Tensor, selection_TE: Tensor, k: int) -> Tensor:
    """DeepSpeed's l_aux with me = mean unbiased p and ce from the (biased) selection scores:
    k <= 2: E * sum_j me_j * (fraction of tokens whose FIRST choice is j); k >= 3: (E / k) * sum_j me_j *
    (fraction of tokens selecting j among their top k)."""
    num_experts = probs_TE.shape[-1]
    me_E = probs_TE.mean(0)
    if k <= 2:
        ce_E = F.one_hot(selection_TE.argmax(1), num_experts).float().mean(0)
        return num_experts * (me_E * ce_E).sum()
    top_TK = torch.topk(selection_TE, k=k, dim=1).indices
    ce_E = torch.zeros_like(selection_TE, dtype=torch.bool).scatter_(1, top_TK, True).float().mean(0)
    return num_experts * (me_E * ce_E).sum() / k


def biased_gating(gate, logits_TE: Tensor, bias_E: Tensor, capacity_factor: float, k: int | None = None) -> tuple:
    """DeepSpeed's sparse-route gating outputs (l_aux, capacity, E, indices [K,T], locations [K,T],
    weights [K,T], exp_counts) with top-k selection on p + b and weights/l_aux from p. `k` other than the
    gate's (keep-k evaluation, evaluation/ablation.py): the top-k' of p + b through DeepSpeed's topkgating,
    weights renormalised over the kept slots."""
    k = gate.k if k is None else k
    probs_TE = torch.softmax(logits_TE, dim=-1)
    scores_TE = probs_TE.detach() + bias_E.to(probs_TE.dtype)
    if k != gate.k:
        out = ds_moe.topkgating(scores_TE, k, capacity_factor, gate.min_capacity, gate.drop_tokens, gate.ep_group,
                                sparse_routes=True)
    elif gate.k == 1:
        out = ds_moe.top1gating(scores_TE, capacity_factor, gate.min_capacity, None, None, gate.drop_tokens,
                                gate.use_rts, gate.ep_group, True, False)
    elif gate.k == 2:
        out = ds_moe.top2gating(scores_TE, capacity_factor, gate.min_capacity, gate.drop_tokens, gate.ep_group,
                                False, True)
    else:
        out = ds_moe.topkgating(scores_TE, gate.k, capacity_factor, gate.min_capacity, gate.drop_tokens,
                                gate.ep_group, sparse_routes=True)
    _, capacity, num_experts, indices_KT, locations_KT, _, exp_counts = out
    weights_KT = unbiased_gate_weights(probs_TE=probs_TE, indices_KT=indices_KT)
    if k != gate.k:  # keep-k: renormalised over the kept slots, as DeepSpeed's topkgating does
        weights_KT = weights_KT / weights_KT.sum(0).clamp(min=torch.finfo(weights_KT.dtype).eps)
    # DeepSpeed's own selection scores (its softmax of p + b) decide the l_aux counts, as in its gating.
    l_aux = deepspeed_l_aux(probs_TE=probs_TE, selection_TE=torch.softmax(scores_TE, dim=1), k=k)
    return l_aux, capacity, num_experts, indices_KT, locations_KT, weights_KT, exp_counts
