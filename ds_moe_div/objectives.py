"""Routing objectives as pure, keyword-only functions of tensors (methods spec, sections 2-6).

    .venv/bin/python -m pytest tests/test_objectives.py tests/test_objectives_distributed.py -q

Shape suffixes: T tokens (a micro-batch's [B, S] positions flattened row-major), E routed experts,
L MoE layers, D domains, K top-k slots, B sequences, S sequence length, N (sequence, domain) units,
P domain pairs. In `outputs_TKD` the trailing D is the model dimension (the name the trainer uses).

Batch levels: *micro-batch* = what this rank's forward pass saw; *global batch* = the concatenation
of the micro-batches of all data-parallel ranks at the same micro-step. Every loss is computed on
the micro-batch except the expert-divergence loss, whose domain means are those of the global batch,
and the global-batch load balance. Only `global_domain_means` and `global_load_balance_loss`
communicate, over the `group` they are given, both with the same straight-through construction.

Half-precision inputs are promoted to float32; float32/float64 inputs keep their dtype.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _nonzero_or_one(x: Tensor) -> Tensor:
    """Safe denominator: divisions by an empty count give 0 instead of NaN."""
    return torch.where(x > 0, x, torch.ones_like(x))


def _masked_mean_T(values_T: Tensor, mask_T: Tensor | None) -> Tensor:
    if mask_T is None:
        return values_T.sum() / max(values_T.shape[0], 1)
    total = torch.where(mask_T, values_T, torch.zeros_like(values_T)).sum()
    return total / _nonzero_or_one(mask_T.sum().to(values_T.dtype))


def _kl(p_E: Tensor, m_E: Tensor, floor: float | None = None) -> Tensor:
    """KL(p || m) in nats over the last dim, 0 log 0 = 0; `floor` keeps log finite at exact zeros.

    Written as sum p (log p - log m) rather than as a difference of entropies: for the nearly equal
    distributions of an untrained router the entropy difference loses most of its digits.
    """
    floor = torch.finfo(p_E.dtype).tiny if floor is None else floor
    return (p_E * (p_E.clamp_min(floor).log() - m_E.clamp_min(floor).log())).sum(-1)


def _straight_through_sums(grad_parts: list[Tensor], plain_parts: list[Tensor],
                           group: dist.ProcessGroup | None) -> tuple[list[Tensor], list[Tensor]]:
    """Sums over the ranks of `group` with ONE all-reduce (SUM) of all parts, detached, in one buffer.

    `grad_parts` come back straight-through: global.detach() + N * (local - local.detach()), i.e. the
    value of the global sum with N times the gradient of the local one, which DeepSpeed's averaging over
    the N ranks turns into the gradient of the global sum. `plain_parts` come back as plain global sums
    (in the dtype of the first grad part). None or a group of size 1: everything unchanged.
    """
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        return grad_parts, plain_parts
    parts = [*grad_parts, *plain_parts]
    flat = torch.cat([part.detach().reshape(-1).to(grad_parts[0].dtype) for part in parts])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    sums = [chunk.view(part.shape) for chunk, part in zip(flat.split([p.numel() for p in parts]), parts)]
    grads = [total + world * (local - local.detach()) for total, local in zip(sums, grad_parts)]
    return grads, sums[len(grad_parts):]


# --------------------------------------------------------------------------- load balance (spec 1)

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
    probs_LTE = _at_least_fp32(probs_LTE)
    num_layers, _, num_experts = probs_LTE.shape
    k = indices_LTK.shape[-1]
    valid_T = torch.ones(probs_LTE.shape[1], dtype=torch.bool, device=probs_LTE.device) if mask_T is None else mask_T
    weight_T = valid_T.to(probs_LTE.dtype)
    counts_LE = torch.zeros(num_layers, num_experts, dtype=probs_LTE.dtype, device=probs_LTE.device)
    counts_LE.scatter_add_(1, indices_LTK.flatten(1), weight_T[None, :, None].expand(num_layers, -1, k).flatten(1))
    psum_LE = (probs_LTE * weight_T[None, :, None]).sum(1)
    (psum_LE,), (counts_LE, tokens) = _straight_through_sums([psum_LE], [counts_LE, weight_T.sum()], group)
    denominator = _nonzero_or_one(tokens)
    f_LE = counts_LE / (k * denominator)
    return num_experts * (f_LE * psum_LE).sum(-1) / denominator


# --------------------------------------------------------------------------- z-loss (spec 2)

def router_z_loss(*, logits_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss  L_z = mean_t (logsumexp_j logits[t, j])^2  over valid tokens.

    logits_TE: one layer's router logits for the micro-batch. mask_T: True for valid tokens
    (None = all valid). No valid token gives 0.
    """
    z_T = torch.logsumexp(_at_least_fp32(logits_TE), dim=-1).square()
    return _masked_mean_T(z_T, mask_T)


# --------------------------------------------------------------------------- expert divergence (spec 5)

def _unit_index_T(domain_ids_BS: Tensor, num_domains: int) -> tuple[Tensor, Tensor]:
    """Per token: index b * num_domains + d of its (sequence, domain) unit, and whether it is labelled."""
    num_seqs, seq_len = domain_ids_BS.shape
    domain_T = domain_ids_BS.reshape(-1)
    seq_T = torch.arange(num_seqs, device=domain_T.device).repeat_interleave(seq_len)
    return seq_T * num_domains + domain_T.clamp(min=0), domain_T >= 0


def _sum_units(probs_LTE: Tensor, unit_T: Tensor, valid_T: Tensor, num_units: int) -> tuple[Tensor, Tensor]:
    """Sum of probs and token count per unit; unlabelled tokens are zeroed (no boolean indexing, no sync)."""
    num_layers, _, num_experts = probs_LTE.shape
    src_LTE = torch.where(valid_T[None, :, None], probs_LTE, torch.zeros_like(probs_LTE))
    sums_LUE = probs_LTE.new_zeros(num_layers, num_units, num_experts).index_add(1, unit_T, src_LTE)
    counts_U = probs_LTE.new_zeros(num_units).index_add(0, unit_T, valid_T.to(probs_LTE.dtype))
    return sums_LUE, counts_U


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
    probs_LTE = _at_least_fp32(probs_LTE)
    unit_T, valid_T = _unit_index_T(domain_ids_BS, num_domains)
    if average == "token":
        return _sum_units(probs_LTE, unit_T % num_domains, valid_T, num_domains)
    sums_LUE, counts_U = _sum_units(probs_LTE, unit_T, valid_T, num_seqs * num_domains)
    pbar_LUE = sums_LUE / _nonzero_or_one(counts_U)[None, :, None]
    sums_LDE = pbar_LUE.unflatten(1, (num_seqs, num_domains)).sum(1)
    counts_D = (counts_U > 0).reshape(num_seqs, num_domains).sum(0).to(sums_LDE.dtype)
    return sums_LDE, counts_D


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
    (sums_LDE,), (counts_D,) = _straight_through_sums([sums_LDE], [counts_D], group)
    return sums_LDE / _nonzero_or_one(counts_D)[None, :, None].to(sums_LDE.dtype), counts_D


def jensen_shannon(*, p_E: Tensor, q_E: Tensor, eps: float | None = None) -> Tensor:
    """JSD(p || q) = KL(p || m)/2 + KL(q || m)/2, m = (p + q)/2, in nats (0 .. ln 2), over the last dim.

    Zeros are handled (0 log 0 = 0). eps floors the arguments of log (default: the dtype's smallest
    normal number), which changes no value above it and keeps gradients finite at exact zeros.
    Leading dimensions broadcast.
    """
    m_E = 0.5 * (p_E + q_E)
    return 0.5 * _kl(p_E, m_E, eps) + 0.5 * _kl(q_E, m_E, eps)


def _pairwise_neglog_L(q_LDE: Tensor, present_D: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    num_domains = q_LDE.shape[1]
    a_P, b_P = torch.triu_indices(num_domains, num_domains, offset=1, device=q_LDE.device)
    jsd_LP = jensen_shannon(p_E=q_LDE[:, a_P], q_E=q_LDE[:, b_P])
    valid_P = present_D[a_P] & present_D[b_P]
    num_pairs = _nonzero_or_one(valid_P.sum().to(q_LDE.dtype))
    zero = torch.zeros_like(jsd_LP)
    neglog_L = torch.where(valid_P, -torch.log(jsd_LP + eps), zero).sum(-1) / num_pairs
    return neglog_L, torch.where(valid_P, jsd_LP, zero).sum(-1) / num_pairs


def _generalized_jsd_L(q_LDE: Tensor, counts_D: Tensor, present_D: Tensor) -> Tensor:
    """sum_d w_d KL(q_d || M) with M = sum_d w_d q_d; equals H(M) - sum_d w_d H(q_d)."""
    w_D = torch.where(present_D, counts_D, torch.zeros_like(counts_D)).to(q_LDE.dtype)
    w_D = w_D / _nonzero_or_one(w_D.sum())
    mixture_LE = (w_D[None, :, None] * q_LDE).sum(1)
    return (w_D * _kl(q_LDE, mixture_LE[:, None, :])).sum(-1)


def expert_divergence_loss(*, q_LDE: Tensor, counts_D: Tensor,
                           form: Literal["pairwise_neglog", "generalized"] = "pairwise_neglog",
                           eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Expert-divergence loss L_ED per layer, from the global-batch domain means q (spec section 5).

    Present domains: counts_D > 0 (global counts from `global_domain_means`).
      pairwise_neglog: loss_l = mean over unordered present pairs (a, b) of -log(JSD(q_a || q_b) + eps);
                       jsd_l  = mean pairwise JSD.
      generalized:     loss_l = -jsd_l,  jsd_l = H(sum_d w_d q_d) - sum_d w_d H(q_d),
                       w_d = counts_d / sum of present counts (the token share for average="token",
                       the (sequence, domain)-unit share for average="sequence").
    Returns (loss_L, jsd_L, num_present). With < 2 present domains loss and jsd are 0 (still in the
    graph, zero gradient) and num_present (a 0-d int64 tensor, no host sync) says it was skipped.
    """
    present_D = counts_D > 0
    q_LDE = _at_least_fp32(q_LDE)
    q_LDE = torch.where(present_D[None, :, None], q_LDE, torch.zeros_like(q_LDE))
    if form == "pairwise_neglog":
        loss_L, jsd_L = _pairwise_neglog_L(q_LDE, present_D, eps)
    elif form == "generalized":
        jsd_L = _generalized_jsd_L(q_LDE, counts_D, present_D)
        loss_L = -jsd_L
    else:
        raise ValueError(f"form must be 'pairwise_neglog' or 'generalized', got {form!r}")
    num_present = present_D.sum()
    active = num_present >= 2
    return (torch.where(active, loss_L, torch.zeros_like(loss_L)),
            torch.where(active, jsd_L, torch.zeros_like(jsd_L)), num_present)


# --------------------------------------------------------------------------- orthogonality (spec 3)

def _pairwise_orthogonality_T(y_TKD: Tensor, alive_TK: Tensor, eps: float) -> Tensor:
    """Per token sum over ordered pairs j != k of || <y_j, y_k> / (<y_k, y_k> + eps) * y_k ||^2."""
    # Broadcast-multiply-sum, not bmm: a batch of T tiny K x K products is ~4x slower on CPU.
    gram_TKK = (y_TKD[:, :, None, :] * y_TKD[:, None, :, :]).sum(-1)
    sq_TK = gram_TKK.diagonal(dim1=1, dim2=2)
    term_TKK = (gram_TKK / (sq_TK[:, None, :] + eps)).square() * sq_TK[:, None, :]
    num_slots = alive_TK.shape[1]
    off_diag = ~torch.eye(num_slots, dtype=torch.bool, device=alive_TK.device)
    pair_TKK = alive_TK[:, :, None] & alive_TK[:, None, :] & off_diag
    return torch.where(pair_TKK, term_TKK, torch.zeros_like(term_TKK)).sum((1, 2))


def _orthonormal_basis(vectors: list[Tensor], eps: float) -> list[Tensor]:
    """Gram-Schmidt (two passes) per token over [T, D] vectors; a vector whose residual keeps less
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


def _span_orthogonality_T(y_TKD: Tensor, eps: float) -> Tensor:
    """Per token sum over slots j of ||projection of y_j onto span{y_k : k != j}||^2 (absent slots are 0)."""
    num_slots = y_TKD.shape[1]
    total_T = y_TKD.new_zeros(y_TKD.shape[0])
    for j in range(num_slots):
        others = [y_TKD[:, k] for k in range(num_slots) if k != j]
        for b in _orthonormal_basis(others, eps):
            total_T = total_T + (y_TKD[:, j] * b).sum(-1).square()
    return total_T


def orthogonality_loss(*, outputs_TKD: Tensor, kept_TK: Tensor, mask_T: Tensor | None = None,
                       form: Literal["pairwise", "span"] = "pairwise", eps: float = 1e-6,
                       reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """Orthogonality loss L_o of one layer on the micro-batch (Guo et al. 2025; spec section 3).

    outputs_TKD: each token's selected experts' outputs, NOT multiplied by the gate weight, in
    token-major order (token t's k slots in row t). kept_TK: False where the capacity limit dropped
    the slot (treated as absent). mask_T: False for padding tokens. K_t = surviving slots of token t.
      pairwise (Eq. 5): sum_t sum_{j in K_t} sum_{k in K_t, k != j} || <y_j,y_k>/(<y_k,y_k>+eps) y_k ||^2
                        (-> |y_j|^2 cos^2(y_j, y_k) per ordered pair as eps -> 0);
                        mean divides by T = number of valid tokens.
      span:             sum_t sum_{j in K_t} || proj of y_j onto span{y_k : k in K_t, k != j} ||^2;
                        mean divides by K*T. eps is the relative residual below which an "other"
                        output adds no direction (collinear or zero outputs are stable).
    Only tokens with >= 2 surviving slots contribute. For K = 2 both sums agree (eps -> 0), so the
    pairwise mean is K = 2 times the span mean.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    y_TKD = _at_least_fp32(outputs_TKD)
    alive_TK = kept_TK if mask_T is None else kept_TK & mask_T[:, None]
    y_TKD = torch.where(alive_TK[..., None], y_TKD, torch.zeros_like(y_TKD))
    if form == "pairwise":
        total, per_token_slots = _pairwise_orthogonality_T(y_TKD, alive_TK, eps).sum(), 1
    elif form == "span":
        total, per_token_slots = _span_orthogonality_T(y_TKD, eps).sum(), y_TKD.shape[1]
    else:
        raise ValueError(f"form must be 'pairwise' or 'span', got {form!r}")
    if reduction == "sum":
        return total
    return total / (per_token_slots * _nonzero_or_one(_num_valid(y_TKD[:, 0, 0], mask_T)))


# --------------------------------------------------------------------------- variance (spec 4)

def topk_score_matrix(*, indices_TK: Tensor, weights_TK: Tensor, kept_TK: Tensor | None = None,
                      num_experts: int) -> Tensor:
    """Post-top-k score matrix S[t, e] = gate weight of expert e if token t selected it (and the slot
    survived the capacity limit), else 0. Micro-batch level, one layer."""
    weights_TK = _at_least_fp32(weights_TK)
    if kept_TK is not None:
        weights_TK = torch.where(kept_TK, weights_TK, torch.zeros_like(weights_TK))
    scores_TE = weights_TK.new_zeros(weights_TK.shape[0], num_experts)
    return scores_TE.scatter_add(1, indices_TK.clamp(0, num_experts - 1), weights_TK)


def variance_loss(*, scores_TE: Tensor | None = None, probs_TE: Tensor | None = None,
                  mask_T: Tensor | None = None, form: Literal["tokens", "experts"] = "tokens",
                  reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """Variance loss L_v of one layer on the micro-batch (Guo et al. 2025, spec section 4); minimising
    it MAXIMISES routing variance. T = number of valid tokens (mask_T True).
      tokens (Eq. 7, needs scores_TE = `topk_score_matrix`):
          L = -(1/E) sum_j mean_t (S[t,j] - mean_t S[t,j])^2   (population variance over tokens);
          reduction="sum" multiplies by T (the paper's scale).
      experts (released code, needs probs_TE = dense softmax):
          L = -mean_t var_j p[t, j]  (unbiased variance across experts); "sum" sums over tokens.
    Tokens that all route alike give 0 for "tokens" and a negative value for "experts".
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if form == "tokens":
        if scores_TE is None:
            raise ValueError("variance form 'tokens' needs scores_TE")
        return _token_variance_loss(_at_least_fp32(scores_TE), mask_T, reduction)
    if form != "experts":
        raise ValueError(f"form must be 'tokens' or 'experts', got {form!r}")
    if probs_TE is None:
        raise ValueError("variance form 'experts' needs probs_TE")
    neg_var_T = -_at_least_fp32(probs_TE).var(dim=-1, correction=1)
    mean = _masked_mean_T(neg_var_T, mask_T)
    return mean * _num_valid(neg_var_T, mask_T) if reduction == "sum" else mean


def _num_valid(values_T: Tensor, mask_T: Tensor | None) -> Tensor:
    count = values_T.shape[0] if mask_T is None else mask_T.sum()
    return torch.as_tensor(count, dtype=values_T.dtype, device=values_T.device)


def _token_variance_loss(scores_TE: Tensor, mask_T: Tensor | None, reduction: str) -> Tensor:
    if mask_T is None:
        mask_T = torch.ones(scores_TE.shape[0], dtype=torch.bool, device=scores_TE.device)
    num_tokens = _num_valid(scores_TE, mask_T)
    valid_TE = mask_T[:, None].expand_as(scores_TE)
    scores_TE = torch.where(valid_TE, scores_TE, torch.zeros_like(scores_TE))
    mean_E = scores_TE.sum(0) / _nonzero_or_one(num_tokens)
    dev_TE = torch.where(valid_TE, scores_TE - mean_E, torch.zeros_like(scores_TE))
    loss = -(dev_TE.square().sum(0) / _nonzero_or_one(num_tokens)).mean()
    return loss * num_tokens if reduction == "sum" else loss


# --------------------------------------------------------------------------- decomposition (spec 6)

def domain_sequence_means(*, probs_TE: Tensor, domain_ids_BS: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The (sequence, domain) units of `domain_routing_sums(average="sequence")` for one layer.

    Returns seq_means_NE (pbar of each unit: mean of probs_TE over its tokens), seq_domains_N and
    weights_N (token count of each unit), units ordered by (sequence, domain). Micro-batch level;
    for logging (it syncs with the host to drop empty units).
    """
    probs_TE = _at_least_fp32(probs_TE)
    num_domains = max(int(domain_ids_BS.max()) + 1, 1) if domain_ids_BS.numel() else 1
    unit_T, valid_T = _unit_index_T(domain_ids_BS, num_domains)
    num_units = domain_ids_BS.shape[0] * num_domains
    sums_1UE, counts_U = _sum_units(probs_TE[None], unit_T, valid_T, num_units)
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
    pbar_NE = _at_least_fp32(seq_means_NE)
    valid_N = seq_domains_N >= 0
    pbar_NE = torch.where(valid_N[:, None], pbar_NE, torch.zeros_like(pbar_NE))
    w_N = torch.ones_like(pbar_NE[:, 0]) if seq_weights_N is None else seq_weights_N.to(pbar_NE.dtype)
    w_N = torch.where(valid_N, w_N, torch.zeros_like(w_N))
    w_N = w_N / _nonzero_or_one(w_N.sum())
    domain_N = seq_domains_N.clamp(min=0)
    num_domains = int(domain_N.max()) + 1 if domain_N.numel() else 1
    mixture_E = (w_N[:, None] * pbar_NE).sum(0)
    weight_D = w_N.new_zeros(num_domains).index_add(0, domain_N, w_N)
    q_DE = pbar_NE.new_zeros(num_domains, pbar_NE.shape[1]).index_add(0, domain_N, w_N[:, None] * pbar_NE)
    q_DE = q_DE / _nonzero_or_one(weight_D)[:, None]
    d_total = (w_N * _kl(pbar_NE, mixture_E)).sum()
    d_inter = (weight_D * _kl(q_DE, mixture_E)).sum()
    d_intra = (w_N * _kl(pbar_NE, q_DE[domain_N])).sum()
    return d_total, d_inter, d_intra
