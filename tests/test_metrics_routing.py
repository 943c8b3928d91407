"""Routing metrics on hand-built count matrices, against hand values and naive loop references.

    .venv/bin/python -m pytest tests/test_metrics_routing.py -q
"""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from ds_moe_div.metrics import routing as rm

DT = torch.float64
TOKENS_D = torch.tensor([10.0, 20.0, 30.0], dtype=DT)


def _specialised(k: int = 2) -> torch.Tensor:
    """Domain d always picks experts 2d and 2d+1 (E = 6, k = 2)."""
    select_DE = torch.zeros(3, 6, dtype=DT)
    for d in range(3):
        select_DE[d, 2 * d:2 * d + 2] = TOKENS_D[d]
    return select_DE


def _uniform(k: int = 2, num_experts: int = 6) -> torch.Tensor:
    return (k * TOKENS_D / num_experts)[:, None].expand(3, num_experts).clone()


def _entropy_ref(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def _mi_ref(select: list[list[float]]) -> float:
    total = sum(map(sum, select))
    row = [sum(r) / total for r in select]
    col = [sum(r[j] for r in select) / total for j in range(len(select[0]))]
    return sum(c / total * math.log(c / total / (row[d] * col[j]))
               for d, r in enumerate(select) for j, c in enumerate(r) if c > 0)


def test_specialised_router_mi_equals_domain_entropy_and_purity_is_one():
    select_DE = _specialised()
    mi, mi_norm, mi_norm_min = rm.routing_mutual_information(select_DE=select_DE)
    h_domain = _entropy_ref((TOKENS_D / TOKENS_D.sum()).tolist())
    assert float(mi) == pytest.approx(h_domain, rel=1e-12)
    assert float(mi_norm) == pytest.approx(1.0, rel=1e-12)
    assert float(mi_norm_min) == pytest.approx(1.0, rel=1e-12)
    assert torch.allclose(rm.expert_domain_purity_E(select_DE=select_DE), torch.ones(6, dtype=DT))
    assert float(rm.mean_expert_domain_purity(select_DE=select_DE)) == pytest.approx(1.0)
    assert torch.allclose(rm.domain_routing_entropy_D(select_DE=select_DE), torch.full((3,), math.log(2), dtype=DT))
    freq_DE = rm.domain_expert_frequency(select_DE=select_DE)
    assert torch.allclose(freq_DE.sum(-1), torch.ones(3, dtype=DT)) and float(freq_DE[1, 2]) == 0.5


def test_uniform_router_has_zero_mi_and_purity_equal_to_largest_domain_share():
    select_DE = _uniform()
    mi, mi_norm, _ = rm.routing_mutual_information(select_DE=select_DE)
    assert abs(float(mi)) < 1e-12 and abs(float(mi_norm)) < 1e-12
    assert torch.allclose(rm.expert_domain_purity_E(select_DE=select_DE), torch.full((6,), 0.5, dtype=DT))
    assert float(rm.mean_expert_domain_purity(select_DE=select_DE)) == pytest.approx(0.5)
    assert torch.allclose(rm.domain_routing_entropy_D(select_DE=select_DE), torch.full((3,), math.log(6), dtype=DT))
    assert float(rm.max_violation(select_DE=select_DE, tokens_D=TOKENS_D, k=2)) == pytest.approx(0.0, abs=1e-12)
    assert float(rm.load_cv(select_DE=select_DE)) == pytest.approx(0.0, abs=1e-12)
    assert float(rm.dead_experts(select_DE=select_DE)) == 0.0


def test_fewer_experts_than_domains_normalises_by_the_smaller_entropy():
    # 4 equal domains, k = 1; domains {0, 1} -> expert 0, {2, 3} -> expert 1: I = H(E) = log 2 < H(D) = log 4.
    select_DE = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [0.0, 5.0]], dtype=DT)
    mi, mi_norm, mi_norm_min = rm.routing_mutual_information(select_DE=select_DE)
    assert float(mi) == pytest.approx(math.log(2))
    assert float(mi_norm) == pytest.approx(0.5)
    assert float(mi_norm_min) == pytest.approx(1.0)


def test_random_counts_match_naive_loop_references():
    g = torch.Generator().manual_seed(0)
    select_DE = torch.randint(0, 50, (4, 7), generator=g).to(DT)
    select_DE[2, 3] = 0
    rows = select_DE.tolist()
    assert float(rm.routing_mutual_information(select_DE=select_DE)[0]) == pytest.approx(_mi_ref(rows), rel=1e-12)
    loads = [sum(r[j] for r in rows) for j in range(7)]
    purity_ref = [max(r[j] for r in rows) / loads[j] for j in range(7)]
    assert rm.expert_domain_purity_E(select_DE=select_DE).tolist() == pytest.approx(purity_ref)
    weighted = sum(p * x for p, x in zip(purity_ref, loads)) / sum(loads)
    assert float(rm.mean_expert_domain_purity(select_DE=select_DE)) == pytest.approx(weighted)
    entropy_ref = [_entropy_ref([x / sum(r) for x in r]) for r in rows]
    assert rm.domain_routing_entropy_D(select_DE=select_DE).tolist() == pytest.approx(entropy_ref)
    cv_ref = statistics.pstdev(loads) / statistics.mean(loads)
    assert float(rm.load_cv(select_DE=select_DE)) == pytest.approx(cv_ref)


def test_dropped_fraction_matches_hand_count():
    select_DE = torch.tensor([[4.0, 2.0, 0.0], [3.0, 5.0, 6.0]], dtype=DT)   # 20 slots
    kept_DE = torch.tensor([[4.0, 1.0, 0.0], [3.0, 3.0, 6.0]], dtype=DT)     # 17 kept: 3 dropped
    assert float(rm.dropped_fraction(select_DE=select_DE, kept_DE=kept_DE)) == pytest.approx(3 / 20)
    before_E, after_E = rm.tokens_per_expert(select_DE=select_DE, kept_DE=kept_DE)
    assert before_E.tolist() == [7.0, 7.0, 6.0] and after_E.tolist() == [7.0, 4.0, 6.0]


def test_max_violation_load_cv_and_dead_experts_hand_example():
    # k = 1, T = 8 tokens over E = 4 experts: ideal load 2; loads 5, 1, 2, 0.
    select_DE = torch.tensor([[3.0, 1.0, 2.0, 0.0], [2.0, 0.0, 0.0, 0.0]], dtype=DT)
    tokens_D = torch.tensor([6.0, 2.0], dtype=DT)
    assert float(rm.max_violation(select_DE=select_DE, tokens_D=tokens_D, k=1)) == pytest.approx(1.5)
    assert float(rm.load_cv(select_DE=select_DE)) == pytest.approx(math.sqrt(3.5) / 2)
    assert float(rm.dead_experts(select_DE=select_DE)) == 1.0
    all_on_one = torch.tensor([[8.0, 0.0, 0.0, 0.0]], dtype=DT)
    assert float(rm.max_violation(select_DE=all_on_one, tokens_D=torch.tensor([8.0]), k=1)) == pytest.approx(3.0)
    assert float(rm.dead_experts(select_DE=all_on_one)) == 3.0


def test_absent_domain_and_empty_window_give_nan_not_zero():
    select_DE = _specialised()
    select_DE[1] = 0
    tokens_D = TOKENS_D.clone()
    tokens_D[1] = 0
    assert rm.domain_routing_entropy_D(select_DE=select_DE)[1].isnan()
    assert rm.domain_expert_frequency(select_DE=select_DE)[1].isnan().all()
    prob_DE = rm.mean_router_prob_DE(prob_sum_DE=select_DE / 2, tokens_D=tokens_D)
    assert prob_DE[1].isnan().all() and not prob_DE[0].isnan().any()
    assert rm.expert_domain_purity_E(select_DE=select_DE)[2:4].isnan().all()  # domain 1's experts are dead
    assert float(rm.routing_mutual_information(select_DE=select_DE)[1]) == pytest.approx(1.0)
    empty = torch.zeros(3, 6, dtype=DT)
    assert rm.max_violation(select_DE=empty, tokens_D=torch.zeros(3, dtype=DT), k=2).isnan()
    assert rm.dropped_fraction(select_DE=empty, kept_DE=empty).isnan()
    assert rm.routing_mutual_information(select_DE=empty)[1].isnan()
    assert rm.load_cv(select_DE=empty).isnan()


def test_leading_layer_dimension_matches_per_layer_calls():
    select_LDE = torch.stack([_specialised(), _uniform(), _specialised() + _uniform()])
    prob_sum_LDE = select_LDE / 2
    unit_entropy_LD = torch.rand(3, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    batched = [rm.routing_mutual_information(select_DE=select_LDE)[0],
               rm.max_violation(select_DE=select_LDE, tokens_D=TOKENS_D, k=2),
               rm.window_divergence_decomposition(prob_sum_DE=prob_sum_LDE, tokens_D=TOKENS_D,
                                                  unit_entropy_sum_D=unit_entropy_LD)[2]]
    for layer in range(3):
        single = [rm.routing_mutual_information(select_DE=select_LDE[layer])[0],
                  rm.max_violation(select_DE=select_LDE[layer], tokens_D=TOKENS_D, k=2),
                  rm.window_divergence_decomposition(prob_sum_DE=prob_sum_LDE[layer], tokens_D=TOKENS_D,
                                                     unit_entropy_sum_D=unit_entropy_LD[layer])[2]]
        for b, s in zip(batched, single):
            assert float(b[layer]) == pytest.approx(float(s), rel=1e-12)


def test_window_decomposition_of_domain_pure_units_has_no_intra_part():
    # Every unit of a domain routes exactly like its domain mean: D_intra = 0, D_total = D_inter.
    q_DE = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=DT)
    tokens_D = torch.tensor([30.0, 10.0], dtype=DT)
    unit_entropy_D = tokens_D * torch.special.entr(q_DE).sum(-1)
    total, inter, intra = rm.window_divergence_decomposition(
        prob_sum_DE=q_DE * tokens_D[:, None], tokens_D=tokens_D, unit_entropy_sum_D=unit_entropy_D)
    assert float(intra) == pytest.approx(0.0, abs=1e-14)
    assert float(inter) == pytest.approx(_mi_ref((q_DE * tokens_D[:, None]).tolist()), rel=1e-12)
    assert float(total) == pytest.approx(float(inter), rel=1e-12)
