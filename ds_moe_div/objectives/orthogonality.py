"""Orthogonality loss L_o (methods spec, section 3; Guo et al. 2025): the paper's pairwise form (Eq. 5),
the released code's span form, and a scale-free cosine form (issue 16: the pairwise value grows with
the outputs' norms, so it may act as a norm penalty; the cosine form is the control).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ds_moe_div.tensor_ops import at_least_fp32, nonzero_or_one, num_valid


def _alive_pairs_TKK(alive_TK: Tensor) -> Tensor:
    """True for the ordered pairs (j, k), j != k, of surviving slots of each token."""
    num_slots = alive_TK.shape[1]
    off_diag = ~torch.eye(num_slots, dtype=torch.bool, device=alive_TK.device)
    return alive_TK[:, :, None] & alive_TK[:, None, :] & off_diag


def _pairwise_orthogonality_T(y_TKM: Tensor, alive_TK: Tensor, eps: float) -> Tensor:
    """Per token sum over ordered pairs j != k of || <y_j, y_k> / (<y_k, y_k> + eps) * y_k ||^2."""
    # Broadcast-multiply-sum, not bmm: a batch of T tiny K x K products is ~4x slower on CPU.
    gram_TKK = (y_TKM[:, :, None, :] * y_TKM[:, None, :, :]).sum(-1)
    sq_TK = gram_TKK.diagonal(dim1=1, dim2=2)
    term_TKK = (gram_TKK / (sq_TK[:, None, :] + eps)).square() * sq_TK[:, None, :]
    return torch.where(_alive_pairs_TKK(alive_TK), term_TKK, torch.zeros_like(term_TKK)).sum((1, 2))


def _cosine_orthogonality_T(y_TKM: Tensor, alive_TK: Tensor, eps: float) -> Tensor:
    """Per token sum over ordered pairs j != k of <u_j, u_k>^2, u = y / max(|y|, eps)."""
    unit_TKM = y_TKM / y_TKM.norm(dim=-1, keepdim=True).clamp_min(eps)
    cos_TKK = (unit_TKM[:, :, None, :] * unit_TKM[:, None, :, :]).sum(-1)
    return torch.where(_alive_pairs_TKK(alive_TK), cos_TKK.square(), torch.zeros_like(cos_TKK)).sum((1, 2))


def _orthonormal_basis(vectors: list[Tensor], eps: float) -> list[Tensor]:
    """Gram-Schmidt (two passes) per token over [T, M] vectors; a vector whose residual keeps less
    than eps of its squared norm (collinear or zero) contributes a zero basis vector."""
    basis: list[Tensor] = []
    for v in vectors:
        r = v
        for _ in range(2):  # re-orthogonalising once restores orthogonality lost to rounding
            for b in basis:
                r = r - (r * b).sum(-1, keepdim=True) * b
        sq = (r * r).sum(-1, keepdim=True)
        new = sq > eps * (v * v).sum(-1, keepdim=True)
        basis.append(torch.where(new, r / torch.where(new, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(r)))
    return basis


def _span_orthogonality_T(y_TKM: Tensor, eps: float) -> Tensor:
    """Per token sum over slots j of ||projection of y_j onto span{y_k : k != j}||^2 (absent slots are 0)."""
    num_slots = y_TKM.shape[1]
    total_T = y_TKM.new_zeros(y_TKM.shape[0])
    for j in range(num_slots):
        others = [y_TKM[:, k] for k in range(num_slots) if k != j]
        for b in _orthonormal_basis(others, eps):
            total_T = total_T + (y_TKM[:, j] * b).sum(-1).square()
    return total_T


def orthogonality_loss(*, outputs_TKM: Tensor, kept_TK: Tensor, mask_T: Tensor | None = None,
                       form: Literal["pairwise", "span", "cosine"] = "pairwise", eps: float = 1e-6,
                       reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """Orthogonality loss L_o of one layer on the micro-batch (Guo et al. 2025; spec section 3).

    outputs_TKM: each token's selected experts' outputs, NOT multiplied by the gate weight, in
    token-major order (token t's k slots in row t). kept_TK: False where the capacity limit dropped
    the slot (treated as absent). mask_T: False for padding tokens. K_t = surviving slots of token t.
      pairwise (Eq. 5): sum_t sum_{j in K_t} sum_{k in K_t, k != j} || <y_j,y_k>/(<y_k,y_k>+eps) y_k ||^2
                        (-> |y_j|^2 cos^2(y_j, y_k) per ordered pair as eps -> 0);
                        mean divides by T = number of valid tokens.
      span:             sum_t sum_{j in K_t} || proj of y_j onto span{y_k : k in K_t, k != j} ||^2;
                        mean divides by K*T. eps is the relative residual below which an "other"
                        output adds no direction (collinear or zero outputs are stable).
      cosine:           sum_t sum_{j in K_t} sum_{k in K_t, k != j} <u_j, u_k>^2,  u = y / max(|y|, eps)
                        = sum of cos^2(y_j, y_k) (outputs of norm >= eps): the pairwise form on
                        unit-normalised outputs (its eps -> 0 limit), so invariant to rescaling any
                        expert's output (a scale-free control: it cannot act as a norm penalty);
                        in [0, K(K-1)] per token; mean divides by T. A zero output contributes 0.
    Only tokens with >= 2 surviving slots contribute. For K = 2 both sums agree (eps -> 0), so the
    pairwise mean is K = 2 times the span mean.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    y_TKM = at_least_fp32(outputs_TKM)
    alive_TK = kept_TK if mask_T is None else kept_TK & mask_T[:, None]
    y_TKM = torch.where(alive_TK[..., None], y_TKM, torch.zeros_like(y_TKM))
    if form == "pairwise":
        total, per_token_slots = _pairwise_orthogonality_T(y_TKM, alive_TK, eps).sum(), 1
    elif form == "span":
        total, per_token_slots = _span_orthogonality_T(y_TKM, eps).sum(), y_TKM.shape[1]
    elif form == "cosine":
        total, per_token_slots = _cosine_orthogonality_T(y_TKM, alive_TK, eps).sum(), 1
    else:
        raise ValueError(f"form must be 'pairwise', 'span' or 'cosine', got {form!r}")
    if reduction == "sum":
        return total
    return total / (per_token_slots * nonzero_or_one(num_valid(y_TKM[:, 0, 0], mask_T)))
