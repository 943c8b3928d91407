"""ds_moe_div.objectives against naive loop references (float64): values and gradients.

    .venv/bin/python -m pytest tests/test_objectives.py -q
"""
from __future__ import annotations

import math

import pytest
import torch

from ds_moe_div import objectives as obj

DT = torch.float64
LN2 = math.log(2.0)


# --------------------------------------------------------------------------- fixtures and helpers

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=DT) * scale


def _domain_ids(num_seqs: int, seq_len: int, *, domains: list[int], weights: list[float], seed: int) -> torch.Tensor:
    """Packed sequences: random segments of skewed domains, some -1 (unlabelled) and trailing padding."""
    g = _gen(seed)
    probs = torch.tensor(weights, dtype=DT)
    rows = []
    for _ in range(num_seqs):
        row: list[int] = []
        while len(row) < seq_len:
            length = int(torch.randint(1, seq_len, (1,), generator=g))
            pick = int(torch.multinomial(probs, 1, generator=g))
            label = -1 if torch.rand(1, generator=g).item() < 0.1 else domains[pick]
            row += [label] * length
        pad = int(torch.randint(0, 3, (1,), generator=g))
        rows.append(row[: seq_len - pad] + [-1] * pad)
    return torch.tensor(rows, dtype=torch.int64)


def _compare(impl, ref, leaves, *, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """Same value and same gradient (along a fixed cotangent) for impl(*leaves) and ref(*leaves)."""
    results = []
    for fn in (impl, ref):
        xs = [x.detach().clone().requires_grad_(True) for x in leaves]
        out = fn(*xs)
        cot = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        grads = torch.autograd.grad((out * cot).sum(), xs, allow_unused=True)
        results.append((out.detach(), [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]))
    (v_impl, g_impl), (v_ref, g_ref) = results
    torch.testing.assert_close(v_impl, v_ref, rtol=rtol, atol=atol)
    for a, b in zip(g_impl, g_ref):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _grads_finite(out: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(out.sum(), leaf, allow_unused=True)
    g = torch.zeros_like(leaf) if g is None else g
    assert torch.isfinite(g).all()
    return g


# --------------------------------------------------------------------------- naive references (loops)

def naive_z_loss(logits_TE, mask_T):
    total, count = logits_TE.new_zeros(()), 0
    for t in range(logits_TE.shape[0]):
        if mask_T is None or mask_T[t]:
            total = total + torch.log(torch.exp(logits_TE[t]).sum()) ** 2
            count += 1
    return total / max(count, 1)


def naive_domain_sums(probs_LTE, ids_BS, num_domains, average):
    num_layers, _, num_experts = probs_LTE.shape
    sums = [[probs_LTE.new_zeros(num_experts) for _ in range(num_domains)] for _ in range(num_layers)]
    counts = [0.0] * num_domains
    num_seqs, seq_len = ids_BS.shape
    for b in range(num_seqs):
        units: dict[int, list[int]] = {}
        for s in range(seq_len):
            d = int(ids_BS[b, s])
            if d >= 0:
                units.setdefault(d, []).append(b * seq_len + s)
        for d, tokens in units.items():
            for layer in range(num_layers):
                unit_sum = sum(probs_LTE[layer, t] for t in tokens)
                sums[layer][d] = sums[layer][d] + (unit_sum if average == "token" else unit_sum / len(tokens))
            counts[d] += len(tokens) if average == "token" else 1
    sums_LDE = torch.stack([torch.stack(row) for row in sums])
    return sums_LDE, torch.tensor(counts, dtype=probs_LTE.dtype)


def naive_means(sums_LDE, counts_D):
    rows = [[sums_LDE[layer, d] / counts_D[d] if counts_D[d] > 0 else sums_LDE[layer, d] * 0
             for d in range(sums_LDE.shape[1])] for layer in range(sums_LDE.shape[0])]
    return torch.stack([torch.stack(r) for r in rows])


def naive_entropy(p):
    return -sum(p[e] * torch.log(p[e]) for e in range(p.shape[0]) if p[e] > 0)


def naive_kl(p, m):
    return sum(p[e] * torch.log(p[e] / m[e]) for e in range(p.shape[0]) if p[e] > 0)


def naive_jsd(p, q):
    m = 0.5 * (p + q)
    return 0.5 * naive_kl(p, m) + 0.5 * naive_kl(q, m)


def naive_ed(q_LDE, counts_D, form, eps):
    present = [d for d in range(q_LDE.shape[1]) if counts_D[d] > 0]
    losses, jsds = [], []
    for layer in range(q_LDE.shape[0]):
        q = q_LDE[layer]
        if len(present) < 2:
            losses.append(q.sum() * 0)
            jsds.append(q.sum() * 0)
        elif form == "pairwise_neglog":
            pairs = [(a, b) for i, a in enumerate(present) for b in present[i + 1:]]
            losses.append(sum(-torch.log(naive_jsd(q[a], q[b]) + eps) for a, b in pairs) / len(pairs))
            jsds.append(sum(naive_jsd(q[a], q[b]) for a, b in pairs) / len(pairs))
        else:
            total = sum(counts_D[d] for d in present)
            mix = sum(counts_D[d] / total * q[d] for d in present)
            jsd = naive_entropy(mix) - sum(counts_D[d] / total * naive_entropy(q[d]) for d in present)
            losses.append(-jsd)
            jsds.append(jsd)
    return torch.stack(losses), torch.stack(jsds)


def naive_orth_pairwise(y_TKM, kept_TK, mask_T, eps, reduction):
    total, valid = y_TKM.new_zeros(()), 0
    for t in range(y_TKM.shape[0]):
        if mask_T is not None and not mask_T[t]:
            continue
        valid += 1
        alive = [k for k in range(y_TKM.shape[1]) if kept_TK[t, k]]
        for j in alive:
            for k in alive:
                if j != k:
                    yj, yk = y_TKM[t, j], y_TKM[t, k]
                    total = total + (((yj @ yk) / (yk @ yk + eps)) * yk).square().sum()
    return total if reduction == "sum" else total / max(valid, 1)


def naive_orth_cosine(y_TKM, kept_TK, mask_T, eps, reduction):
    total, valid = y_TKM.new_zeros(()), 0
    for t in range(y_TKM.shape[0]):
        if mask_T is not None and not mask_T[t]:
            continue
        valid += 1
        alive = [k for k in range(y_TKM.shape[1]) if kept_TK[t, k]]
        for j in alive:
            for k in alive:
                if j != k:
                    yj, yk = y_TKM[t, j], y_TKM[t, k]
                    total = total + ((yj @ yk) / (max(yj.norm(), eps) * max(yk.norm(), eps))) ** 2
    return total if reduction == "sum" else total / max(valid, 1)


def naive_orth_span(y_TKM, kept_TK, mask_T, reduction, *, pinv: bool = False):
    """Projection onto span of the other surviving slots: G^{-1} (generic inputs) or pinv (degenerate)."""
    total, valid = y_TKM.new_zeros(()), 0
    num_slots = y_TKM.shape[1]
    for t in range(y_TKM.shape[0]):
        if mask_T is not None and not mask_T[t]:
            continue
        valid += 1
        alive = [k for k in range(num_slots) if kept_TK[t, k]]
        for j in alive:
            others = [y_TKM[t, k] for k in alive if k != j]
            if not others:
                continue
            a = torch.stack(others)
            if pinv:
                proj = torch.linalg.pinv(a, rtol=1e-10) @ (a @ y_TKM[t, j])
                total = total + proj.square().sum()
            else:
                g = a @ y_TKM[t, j]
                total = total + g @ torch.linalg.solve(a @ a.T, g)
    return total if reduction == "sum" else total / (num_slots * max(valid, 1))


def naive_topk(indices_TK, weights_TK, kept_TK, num_experts):
    rows = []
    for t in range(indices_TK.shape[0]):
        row = [weights_TK.new_zeros(()) for _ in range(num_experts)]
        for k in range(indices_TK.shape[1]):
            if kept_TK[t, k]:
                row[int(indices_TK[t, k])] = row[int(indices_TK[t, k])] + weights_TK[t, k]
        rows.append(torch.stack(row))
    return torch.stack(rows)


def naive_var_tokens(scores_TE, mask_T, reduction):
    tokens = [t for t in range(scores_TE.shape[0]) if mask_T is None or mask_T[t]]
    num_experts = scores_TE.shape[1]
    total = scores_TE.new_zeros(())
    for j in range(num_experts):
        mean = sum(scores_TE[t, j] for t in tokens) / len(tokens)
        total = total + sum((scores_TE[t, j] - mean) ** 2 for t in tokens) / len(tokens)
    loss = -total / num_experts
    return loss * len(tokens) if reduction == "sum" else loss


def naive_var_experts(probs_TE, mask_T, reduction):
    tokens = [t for t in range(probs_TE.shape[0]) if mask_T is None or mask_T[t]]
    num_experts = probs_TE.shape[1]
    total = probs_TE.new_zeros(())
    for t in tokens:
        mean = sum(probs_TE[t, j] for j in range(num_experts)) / num_experts
        total = total - sum((probs_TE[t, j] - mean) ** 2 for j in range(num_experts)) / (num_experts - 1)
    return total if reduction == "sum" else total / len(tokens)


# --------------------------------------------------------------------------- load balance

def naive_load_balance(probs_LTE, indices_LTK, mask_T):
    """E * sum_j f_j * P_j per layer, by loops over valid tokens and their slots."""
    losses = []
    for probs_TE, indices_TK in zip(probs_LTE, indices_LTK):
        num_experts, k = probs_TE.shape[1], indices_TK.shape[1]
        valid = [t for t in range(probs_TE.shape[0]) if mask_T is None or bool(mask_T[t])]
        if not valid:
            losses.append(probs_TE.sum() * 0)
            continue
        loss = 0
        for j in range(num_experts):
            f = sum(int(indices_TK[t, s]) == j for t in valid for s in range(k)) / (k * len(valid))
            loss = loss + f * sum(probs_TE[t, j] for t in valid) / len(valid)
        losses.append(num_experts * loss)
    return torch.stack(losses)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("with_mask", [False, True])
def test_global_load_balance_matches_naive_on_one_rank(k, with_mask):
    probs = _randn(2, 11, 5, seed=3, scale=2.0).softmax(-1)
    indices = probs.topk(k, dim=-1).indices
    mask = torch.rand(11, generator=_gen(4)) > 0.3 if with_mask else None
    _compare(lambda p: obj.global_load_balance_loss(probs_LTE=p, indices_LTK=indices, mask_T=mask),
             lambda p: naive_load_balance(p, indices, mask), [probs])
    none = torch.zeros(11, dtype=torch.bool)
    assert torch.equal(obj.global_load_balance_loss(probs_LTE=probs, indices_LTK=indices, mask_T=none),
                       torch.zeros(2, dtype=DT))


def test_global_load_balance_with_k1_equals_deepspeeds_l_aux():
    from deepspeed.moe.sharded_moe import top1gating

    logits = _randn(32, 6, seed=5, scale=2.0).float()
    l_aux = top1gating(logits, capacity_factor=1.0, min_capacity=1)[0]
    ours = obj.global_load_balance_loss(probs_LTE=logits.softmax(-1)[None],
                                        indices_LTK=logits.argmax(-1)[None, :, None])
    torch.testing.assert_close(ours[0], l_aux)


# --------------------------------------------------------------------------- z-loss

@pytest.mark.parametrize("with_mask", [False, True])
def test_router_z_loss_matches_naive(with_mask):
    logits = _randn(13, 6, seed=0, scale=3.0)
    mask = torch.rand(13, generator=_gen(1)) > 0.3 if with_mask else None
    _compare(lambda x: obj.router_z_loss(logits_TE=x, mask_T=mask), lambda x: naive_z_loss(x, mask), [logits])


def test_router_z_loss_edge_cases_and_dtype():
    logits = _randn(4, 3, seed=2)
    assert obj.router_z_loss(logits_TE=logits, mask_T=torch.zeros(4, dtype=torch.bool)).item() == 0.0
    assert obj.router_z_loss(logits_TE=logits.bfloat16()).dtype == torch.float32
    assert obj.router_z_loss(logits_TE=logits).dtype == DT


# --------------------------------------------------------------------------- domain sums and means

L_, B_, S_, E_, D_ = 2, 4, 9, 6, 5   # domain 3 is absent from the default batch


def _batch(seed: int = 0, *, scale: float = 1.0):
    ids = _domain_ids(B_, S_, domains=[0, 1, 2, 4], weights=[0.55, 0.25, 0.15, 0.05], seed=seed)
    ids[torch.arange(4), 0] = torch.tensor([0, 1, 2, 4])    # every listed domain present, counts uneven
    logits = _randn(L_, B_ * S_, E_, seed=seed + 100, scale=scale)
    return ids, logits


@pytest.mark.parametrize("average", ["token", "sequence"])
def test_domain_routing_sums_matches_naive(average):
    ids, logits = _batch(3)
    assert (ids == -1).any() and not (ids == 3).any()
    probs = logits.softmax(-1)
    _, counts = obj.domain_routing_sums(probs_LTE=probs, domain_ids_BS=ids, num_domains=D_, average=average)
    torch.testing.assert_close(counts, naive_domain_sums(probs, ids, D_, average)[1], rtol=0, atol=0)
    assert counts.dtype == DT and counts[3] == 0
    _compare(lambda p: obj.domain_routing_sums(probs_LTE=p, domain_ids_BS=ids, num_domains=D_, average=average)[0],
             lambda p: naive_domain_sums(p, ids, D_, average)[0], [probs])


def test_domain_routing_sums_rejects_bad_input():
    ids, logits = _batch(4)
    probs = logits.softmax(-1)
    for bad in (4, -2):
        wrong = ids.clone()
        wrong[0, 0] = bad
        with pytest.raises(ValueError, match="domain ids"):
            obj.domain_routing_sums(probs_LTE=probs, domain_ids_BS=wrong, num_domains=4)
    with pytest.raises(ValueError, match="must be"):
        obj.domain_routing_sums(probs_LTE=probs[:, :-1], domain_ids_BS=ids, num_domains=D_)
    with pytest.raises(ValueError, match="average"):
        obj.domain_routing_sums(probs_LTE=probs, domain_ids_BS=ids, num_domains=D_, average="doc")


def test_global_domain_means_local_zero_rows():
    sums = _randn(2, 3, 4, seed=5).abs()
    counts = torch.tensor([2.0, 0.0, 5.0], dtype=DT)
    sums[:, 1] = 0
    q, out_counts = obj.global_domain_means(sums_LDE=sums, counts_D=counts)
    torch.testing.assert_close(q, naive_means(sums, counts), rtol=1e-15, atol=0)
    assert out_counts is counts and (q[:, 1] == 0).all()


# --------------------------------------------------------------------------- Jensen-Shannon and L_ED

def test_jensen_shannon_properties():
    p = _randn(200, 7, seed=6, scale=4.0).softmax(-1)
    q = _randn(200, 7, seed=7, scale=4.0).softmax(-1)
    sparse = torch.where(torch.rand(200, 7, generator=_gen(8)) < 0.4, 0.0, p)
    sparse = sparse / sparse.sum(-1, keepdim=True).clamp_min(1e-300)
    sparse[sparse.sum(-1) == 0, 0] = 1.0
    for a, b in [(p, q), (sparse, q), (sparse, p)]:
        jsd = obj.jensen_shannon(p_E=a, q_E=b)
        assert (jsd >= -1e-15).all() and (jsd <= LN2 + 1e-15).all()
        torch.testing.assert_close(jsd, obj.jensen_shannon(p_E=b, q_E=a), rtol=1e-12, atol=1e-15)
        ref = torch.stack([naive_jsd(a[i], b[i]) for i in range(20)])
        torch.testing.assert_close(jsd[:20], ref, rtol=1e-10, atol=1e-14)
    assert (obj.jensen_shannon(p_E=p, q_E=p) == 0).all()
    disjoint = obj.jensen_shannon(p_E=torch.tensor([0.3, 0.7, 0, 0], dtype=DT), q_E=torch.tensor([0, 0, 0.5, 0.5], dtype=DT))
    torch.testing.assert_close(disjoint, torch.tensor(LN2, dtype=DT), rtol=1e-14, atol=0)
    leaf = sparse.clone().requires_grad_(True)
    _grads_finite(obj.jensen_shannon(p_E=leaf, q_E=q), leaf)


def _ed_chain(logits, ids, average, form, eps=1e-6):
    sums, counts = obj.domain_routing_sums(probs_LTE=logits.softmax(-1), domain_ids_BS=ids, num_domains=D_, average=average)
    q, counts = obj.global_domain_means(sums_LDE=sums, counts_D=counts)
    return obj.expert_divergence_loss(q_LDE=q, counts_D=counts, form=form, eps=eps)


def _naive_ed_chain(logits, ids, average, form, eps=1e-6):
    sums, counts = naive_domain_sums(logits.softmax(-1), ids, D_, average)
    return naive_ed(naive_means(sums, counts), counts, form, eps)


@pytest.mark.parametrize("form", ["pairwise_neglog", "generalized"])
@pytest.mark.parametrize("average", ["token", "sequence"])
@pytest.mark.parametrize("scale", [1.0, 0.02])   # 0.02: nearly uniform router, JSD ~1e-5 as at init
def test_expert_divergence_matches_naive(form, average, scale):
    ids, logits = _batch(9, scale=scale)
    loss, jsd, present = _ed_chain(logits, ids, average, form)
    assert int(present) == 4 and loss.shape == (L_,)
    _compare(lambda x: _ed_chain(x, ids, average, form)[0], lambda x: _naive_ed_chain(x, ids, average, form)[0],
             [logits], rtol=1e-9)
    _compare(lambda x: _ed_chain(x, ids, average, form)[1], lambda x: _naive_ed_chain(x, ids, average, form)[1],
             [logits], rtol=1e-9)
    assert (jsd > 0).all() and (jsd < LN2).all()


@pytest.mark.parametrize("form", ["pairwise_neglog", "generalized"])
@pytest.mark.parametrize("labels", [[2], [-1]])
def test_expert_divergence_skipped_below_two_domains(form, labels):
    ids = torch.tensor([[labels[0]] * 5 + [-1] * 2, [labels[0]] * 7], dtype=torch.int64)
    logits = _randn(L_, 14, E_, seed=11).requires_grad_(True)
    loss, jsd, present = _ed_chain(logits, ids, "sequence", form)
    assert int(present) == (1 if labels[0] >= 0 else 0)
    assert (loss == 0).all() and (jsd == 0).all()
    assert (_grads_finite(loss, logits) == 0).all()


def test_expert_divergence_rejects_unknown_form():
    with pytest.raises(ValueError, match="form"):
        obj.expert_divergence_loss(q_LDE=torch.zeros(1, 2, 3), counts_D=torch.ones(2), form="kl")


# --------------------------------------------------------------------------- orthogonality

def _slots(T=11, K=3, M=5, seed=20):
    y = _randn(T, K, M, seed=seed)
    kept = torch.rand(T, K, generator=_gen(seed + 1)) > 0.25
    kept[0] = True
    mask = torch.rand(T, generator=_gen(seed + 2)) > 0.2
    mask[0] = True
    return y, kept, mask


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_orthogonality_pairwise_matches_naive(reduction, use_mask):
    y, kept, mask = _slots()
    mask = mask if use_mask else None
    _compare(lambda x: obj.orthogonality_loss(outputs_TKM=x, kept_TK=kept, mask_T=mask, reduction=reduction),
             lambda x: naive_orth_pairwise(x, kept, mask, 1e-6, reduction), [y])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_orthogonality_span_matches_naive(reduction):
    y, kept, mask = _slots(K=4, seed=30)
    _compare(lambda x: obj.orthogonality_loss(outputs_TKM=x, kept_TK=kept, mask_T=mask, form="span", reduction=reduction),
             lambda x: naive_orth_span(x, kept, mask, reduction), [y], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_orthogonality_cosine_matches_naive(reduction, use_mask):
    y, kept, mask = _slots(K=4, seed=25)
    mask = mask if use_mask else None
    _compare(lambda x: obj.orthogonality_loss(outputs_TKM=x, kept_TK=kept, mask_T=mask, form="cosine",
                                              reduction=reduction),
             lambda x: naive_orth_cosine(x, kept, mask, 1e-6, reduction), [y])


def test_orthogonality_cosine_is_scale_free_and_the_pairwise_form_on_unit_outputs():
    y, kept, mask = _slots(K=3, seed=26)
    scale = torch.exp(_randn(y.shape[0], y.shape[1], 1, seed=27) * 3)  # each expert output rescaled by 0.05-20x
    kwargs = {"kept_TK": kept, "mask_T": mask, "form": "cosine"}
    base = obj.orthogonality_loss(outputs_TKM=y, **kwargs)
    torch.testing.assert_close(obj.orthogonality_loss(outputs_TKM=y * scale, **kwargs), base, rtol=1e-12, atol=0)
    unit = y / y.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(obj.orthogonality_loss(outputs_TKM=unit, kept_TK=kept, mask_T=mask, eps=0.0), base,
                               rtol=1e-12, atol=0)
    # The pairwise form is not scale-free: it is what the cosine form controls for.
    pairwise = obj.orthogonality_loss(outputs_TKM=y, kept_TK=kept, mask_T=mask)
    assert not torch.allclose(obj.orthogonality_loss(outputs_TKM=3 * y, kept_TK=kept, mask_T=mask), pairwise)
    torch.testing.assert_close(obj.orthogonality_loss(outputs_TKM=3 * y, kept_TK=kept, mask_T=mask, eps=0.0),
                               9 * obj.orthogonality_loss(outputs_TKM=y, kept_TK=kept, mask_T=mask, eps=0.0),
                               rtol=1e-12, atol=0)
    # The gradient is orthogonal to each output (no radial component: no pull on the norms).
    leaf = y.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(obj.orthogonality_loss(outputs_TKM=leaf, **kwargs), leaf)
    torch.testing.assert_close((g * y).sum(-1), torch.zeros(y.shape[:2], dtype=DT), rtol=0, atol=1e-12)
    assert g.abs().sum() > 0


def test_orthogonality_cosine_bounds_and_orthogonal_outputs():
    eye = torch.eye(3, dtype=DT)[None].expand(2, 3, 3) * torch.tensor([1.0, 5.0, 0.2], dtype=DT)[:, None]
    kept = torch.ones(2, 3, dtype=torch.bool)
    assert obj.orthogonality_loss(outputs_TKM=eye, kept_TK=kept, form="cosine").item() == 0.0
    same = _randn(1, 1, 4, seed=28).expand(2, 3, 4) * torch.tensor([1.0, -2.0, 7.0], dtype=DT)[:, None]
    torch.testing.assert_close(obj.orthogonality_loss(outputs_TKM=same, kept_TK=kept, form="cosine"),
                               torch.tensor(6.0, dtype=DT), rtol=1e-12, atol=0)  # K(K-1) = 6 per token


def test_orthogonality_cosine_gradcheck():
    y, kept, mask = _slots(T=4, K=3, M=4, seed=32)
    torch.autograd.gradcheck(lambda x: obj.orthogonality_loss(outputs_TKM=x, kept_TK=kept, mask_T=mask, form="cosine"),
                             (y.requires_grad_(True),))


def test_orthogonality_span_gradcheck():
    y, kept, mask = _slots(T=4, K=3, M=4, seed=31)
    torch.autograd.gradcheck(lambda x: obj.orthogonality_loss(outputs_TKM=x, kept_TK=kept, mask_T=mask, form="span"),
                             (y.requires_grad_(True),))


def test_orthogonality_pairwise_is_cos_squared_as_eps_vanishes():
    y, kept, _ = _slots(seed=40)
    ref = y.new_zeros(())
    for t in range(y.shape[0]):
        alive = [k for k in range(y.shape[1]) if kept[t, k]]
        for j in alive:
            for k in alive:
                if j != k:
                    cos = (y[t, j] @ y[t, k]) / (y[t, j].norm() * y[t, k].norm())
                    ref = ref + y[t, j].square().sum() * cos ** 2
    for eps, rtol in [(0.0, 1e-12), (1e-6, 1e-5)]:
        got = obj.orthogonality_loss(outputs_TKM=y, kept_TK=kept, eps=eps, reduction="sum")
        torch.testing.assert_close(got, ref, rtol=rtol, atol=0)


def test_orthogonality_k2_pairwise_equals_span():
    y, kept, mask = _slots(K=2, seed=50)
    kwargs = {"outputs_TKM": y, "kept_TK": kept, "mask_T": mask}
    pair_sum = obj.orthogonality_loss(**kwargs, eps=0.0, reduction="sum")
    span_sum = obj.orthogonality_loss(**kwargs, form="span", reduction="sum")
    torch.testing.assert_close(pair_sum, span_sum, rtol=1e-12, atol=0)
    pair_mean = obj.orthogonality_loss(**kwargs, eps=0.0)
    torch.testing.assert_close(pair_mean, 2 * obj.orthogonality_loss(**kwargs, form="span"), rtol=1e-12, atol=0)


def test_orthogonality_span_stable_for_collinear_and_zero_outputs():
    base = _randn(3, 6, seed=60)
    y = torch.stack([torch.stack([base[0], 2 * base[0], base[1]]),       # slots 0, 1 collinear
                     torch.stack([torch.zeros(6, dtype=DT), base[1], base[2]]),  # a zero output
                     torch.zeros(3, 6, dtype=DT)])                        # all zero
    kept = torch.ones(3, 3, dtype=torch.bool)
    leaf = y.clone().requires_grad_(True)
    got = obj.orthogonality_loss(outputs_TKM=leaf, kept_TK=kept, form="span", reduction="sum")
    ref = naive_orth_span(y, kept, None, "sum", pinv=True)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    _grads_finite(got, leaf)
    _grads_finite(obj.orthogonality_loss(outputs_TKM=leaf, kept_TK=kept, reduction="sum"), leaf)
    cosine = obj.orthogonality_loss(outputs_TKM=leaf, kept_TK=kept, form="cosine", reduction="sum")
    torch.testing.assert_close(cosine, naive_orth_cosine(y, kept, None, 1e-6, "sum"), rtol=1e-12, atol=0)
    _grads_finite(cosine, leaf)


@pytest.mark.parametrize("form", ["pairwise", "span", "cosine"])
def test_orthogonality_uses_token_order(form):
    y, kept, _ = _slots(T=8, K=3, seed=70)
    kept[:] = True

    def loss(x, k=kept):
        return obj.orthogonality_loss(outputs_TKM=x, kept_TK=k, form=form, reduction="sum")

    per_token = torch.stack([loss(y[t:t + 1], kept[t:t + 1]) for t in range(8)])
    torch.testing.assert_close(loss(y), per_token.sum(), rtol=1e-12, atol=0)
    perm = torch.randperm(8, generator=_gen(71))
    torch.testing.assert_close(loss(y[perm]), loss(y), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss(y[:, torch.tensor([2, 0, 1])]), loss(y), rtol=1e-12, atol=0)
    swapped = y.clone()
    swapped[0, 1], swapped[1, 1] = y[1, 1], y[0, 1]        # one slot moved to the wrong token
    assert not torch.allclose(loss(swapped), loss(y), rtol=1e-6)
    expert_major = y.transpose(0, 1).reshape(8, 3, -1)       # [K, T, D] buffer read as if token-major
    assert not torch.allclose(loss(expert_major), loss(y), rtol=1e-6)


def test_orthogonality_ignores_dropped_slots_and_padding():
    y, kept, mask = _slots(seed=80)
    garbage = y.clone()
    garbage[~kept] = 1e3
    garbage[~mask] = -7.0
    for form in ("pairwise", "span", "cosine"):
        a = obj.orthogonality_loss(outputs_TKM=y, kept_TK=kept, mask_T=mask, form=form)
        b = obj.orthogonality_loss(outputs_TKM=garbage, kept_TK=kept, mask_T=mask, form=form)
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    one_slot = torch.zeros_like(kept)
    one_slot[:, 0] = True
    assert obj.orthogonality_loss(outputs_TKM=y, kept_TK=one_slot).item() == 0.0


# --------------------------------------------------------------------------- variance

def test_topk_score_matrix_matches_naive():
    T, K, E = 9, 2, 5
    indices = torch.stack([torch.randperm(E, generator=_gen(90 + t))[:K] for t in range(T)])
    weights = _randn(T, K, seed=91).softmax(-1)
    kept = torch.rand(T, K, generator=_gen(92)) > 0.3
    _compare(lambda w: obj.topk_score_matrix(indices_TK=indices, weights_TK=w, kept_TK=kept, num_experts=E),
             lambda w: naive_topk(indices, w, kept, E), [weights])
    dropped = obj.topk_score_matrix(indices_TK=indices, weights_TK=weights, kept_TK=kept, num_experts=E)
    assert dropped.gather(1, indices)[~kept].abs().max() == 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_variance_forms_match_naive(reduction, use_mask):
    scores = _randn(10, 6, seed=100).softmax(-1)
    probs = _randn(10, 6, seed=101).softmax(-1)
    mask = (torch.rand(10, generator=_gen(102)) > 0.3) if use_mask else None
    _compare(lambda s: obj.variance_loss(scores_TE=s, mask_T=mask, reduction=reduction),
             lambda s: naive_var_tokens(s, mask, reduction), [scores])
    _compare(lambda p: obj.variance_loss(probs_TE=p, mask_T=mask, form="experts", reduction=reduction),
             lambda p: naive_var_experts(p, mask, reduction), [probs])


def test_variance_forms_differ_when_tokens_route_alike():
    row = torch.tensor([0.7, 0.3, 0.0, 0.0], dtype=DT)
    same = row.expand(12, 4).clone()
    assert abs(obj.variance_loss(scores_TE=same).item()) < 1e-30
    experts = obj.variance_loss(probs_TE=same, form="experts")
    torch.testing.assert_close(experts, -row.var(), rtol=1e-14, atol=0)
    assert experts.item() < 0


def test_variance_ignores_padding_and_requires_inputs():
    scores = _randn(10, 4, seed=110).softmax(-1)
    mask = torch.rand(10, generator=_gen(111)) > 0.4
    garbage = torch.where(mask[:, None], scores, 5.0)
    for form, key in (("tokens", "scores_TE"), ("experts", "probs_TE")):
        a = obj.variance_loss(**{key: scores}, mask_T=mask, form=form)
        b = obj.variance_loss(**{key: garbage}, mask_T=mask, form=form)
        c = obj.variance_loss(**{key: scores[mask]}, form=form)
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="scores_TE"):
        obj.variance_loss(probs_TE=scores)
    with pytest.raises(ValueError, match="probs_TE"):
        obj.variance_loss(scores_TE=scores, form="experts")
