"""The orthogonality paper's metrics (Guo et al., arXiv 2505.22323, Fig. 3; baselines spec, sections 2-3)
as pure keyword-only functions; definitions and sources in docs/METRICS.md.

    .venv/bin/python -m pytest tests/test_metrics_paper.py -q

Shape suffixes (docs/SHAPES.md): T tokens, E experts, K top-k slots, M model dim, N sampled tokens,
L layers, G optimizer steps of a window. Undefined values (nothing to average) are NaN, never a silent 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ds_moe_div.tensor_ops import at_least_fp32

_NAN = float("nan")


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.full_like(num / safe, _NAN))


def max_violation(*, load_E: Tensor) -> Tensor:
    """MaxVio (Wang et al. 2024, Loss-Free Balancing, eq. 4) = max_j load_j / mean_j load_j - 1.

    load_E = tokens routed to each expert (top-k selections, before capacity) over the batch the
    caller chose: over the GLOBAL batch of one optimizer step (all ranks, all micro-steps) this is
    MaxVio_global. 0 = perfectly balanced, E - 1 = every slot on one expert. Leading dims broadcast.
    Unlike `metrics.routing.max_violation` (|load - mean| / mean, which also counts under-loaded
    experts) this is the paper's one-sided form."""
    load_E = load_E.to(torch.float64)
    return _ratio(load_E.amax(-1), load_E.mean(-1)) - 1.0


def step_loads(*, cumulative_load_GLE: Tensor) -> Tensor:
    """Per-step loads [G, ...] from loads accumulated up to the end of each step (first difference)."""
    previous = torch.cat([torch.zeros_like(cumulative_load_GLE[:1]), cumulative_load_GLE[:-1]])
    return cumulative_load_GLE - previous


def token_routing_variance_T(*, probs_TE: Tensor) -> Tensor:
    """var_j p[t, j] of each token's dense router probabilities over the E experts, unbiased (E - 1),
    as `torch.var` in the paper's released code."""
    return probs_TE.to(torch.float64).var(-1, correction=1)


def routing_variance(*, probs_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Routing Variance = mean over (valid) tokens of var_j p[t, j] (unbiased over experts). A uniform
    router gives 0; a one-hot router 1/E. NaN without tokens."""
    var_T = token_routing_variance_T(probs_TE=probs_TE)
    weight_T = torch.ones_like(var_T) if mask_T is None else mask_T.to(var_T.dtype)
    return _ratio((var_T * weight_T).sum(), weight_T.sum())


def token_expert_overlap_T(*, outputs_TKM: Tensor, kept_TK: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Per token, the mean |cosine| over ordered pairs (i, j), i != j, of its kept selected experts'
    UNWEIGHTED outputs y[t, i], y[t, j]. Returns (overlap_T, has_pair_T); overlap is 0 where the token
    has fewer than 2 kept experts (has_pair False: leave it out of any mean)."""
    unit_TKM = F.normalize(at_least_fp32(outputs_TKM), dim=-1, eps=eps)
    cos_TKK = (unit_TKM @ unit_TKM.transpose(1, 2)).abs()
    kept = kept_TK.to(cos_TKK.dtype)
    pair_TKK = kept[:, :, None] * kept[:, None, :] * (1 - torch.eye(kept.shape[1], dtype=kept.dtype,
                                                                     device=kept.device))
    pairs_T = pair_TKK.sum((1, 2))
    overlap_T = (cos_TKK * pair_TKK).sum((1, 2)) / pairs_T.clamp(min=1)
    return overlap_T, pairs_T > 0


def expert_overlap(*, outputs_TKM: Tensor, kept_TK: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Expert Overlap = mean over valid tokens with >= 2 kept experts of the mean pairwise |cosine| of
    their selected experts' outputs (0 = orthogonal outputs; the paper reports < 0.3 with L_o). NaN if
    no token has two kept experts (k = 1)."""
    overlap_T, has_pair_T = token_expert_overlap_T(outputs_TKM=outputs_TKM, kept_TK=kept_TK)
    weight_T = has_pair_T if mask_T is None else has_pair_T & mask_T
    weight_T = weight_T.to(overlap_T.dtype)
    return _ratio((overlap_T * weight_T).sum(), weight_T.sum())


def coselection_counts_EE(*, indices_TK: Tensor, num_experts: int, weight_T: Tensor | None = None) -> Tensor:
    """C[i, j] = (weighted) number of tokens that selected both i and j (top-k, before capacity);
    C[i, i] = tokens that selected i. Sums over batches, so it accumulates."""
    chosen_TE = torch.zeros(indices_TK.shape[0], num_experts, dtype=torch.float64, device=indices_TK.device)
    chosen_TE.scatter_(1, indices_TK.long(), 1.0)
    weighted_TE = chosen_TE if weight_T is None else chosen_TE * weight_T.to(torch.float64)[:, None]
    return weighted_TE.t() @ chosen_TE


def coselection_jaccard(*, coselect_EE: Tensor) -> Tensor:
    """Co-selection overlap = mean over expert pairs i < j (with any token) of the Jaccard index of
    their token sets |A_i & A_j| / |A_i | A_j| = C[i,j] / (C[i,i] + C[j,j] - C[i,j]). 0 = no token
    picks two of the same pair; leading dims broadcast; NaN if no pair has a token."""
    num_experts = coselect_EE.shape[-1]
    diag = coselect_EE.diagonal(dim1=-2, dim2=-1)
    union = diag[..., :, None] + diag[..., None, :] - coselect_EE
    upper = torch.triu(torch.ones(num_experts, num_experts, dtype=torch.bool, device=coselect_EE.device), 1)
    present = upper & (union > 0)
    jaccard = torch.where(present, coselect_EE / torch.where(present, union, torch.ones_like(union)), 0.0)
    return _ratio(jaccard.sum((-2, -1)), present.sum((-2, -1)).to(jaccard.dtype))


def silhouette(*, features_NM: Tensor, labels_N: Tensor) -> Tensor:
    """Silhouette coefficient (Rousseeuw 1987) with cosine distance d = 1 - cos, as scikit-learn's
    `silhouette_score(metric="cosine")`: s_i = (b_i - a_i) / max(a_i, b_i), a_i = mean distance to
    the other members of i's cluster, b_i = smallest mean distance to another cluster; s_i = 0 for a
    singleton cluster. Mean over samples. NaN unless 2 <= number of clusters <= N - 1."""
    x = F.normalize(features_NM.to(torch.float64), dim=-1)
    dist_NN = (1.0 - x @ x.t()).clamp(0.0, 2.0)
    dist_NN.fill_diagonal_(0.0)
    _, label_N = torch.unique(labels_N, return_inverse=True)
    num_clusters, n = int(label_N.max()) + 1 if label_N.numel() else 0, label_N.shape[0]
    if not 2 <= num_clusters <= n - 1:
        return torch.tensor(_NAN, dtype=torch.float64)
    onehot_NC = F.one_hot(label_N, num_clusters).to(torch.float64)
    size_C = onehot_NC.sum(0)
    sums_NC = dist_NN @ onehot_NC
    own_size_N = size_C[label_N]
    a_N = sums_NC.gather(1, label_N[:, None]).squeeze(1) / (own_size_N - 1).clamp(min=1)
    mean_NC = sums_NC / size_C
    b_N = mean_NC.masked_fill(onehot_NC.bool(), float("inf")).amin(1)
    s_N = (b_N - a_N) / torch.maximum(a_N, b_N).clamp(min=1e-300)
    return torch.where(own_size_N > 1, s_N, 0.0).mean()
