"""The orthogonality paper's metrics (metrics/paper.py) against naive loops and scikit-learn, and their
accumulation in the routing window (one all-reduce; 2 gloo ranks = the concatenated batch).

    .venv/bin/python -m pytest tests/test_metrics_paper.py -q
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from ds_moe_div.metrics import paper
from ds_moe_div.metrics.accumulator import RoutingAccumulator
from ds_moe_div.routing import RoutingRecord
from tests.dist_utils import run_on_ranks

E, K, M, LAYERS, DOMAINS = 5, 2, 6, 2, 3


def test_max_violation_is_max_over_mean_minus_one():
    load = torch.tensor([[4.0, 4.0, 4.0, 4.0], [10.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    got = paper.max_violation(load_E=load)
    assert got[0] == 0.0 and got[1] == pytest.approx(10 / 4 - 1) and math.isnan(got[2])
    cumulative = torch.tensor([[1.0, 2.0], [4.0, 2.0], [4.0, 7.0]])
    assert torch.equal(paper.step_loads(cumulative_load_GLE=cumulative), torch.tensor([[1.0, 2.0], [3.0, 0.0],
                                                                                       [0.0, 5.0]]))


def test_routing_variance_against_a_loop():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(9, E, generator=g).softmax(-1)
    mask = torch.rand(9, generator=g) > 0.3
    want = [sum((float(p) - float(row.mean())) ** 2 for p in row) / (E - 1) for row, m in zip(probs, mask) if m]
    assert float(paper.routing_variance(probs_TE=probs, mask_T=mask)) == pytest.approx(sum(want) / len(want))
    one_hot = torch.eye(E)
    assert float(paper.routing_variance(probs_TE=one_hot)) == pytest.approx(1 / E)


def test_expert_overlap_against_a_loop():
    g = torch.Generator().manual_seed(1)
    k = 3
    outputs = torch.randn(7, k, M, generator=g)
    kept = torch.rand(7, k, generator=g) > 0.3
    kept[0] = torch.tensor([True, False, False])  # one kept expert: not counted
    mask = torch.ones(7, dtype=torch.bool)
    mask[1] = False
    per_token = []
    for t in range(7):
        slots = [i for i in range(k) if kept[t, i]]
        if len(slots) < 2 or not mask[t]:
            continue
        cos = [abs(float(torch.nn.functional.cosine_similarity(outputs[t, i], outputs[t, j], dim=0)))
               for i, j in itertools.permutations(slots, 2)]
        per_token.append(sum(cos) / len(cos))
    got = paper.expert_overlap(outputs_TKM=outputs, kept_TK=kept, mask_T=mask)
    assert float(got) == pytest.approx(sum(per_token) / len(per_token), rel=1e-5)
    orth = torch.eye(M)[:2].expand(4, 2, M)
    assert float(paper.expert_overlap(outputs_TKM=orth, kept_TK=torch.ones(4, 2, dtype=torch.bool))) == 0.0
    assert math.isnan(float(paper.expert_overlap(outputs_TKM=outputs[:, :1], kept_TK=kept[:, :1])))


def test_coselection_jaccard_against_token_sets():
    g = torch.Generator().manual_seed(2)
    indices = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(11)])
    weight = (torch.rand(11, generator=g) > 0.2).double()
    counts = paper.coselection_counts_EE(indices_TK=indices, num_experts=E, weight_T=weight)
    sets = [{t for t in range(11) if weight[t] and j in indices[t].tolist()} for j in range(E)]
    pairs = [len(sets[i] & sets[j]) / len(sets[i] | sets[j]) for i, j in itertools.combinations(range(E), 2)
             if sets[i] | sets[j]]
    assert float(paper.coselection_jaccard(coselect_EE=counts)) == pytest.approx(sum(pairs) / len(pairs))
    assert [counts[j, j] for j in range(E)] == [len(s) for s in sets]


@pytest.mark.parametrize("clusters", [2, 4])
def test_silhouette_matches_scikit_learn_cosine(clusters):
    from sklearn.metrics import silhouette_score

    g = torch.Generator().manual_seed(clusters)
    labels = torch.randint(0, clusters, (60,), generator=g)
    centres = torch.randn(clusters, M, generator=g) * 2
    features = centres[labels] + torch.randn(60, M, generator=g)
    labels[0] = 17  # a singleton cluster scores 0
    want = silhouette_score(features.double().numpy(), labels.numpy(), metric="cosine")
    assert float(paper.silhouette(features_NM=features, labels_N=labels)) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert math.isnan(float(paper.silhouette(features_NM=features, labels_N=torch.zeros(60, dtype=torch.long))))


def _records(g, num_tokens, with_outputs=True):
    records = []
    for layer_id in range(LAYERS):
        logits = torch.randn(num_tokens, E, generator=g) * 2
        probs = logits.softmax(-1)
        weights, indices = probs.topk(K, -1)
        kept = torch.rand(num_tokens, K, generator=g) > 0.2
        outputs = torch.randn(num_tokens, K, M, generator=g) * kept[..., None] if with_outputs else None
        records.append(RoutingRecord(layer_id=layer_id, logits_TE=logits, probs_TE=probs, indices_TK=indices,
                                     weights_TK=weights, kept_TK=kept, l_aux=torch.zeros(()),
                                     expert_outputs_TKM=outputs))
    return records


def _steps(seed, shapes_per_step):
    """[[(records, domain_ids_BS) per micro-batch] per optimizer step]; domain -1 = padding."""
    g = torch.Generator().manual_seed(seed)
    return [[(_records(g, b * s), torch.randint(-1, DOMAINS, (b, s), generator=g)) for b, s in step]
            for step in shapes_per_step]


def _accumulate(steps, window_steps=4):
    acc = RoutingAccumulator(num_layers=LAYERS, num_domains=DOMAINS, num_experts=E, k=K, window_steps=window_steps)
    for step in steps:
        for records, ids in step:
            acc.add(records, ids)
        acc.end_step()
    return acc


def _expected(steps_by_rank):
    """The paper metrics per layer, computed directly on each step's concatenated global batch."""
    n_steps = len(steps_by_rank[0])
    out = {}
    for layer in range(LAYERS):
        maxvio, probs, outputs, kept, indices = [], [], [], [], []
        for s in range(n_steps):
            load = torch.zeros(E, dtype=torch.float64)
            for rank_steps in steps_by_rank:
                for records, ids in rank_steps[s]:
                    r, mask = records[layer], ids.reshape(-1) >= 0
                    load += torch.bincount(r.indices_TK[mask].reshape(-1), minlength=E).double()
                    for parts, value in ((probs, r.probs_TE), (outputs, r.expert_outputs_TKM), (kept, r.kept_TK),
                                         (indices, r.indices_TK)):
                        parts.append(value[mask])
            maxvio.append(float(load.max() / load.mean() - 1))
        probs, outputs, kept, indices = (torch.cat(x) for x in (probs, outputs, kept, indices))
        out.setdefault("max_violation_global", []).append(sum(maxvio) / len(maxvio))
        out.setdefault("routing_variance", []).append(float(paper.routing_variance(probs_TE=probs)))
        out.setdefault("expert_overlap", []).append(float(paper.expert_overlap(outputs_TKM=outputs, kept_TK=kept)))
        out.setdefault("coselection_jaccard", []).append(float(paper.coselection_jaccard(
            coselect_EE=paper.coselection_counts_EE(indices_TK=indices, num_experts=E))))
    return out


RANK_STEPS = {0: (20, [[(2, 5), (1, 7)], [(3, 4)], [(2, 6), (2, 3)]]),
              1: (21, [[(1, 9)], [(2, 5), (1, 4)], [(4, 2)]])}


def test_window_paper_metrics_equal_direct_computation_per_step():
    steps = _steps(*RANK_STEPS[0])
    stats = _accumulate(steps).local_stats()
    got = stats.paper_per_layer()
    for name, values in _expected([steps]).items():
        assert got[name].tolist() == pytest.approx(values, rel=1e-6), name  # overlap: fp32 cosines
    assert stats.step_load_GLE.shape == (3, LAYERS, E)
    # Without step boundaries (an evaluation) MaxVio_global is that of the whole window.
    flat = RoutingAccumulator(num_layers=LAYERS, num_domains=DOMAINS, num_experts=E, k=K)
    for step in steps:
        for records, ids in step:
            flat.add(records, ids)
    load = flat.local_stats().select_LDE.sum(1)
    assert flat.local_stats().paper_per_layer()["max_violation_global"].tolist() == \
        pytest.approx((load.amax(-1) / load.mean(-1) - 1).tolist())
    with pytest.raises(ValueError, match="window_steps"):
        _accumulate(steps, window_steps=2)
    scalars = stats.scalars(["a", "b", "c"])
    for name in ("max_violation_global", "routing_variance", "expert_overlap", "coselection_jaccard"):
        assert f"routing/{name}/layer_1" in scalars and f"routing/{name}/mean" in scalars


def _reduce_on_rank(rank, world_size):
    import torch.distributed as dist
    acc = _accumulate(_steps(*RANK_STEPS[rank]))
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda tensor, *a, **kw: calls.append(tensor.numel()) or original(tensor, *a, **kw)
    try:
        stats = acc.reduce(dist.group.WORLD)
    finally:
        dist.all_reduce = original
    return {"calls": calls, "paper": {k: v.tolist() for k, v in stats.paper_per_layer().items()},
            "output_norm": stats.per_layer()["expert_output_norm"].tolist()}


@pytest.mark.slow
def test_two_ranks_equal_the_concatenated_global_batch_with_one_all_reduce():
    results = run_on_ranks(_reduce_on_rank, world_size=2, timeout=120)
    expected = _expected([_steps(*RANK_STEPS[0]), _steps(*RANK_STEPS[1])])
    for res in results:
        assert len(res["calls"]) == 1
        for name, values in expected.items():
            assert res["paper"][name] == pytest.approx(values, rel=1e-6), name  # overlap: fp32 cosines
    # The selected experts' mean output norm rides in the same buffer (tests/test_metrics_output_norm.py).
    from tests.test_metrics_output_norm import naive_window_norms
    expected_norm = naive_window_norms(_steps(*RANK_STEPS[0]) + _steps(*RANK_STEPS[1]))
    for res in results:
        assert res["output_norm"] == pytest.approx(expected_norm, rel=1e-6)


def test_paper_metrics_can_be_switched_off():
    steps = _steps(*RANK_STEPS[0])
    acc = RoutingAccumulator(num_layers=LAYERS, num_domains=DOMAINS, num_experts=E, k=K, window_steps=4,
                             paper_metrics=False)
    for step in steps:
        for records, ids in step:
            acc.add(records, ids)
        acc.end_step()
    on = _accumulate(steps)
    assert acc._flat.numel() < on._flat.numel()
    scalars = acc.local_stats().scalars(["a", "b", "c"])
    assert "routing/mi/mean" in scalars and not any("routing_variance" in t or "global" in t for t in scalars)
    assert scalars["routing/mi/mean"] == on.local_stats().scalars(["a", "b", "c"])["routing/mi/mean"]
