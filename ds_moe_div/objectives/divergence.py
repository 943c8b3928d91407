"""Expert-divergence loss L_ED (methods spec, section 5): per-domain routing sums on the micro-batch,
domain means over the global batch (one all-reduce, straight-through), and the divergence of the means.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from ds_moe_div.objectives.straight_through import straight_through_sums
from ds_moe_div.tensor_ops import at_least_fp32, kl, nonzero_or_one, sum_units, unit_index_T


def domain_routing_sums(*, probs_LTE: Tensor, domain_ids_BS: Tensor, num_domains: int,
                        average: Literal["sequence", "token"] = "sequence") -> tuple[Tensor, Tensor]:
    """Per-domain sums of dense router probabilities on the micro-batch, and their counts.

    probs_LTE: each MoE layer's softmax router probabilities, tokens in [B, S] row-major order.
    domain_ids_BS: int64 domain id per token, -1 = padding / unlabelled (ignored).
      average="token":    sums[l, d] = sum_{t in d} p_l[t];   counts[d] = #tokens of d.
      average="sequence": a unit is a (sequence b, domain d) pair with >= 1 token (packing can put
                          several domains in one sequence); pbar_(b,d) = mean of p over its tokens;
                          sums[l, d] = sum over units of d of pbar;  counts[d] = #units of d.
    sums / counts is then q_d of spec section 5. Both outputs are additive over sequences, so they
    can be summed over ranks (`global_domain_means`). counts_D has the dtype of the sums.
    """
    num_seqs, seq_len = domain_ids_BS.shape
    if probs_LTE.dim() != 3 or probs_LTE.shape[1] != num_seqs * seq_len:
        raise ValueError(f"probs_LTE {tuple(probs_LTE.shape)} must be [L, B*S, E] for domain_ids_BS "
                         f"{tuple(domain_ids_BS.shape)}")
    if average not in ("sequence", "token"):
        raise ValueError(f"average must be 'sequence' or 'token', got {average!r}")
    bad = (domain_ids_BS < -1) | (domain_ids_BS >= num_domains)
    message = f"domain ids must lie in [-1, {num_domains - 1}]"
    if domain_ids_BS.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(message)
    else:  # asynchronous: no host sync on the accelerator's training hot path
        torch._assert_async(~bad.any(), message)
    probs_LTE = at_least_fp32(probs_LTE)
    unit_T, valid_T = unit_index_T(domain_ids_BS, num_domains)
    if average == "token":
        return sum_units(probs_LTE, unit_T % num_domains, valid_T, num_domains)
    sums_LUE, counts_U = sum_units(probs_LTE, unit_T, valid_T, num_seqs * num_domains)
    pbar_LUE = sums_LUE / nonzero_or_one(counts_U)[None, :, None]
    sums_LDE = pbar_LUE.unflatten(1, (num_seqs, num_domains)).sum(1)
    counts_D = (counts_U > 0).reshape(num_seqs, num_domains).sum(0).to(sums_LDE.dtype)
    return sums_LDE, counts_D


def domain_token_counts(*, domain_ids_BS: Tensor, num_domains: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """tokens[d] = number of tokens labelled d in the micro-batch (-1 ignored): the token-share weights of
    the `generalized` form when the means are taken over sequences. Additive over ranks."""
    valid_T = domain_ids_BS.reshape(-1) >= 0
    index_T = domain_ids_BS.reshape(-1).clamp(min=0)
    return torch.zeros(num_domains, dtype=dtype, device=domain_ids_BS.device).index_add(0, index_T, valid_T.to(dtype))


def global_domain_means_and_weights(*, sums_LDE: Tensor, counts_D: Tensor, weights_D: Tensor,
                                    group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`global_domain_means`, with per-domain weights (e.g. `domain_token_counts`) summed over `group` in
    the same all-reduce: returns (q_LDE, global counts_D, global weights_D)."""
    (sums_LDE,), (counts_D, weights_D) = straight_through_sums([sums_LDE], [counts_D, weights_D], group)
    return sums_LDE / nonzero_or_one(counts_D)[None, :, None].to(sums_LDE.dtype), counts_D, weights_D


def global_domain_means(*, sums_LDE: Tensor, counts_D: Tensor,
                        group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
    """Domain routing means of the global batch:  q[l, d] = sum_r sums_r[l, d] / sum_r counts_r[d].

    sums_LDE, counts_D: this rank's micro-batch output of `domain_routing_sums`. group: the
    data-parallel group over which DeepSpeed averages the router's gradient (None or size 1: local).
    Returns q_LDE (rows of absent domains are 0) and the global counts_D.

    With N > 1 ranks: ONE all-reduce (SUM) of the detached [sums, counts] buffer, then
        sums_st = global_sum.detach() + N * (local_sum - local_sum.detach())
    Its value is the global sum; its gradient is N times the local sum's. Any loss f(q) computed
    from it is identical on every rank, and rank r's gradient is N * df/dG . dS_r/dtheta with
    G = sum_r S_r. DeepSpeed averages gradients over the N ranks, which yields
    sum_r df/dG . dS_r/dtheta = d f(q_global)/dtheta: exactly the gradient of the loss on the
    concatenated global batch. (Without the factor N, as in the spec's formula, the effective
    coefficient would be beta_ed / N.) Every rank must add the loss to its objective, including
    ranks with no labelled token; the micro-batches of one accumulation step are separate global batches.
    """
    (sums_LDE,), (counts_D,) = straight_through_sums([sums_LDE], [counts_D], group)
    return sums_LDE / nonzero_or_one(counts_D)[None, :, None].to(sums_LDE.dtype), counts_D


def jensen_shannon(*, p_E: Tensor, q_E: Tensor, eps: float | None = None) -> Tensor:
    """JSD(p || q) = KL(p || m)/2 + KL(q || m)/2, m = (p + q)/2, in nats (0 .. ln 2), over the last dim.

    Zeros are handled (0 log 0 = 0). eps floors the arguments of log (default: the dtype's smallest
    normal number), which changes no value above it and keeps gradients finite at exact zeros.
    Leading dimensions broadcast.
    """
    m_E = 0.5 * (p_E + q_E)
    return 0.5 * kl(p_E, m_E, eps) + 0.5 * kl(q_E, m_E, eps)


def _pairwise_neglog_L(q_LDE: Tensor, present_D: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    num_domains = q_LDE.shape[1]
    a_P, b_P = torch.triu_indices(num_domains, num_domains, offset=1, device=q_LDE.device)
    jsd_LP = jensen_shannon(p_E=q_LDE[:, a_P], q_E=q_LDE[:, b_P])
    valid_P = present_D[a_P] & present_D[b_P]
    num_pairs = nonzero_or_one(valid_P.sum().to(q_LDE.dtype))
    zero = torch.zeros_like(jsd_LP)
    neglog_L = torch.where(valid_P, -torch.log(jsd_LP + eps), zero).sum(-1) / num_pairs
    return neglog_L, torch.where(valid_P, jsd_LP, zero).sum(-1) / num_pairs


def _generalized_jsd_L(q_LDE: Tensor, weights_D: Tensor, present_D: Tensor) -> Tensor:
    """sum_d w_d KL(q_d || M) with M = sum_d w_d q_d; equals H(M) - sum_d w_d H(q_d)."""
    w_D = torch.where(present_D, weights_D, torch.zeros_like(weights_D)).to(q_LDE.dtype)
    w_D = w_D / nonzero_or_one(w_D.sum())
    mixture_LE = (w_D[None, :, None] * q_LDE).sum(1)
    return (w_D * kl(q_LDE, mixture_LE[:, None, :])).sum(-1)


def expert_divergence_loss(*, q_LDE: Tensor, counts_D: Tensor,
                           form: Literal["pairwise_neglog", "generalized"] = "pairwise_neglog",
                           eps: float = 1e-6, weights_D: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Expert-divergence loss L_ED per layer, from the global-batch domain means q (spec section 5).

    Present domains: counts_D > 0 (global counts from `global_domain_means`).
      pairwise_neglog: loss_l = mean over unordered present pairs (a, b) of -log(JSD(q_a || q_b) + eps);
                       jsd_l  = mean pairwise JSD.
      generalized:     loss_l = -jsd_l,  jsd_l = H(sum_d w_d q_d) - sum_d w_d H(q_d),
                       w_d = weights_d / sum of present weights; weights_D defaults to counts_D (the
                       token share for average="token", the (sequence, domain)-unit share for
                       average="sequence"); pass `domain_token_counts` for the token share with
                       average="sequence" (the spec's definition: config divergence.domain_weights).
    Returns (loss_L, jsd_L, num_present). With < 2 present domains loss and jsd are 0 (still in the
    graph, zero gradient) and num_present (a 0-d int64 tensor, no host sync) says it was skipped.
    """
    present_D = counts_D > 0
    q_LDE = at_least_fp32(q_LDE)
    q_LDE = torch.where(present_D[None, :, None], q_LDE, torch.zeros_like(q_LDE))
    if form == "pairwise_neglog":
        loss_L, jsd_L = _pairwise_neglog_L(q_LDE, present_D, eps)
    elif form == "generalized":
        jsd_L = _generalized_jsd_L(q_LDE, counts_D if weights_D is None else weights_D, present_D)
        loss_L = -jsd_L
    else:
        raise ValueError(f"form must be 'pairwise_neglog' or 'generalized', got {form!r}")
    num_present = present_D.sum()
    active = num_present >= 2
    return (torch.where(active, loss_L, torch.zeros_like(loss_L)),
            torch.where(active, jsd_L, torch.zeros_like(jsd_L)), num_present)
