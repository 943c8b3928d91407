"""Routing divergence decomposition (methods spec, section 6; paper 2, Proposition 1) on explicit
(sequence, domain) units: D_total = D_inter + D_intra. A measurement, not a loss: metrics/routing.py
computes the same quantities from accumulated counts over a window (`window_divergence_decomposition`).

    .venv/bin/python -m pytest tests/test_metrics_decomposition.py -q
"""
from __future__ import annotations

import torch
from torch import Tensor

from ds_moe_div.tensor_ops import at_least_fp32, kl, nonzero_or_one, sum_units, unit_index_T


def domain_sequence_means(*, probs_TE: Tensor, domain_ids_BS: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The (sequence, domain) units of `domain_routing_sums(average="sequence")` for one layer.

    Returns seq_means_NE (pbar of each unit: mean of probs_TE over its tokens), seq_domains_N and
    weights_N (token count of each unit), units ordered by (sequence, domain). Micro-batch level;
    for logging (it syncs with the host to drop empty units).
    """
    probs_TE = at_least_fp32(probs_TE)
    num_domains = max(int(domain_ids_BS.max()) + 1, 1) if domain_ids_BS.numel() else 1
    unit_T, valid_T = unit_index_T(domain_ids_BS, num_domains)
    num_units = domain_ids_BS.shape[0] * num_domains
    sums_1UE, counts_U = sum_units(probs_TE[None], unit_T, valid_T, num_units)
    keep_U = counts_U > 0
    units_N = torch.arange(num_units, device=probs_TE.device)[keep_U]
    return sums_1UE[0, keep_U] / counts_U[keep_U, None], units_N % num_domains, counts_U[keep_U]


def divergence_decomposition(*, seq_means_NE: Tensor, seq_domains_N: Tensor,
                             seq_weights_N: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Routing divergence decomposition (paper 2, Proposition 1), entropies in nats.

    Units s with routing means pbar_s = seq_means_NE[s], domain seq_domains_N[s] (-1 excluded) and
    weights w_s (default uniform; normalised to sum 1). P = sum_s w_s pbar_s, W_d = sum_{s in d} w_s,
    q_d = sum_{s in d} (w_s / W_d) pbar_s:
        D_total = H(P) - sum_s w_s H(pbar_s)          = sum_s w_s KL(pbar_s || P)
        D_inter = H(P) - sum_d W_d H(q_d)             = sum_d W_d KL(q_d || P)
        D_intra = sum_d W_d [H(q_d) - sum_{s in d} (w_s/W_d) H(pbar_s)] = sum_s w_s KL(pbar_s || q_d(s))
    All three are computed as KL sums (well conditioned); D_total = D_inter + D_intra is exact.
    With w_s = token counts, D_inter is the generalised JSD of average="token"; with uniform w_s it
    is that of average="sequence" (w_d = unit share).
    """
    pbar_NE = at_least_fp32(seq_means_NE)
    valid_N = seq_domains_N >= 0
    pbar_NE = torch.where(valid_N[:, None], pbar_NE, torch.zeros_like(pbar_NE))
    w_N = torch.ones_like(pbar_NE[:, 0]) if seq_weights_N is None else seq_weights_N.to(pbar_NE.dtype)
    w_N = torch.where(valid_N, w_N, torch.zeros_like(w_N))
    w_N = w_N / nonzero_or_one(w_N.sum())
    domain_N = seq_domains_N.clamp(min=0)
    num_domains = int(domain_N.max()) + 1 if domain_N.numel() else 1
    mixture_E = (w_N[:, None] * pbar_NE).sum(0)
    weight_D = w_N.new_zeros(num_domains).index_add(0, domain_N, w_N)
    q_DE = pbar_NE.new_zeros(num_domains, pbar_NE.shape[1]).index_add(0, domain_N, w_N[:, None] * pbar_NE)
    q_DE = q_DE / nonzero_or_one(weight_D)[:, None]
    d_total = (w_N * kl(pbar_NE, mixture_E)).sum()
    d_inter = (weight_D * kl(q_DE, mixture_E)).sum()
    d_intra = (w_N * kl(pbar_NE, q_DE[domain_N])).sum()
    return d_total, d_inter, d_intra
