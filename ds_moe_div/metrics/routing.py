"""Routing specialisation metrics (methods spec, section 7) from ACCUMULATED count matrices.

    .venv/bin/python -m pytest tests/test_metrics_routing.py -q

Every function is pure and keyword-only, and reads the same counters whatever window produced them
(a training logging window, a held-out evaluation), so train and eval numbers are comparable:
    select_DE    top-k selections of domain d's tokens that chose expert j, BEFORE the capacity limit
    kept_DE      the same selections AFTER the capacity limit (dropped slots removed)
    prob_sum_DE  sum over domain d's tokens of the dense router probability of expert j
    tokens_D     number of tokens of domain d;  k = slots per token, so select_DE.sum(-1) = k * tokens_D
Leading dimensions (e.g. layers: select_LDE) broadcast; tokens_D may be shared by all layers. A
quantity that is undefined on the window (a domain without tokens, no token at all) is NaN, never a
silent 0. Entropies and information are in nats.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ds_moe_div.metrics.decomposition import divergence_decomposition

_NAN = float("nan")


def _div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, NaN where den == 0 (0/0 must not read as a measured 0 or inf)."""
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.full_like(num / safe, _NAN))


def _entropy(p: Tensor) -> Tensor:
    """H(p) = -sum p log p over the last dim, 0 log 0 = 0."""
    return torch.special.entr(p).sum(-1)


def domain_expert_frequency(*, select_DE: Tensor) -> Tensor:
    """freq[d, j] = select[d, j] / sum_j' select[d, j']: domain d's selection distribution (rows sum
    to 1; NaN rows for domains without selections). k * freq[d, j] = fraction of d's tokens choosing j."""
    return _div(select_DE, select_DE.sum(-1, keepdim=True))


def mean_router_prob_DE(*, prob_sum_DE: Tensor, tokens_D: Tensor) -> Tensor:
    """q[d, j] = prob_sum[d, j] / tokens[d]: mean dense router distribution of domain d (NaN if absent)."""
    return _div(prob_sum_DE, tokens_D.to(prob_sum_DE.dtype)[..., None])


def tokens_per_expert(*, select_DE: Tensor, kept_DE: Tensor) -> tuple[Tensor, Tensor]:
    """Expert loads load_j = sum_d select[d, j] before and after the capacity limit: (before_E, after_E)."""
    return select_DE.sum(-2), kept_DE.sum(-2)


def dropped_fraction(*, select_DE: Tensor, kept_DE: Tensor) -> Tensor:
    """Fraction of routing slots the capacity limit dropped: 1 - sum kept / sum select (NaN if none)."""
    total = select_DE.sum((-2, -1))
    return _div(total - kept_DE.sum((-2, -1)), total)


def max_violation(*, select_DE: Tensor, tokens_D: Tensor, k: int) -> Tensor:
    """MaxVio (Wang et al. 2024) = max_j |load_j - kT/E| / (kT/E), load before capacity, T = sum_d tokens_d.
    0 = perfectly balanced; E - 1 = every slot on one expert."""
    load_E = select_DE.sum(-2)
    ideal = k * tokens_D.to(load_E.dtype).sum(-1) / load_E.shape[-1]
    return _div((load_E - ideal[..., None]).abs().amax(-1), ideal)


def load_cv(*, select_DE: Tensor) -> Tensor:
    """Coefficient of variation of the expert load before capacity: std_j(load) / mean_j(load),
    population std (ddof 0). 0 = balanced; sqrt(E - 1) = every slot on one expert."""
    load_E = select_DE.sum(-2)
    return _div(load_E.std(-1, correction=0), load_E.mean(-1))


def dead_experts(*, select_DE: Tensor) -> Tensor:
    """Number of experts no token of the window selected (load before capacity == 0), as a float."""
    return (select_DE.sum(-2) == 0).sum(-1).to(select_DE.dtype)


def domain_routing_entropy_D(*, select_DE: Tensor) -> Tensor:
    """H(E | D = d) = -sum_j freq[d, j] log freq[d, j] of each domain's selection distribution.
    log k = the domain always picks the same k experts; log E = uniform over experts. NaN if absent."""
    freq_DE = domain_expert_frequency(select_DE=select_DE)
    return torch.where(freq_DE.isnan().all(-1), _NAN, _entropy(freq_DE.nan_to_num(0.0)))


def _generalized_jsd(rows_NDE: Tensor, weights_ND: Tensor) -> Tensor:
    """sum_d w_d KL(rows_d || sum_d' w_d' rows_d') per leading index (w normalised), via the
    Proposition-1 helper (`decomposition.divergence_decomposition`) with each row as its own domain (so D_total = D_inter)."""
    domains_D = torch.arange(rows_NDE.shape[-2], device=rows_NDE.device)
    out = [divergence_decomposition(seq_means_NE=rows, seq_domains_N=domains_D, seq_weights_N=w)[0]
           for rows, w in zip(rows_NDE, weights_ND)]
    return torch.stack(out) if out else rows_NDE.new_zeros(0)


def routing_mutual_information(*, select_DE: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """I(D; E) of the joint selection distribution p(d, j) = select[d, j] / sum select (one event = one
    top-k slot, before capacity), and two normalised forms:
        I = sum_{d,j} p(d,j) log p(d,j) / (p(d) p(j)) = sum_d p(d) KL(freq_d || p(E))
        mi_normalized     = I / H(D)            (fraction of the domain's uncertainty an expert choice
                                                 removes: 1 = every expert serves one domain only)
        mi_normalized_min = I / min(H(D), H(E)) (1 also when fewer experts than domains are in use)
    Returns (I, I/H(D), I/min(H(D), H(E))); I is NaN on an empty window, the ratios also when the
    normaliser is 0 (fewer than 2 domains, or a single expert in use).
    """
    lead = select_DE.shape[:-2]
    flat_NDE = select_DE.reshape(-1, *select_DE.shape[-2:])
    rows_ND = flat_NDE.sum(-1)
    freq_NDE = domain_expert_frequency(select_DE=flat_NDE).nan_to_num(0.0)
    mi = _generalized_jsd(freq_NDE, rows_ND)
    mi = torch.where(rows_ND.sum(-1) > 0, mi, _NAN).reshape(lead)
    h_domain = _entropy(_div(rows_ND, rows_ND.sum(-1, keepdim=True)).nan_to_num(0.0)).reshape(lead)
    load_NE = flat_NDE.sum(-2)
    h_expert = _entropy(_div(load_NE, load_NE.sum(-1, keepdim=True)).nan_to_num(0.0)).reshape(lead)
    return mi, _div(mi, h_domain), _div(mi, torch.minimum(h_domain, h_expert))


def expert_domain_purity_E(*, select_DE: Tensor) -> Tensor:
    """purity_j = max_d select[d, j] / sum_d select[d, j]: share of expert j's selections from its
    dominant domain (1 = single-domain expert; a domain-blind router gives max_d share_d). NaN if dead."""
    return _div(select_DE.amax(-2), select_DE.sum(-2))


def mean_expert_domain_purity(*, select_DE: Tensor) -> Tensor:
    """Load-weighted mean purity  sum_j (load_j / sum load) purity_j = sum_j max_d select[d, j] / sum select."""
    return _div(select_DE.amax(-2).sum(-1), select_DE.sum((-2, -1)))


def window_divergence_decomposition(*, prob_sum_DE: Tensor, tokens_D: Tensor,
                                    unit_entropy_sum_D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Proposition 1 (spec section 6) over a whole window, with token weights w_s = n_s / N.

    Units s = (sequence, domain) pairs; unit_entropy_sum_D[d] = sum_{s in d} n_s H(pbar_s) (accumulated
    by `RoutingAccumulator`), q_d = prob_sum_d / n_d, P = sum_d (n_d/N) q_d, W_d = n_d / N:
        D_inter = sum_d W_d KL(q_d || P)                 (= I(D; E) of the dense router distribution)
        D_intra = sum_d W_d H(q_d) - (1/N) sum_d unit_entropy_sum_d
        D_total = D_inter + D_intra = H(P) - sum_s w_s H(pbar_s)
    Equals `decomposition.divergence_decomposition(seq_weights_N=token counts)` on the window's units.
    Returns (D_total, D_inter, D_intra), NaN for an empty window.
    """
    lead = prob_sum_DE.shape[:-2]
    tokens_ND = tokens_D.to(prob_sum_DE.dtype).expand(*lead, tokens_D.shape[-1]).reshape(-1, tokens_D.shape[-1])
    q_NDE = mean_router_prob_DE(prob_sum_DE=prob_sum_DE.reshape(-1, *prob_sum_DE.shape[-2:]),
                                tokens_D=tokens_ND).nan_to_num(0.0)
    d_inter = _generalized_jsd(q_NDE, tokens_ND).reshape(lead)
    total_N = tokens_ND.sum(-1)
    mean_h_q = (tokens_ND * _entropy(q_NDE)).sum(-1)
    d_intra = _div(mean_h_q - unit_entropy_sum_D.reshape(-1, tokens_D.shape[-1]).sum(-1), total_N).reshape(lead)
    d_inter = torch.where(d_intra.isnan(), _NAN, d_inter)
    return d_inter + d_intra, d_inter, d_intra
