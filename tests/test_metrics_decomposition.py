"""ds_moe_div.metrics.decomposition (Proposition 1 on explicit units) against naive loop references (float64).

    .venv/bin/python -m pytest tests/test_metrics_decomposition.py -q
"""
from __future__ import annotations

import pytest
import torch

from ds_moe_div import objectives as obj
from ds_moe_div.metrics import decomposition as dec
from tests.test_objectives import D_, DT, E_, L_, _batch, _ed_chain, _randn, naive_entropy


def naive_decomposition(pbar_NE, domains_N, weights_N):
    units = [s for s in range(pbar_NE.shape[0]) if domains_N[s] >= 0]
    w_total = sum(float(weights_N[s]) for s in units)
    w = {s: float(weights_N[s]) / w_total for s in units}
    mix = sum(w[s] * pbar_NE[s] for s in units)
    d_total = naive_entropy(mix) - sum(w[s] * naive_entropy(pbar_NE[s]) for s in units)
    d_inter, d_intra = naive_entropy(mix), 0.0
    for d in sorted({int(domains_N[s]) for s in units}):
        members = [s for s in units if domains_N[s] == d]
        w_d = sum(w[s] for s in members)
        q_d = sum(w[s] / w_d * pbar_NE[s] for s in members)
        d_inter = d_inter - w_d * naive_entropy(q_d)
        d_intra = d_intra + w_d * (naive_entropy(q_d) - sum(w[s] / w_d * naive_entropy(pbar_NE[s]) for s in members))
    return d_total, d_inter, d_intra


def test_domain_sequence_means_matches_routing_sums():
    ids, logits = _batch(120)
    probs = logits.softmax(-1)
    for layer in range(L_):
        means, domains, weights = dec.domain_sequence_means(probs_TE=probs[layer], domain_ids_BS=ids)
        sums, counts = obj.domain_routing_sums(probs_LTE=probs, domain_ids_BS=ids, num_domains=D_)
        per_domain = torch.zeros(D_, E_, dtype=DT).index_add(0, domains, means)
        torch.testing.assert_close(per_domain, sums[layer], rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(torch.bincount(domains, minlength=D_).to(DT), counts, rtol=0, atol=0)
        token_counts = torch.zeros(D_, dtype=DT).index_add(0, domains, weights)
        torch.testing.assert_close(token_counts, torch.bincount(ids[ids >= 0], minlength=D_).to(DT))


@pytest.mark.parametrize("weighted", [False, True])
def test_decomposition_identity_and_naive(weighted):
    pbar = _randn(9, 5, seed=130, scale=2.0).softmax(-1)
    domains = torch.tensor([0, 2, 2, -1, 0, 4, 2, 0, 4])
    weights = torch.tensor([3.0, 1, 7, 2, 5, 2, 1, 1, 4], dtype=DT) if weighted else None
    got = dec.divergence_decomposition(seq_means_NE=pbar, seq_domains_N=domains, seq_weights_N=weights)
    ref = naive_decomposition(pbar, domains, torch.ones(9, dtype=DT) if weights is None else weights)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    d_total, d_inter, d_intra = got
    torch.testing.assert_close(d_total, d_inter + d_intra, rtol=1e-13, atol=0)
    assert d_inter > 0 and d_intra > 0


def test_decomposition_inter_equals_generalized_jsd():
    """D_inter is L_ED's generalised JSD when the unit weights match the average: token counts of units
    for average="token", uniform for average="sequence" (whose w_d is then the unit share)."""
    ids, logits = _batch(140, scale=2.0)
    probs = logits.softmax(-1)
    jsd = {avg: _ed_chain(logits, ids, avg, "generalized")[1] for avg in ("token", "sequence")}
    for layer in range(L_):
        means, domains, weights = dec.domain_sequence_means(probs_TE=probs[layer], domain_ids_BS=ids)
        _, inter_tok, _ = dec.divergence_decomposition(seq_means_NE=means, seq_domains_N=domains, seq_weights_N=weights)
        _, inter_seq, _ = dec.divergence_decomposition(seq_means_NE=means, seq_domains_N=domains)
        torch.testing.assert_close(inter_tok, jsd["token"][layer], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(inter_seq, jsd["sequence"][layer], rtol=1e-12, atol=1e-15)
        assert not torch.allclose(inter_tok, jsd["sequence"][layer], rtol=1e-3)


def test_decomposition_handles_no_labelled_units():
    out = dec.divergence_decomposition(seq_means_NE=torch.full((2, 3), 1 / 3, dtype=DT),
                                       seq_domains_N=torch.tensor([-1, -1]))
    assert all(x.item() == 0.0 for x in out)
