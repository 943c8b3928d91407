"""RoutingAccumulator against a token-by-token loop, the objectives' Proposition-1 helper, and its tags.

    .venv/bin/python -m pytest tests/test_metrics_accumulator.py -q

`random_window` is shared with tests/test_metrics_distributed.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from ds_moe_div.metrics import decomposition as dec
from ds_moe_div.metrics.accumulator import RoutingAccumulator
from ds_moe_div.routing import RoutingRecord

DT = torch.float64
NUM_LAYERS, NUM_DOMAINS, NUM_EXPERTS, K = 2, 4, 6, 2
LAYER_IDS = (1, 3)
DOMAINS = ("web", "code", "math", "legal")


def random_records(g: torch.Generator, domain_ids_BS: torch.Tensor) -> list[RoutingRecord]:
    """One micro-batch of fake routing: domain-biased logits, top-k, ~20% of slots dropped."""
    num_tokens = domain_ids_BS.numel()
    bias_DE = torch.randn(NUM_DOMAINS, NUM_EXPERTS, generator=g) * 2
    records = []
    for layer_id in LAYER_IDS:
        logits = torch.randn(num_tokens, NUM_EXPERTS, generator=g) + bias_DE[domain_ids_BS.reshape(-1).clamp(min=0)]
        probs = logits.softmax(-1)
        weights, indices = probs.topk(K, dim=-1)
        kept = torch.rand(num_tokens, K, generator=g) > 0.2
        records.append(RoutingRecord(layer_id=layer_id, logits_TE=logits, probs_TE=probs, indices_TK=indices,
                                     weights_TK=torch.where(kept, weights, 0.0), kept_TK=kept,
                                     l_aux=torch.zeros(()), capacity=num_tokens))
    return records


def random_window(seed: int, shapes: list[tuple[int, int]], domains: tuple[int, ...] = (0, 1, 2, 3)):
    """Micro-batches [(records, domain_ids_BS)] of the given [B, S] shapes; ids drawn from `domains`
    and -1 (padding)."""
    g = torch.Generator().manual_seed(seed)
    choices = torch.tensor((-1,) + tuple(domains))
    window = []
    for batch, seq in shapes:
        ids_BS = choices[torch.randint(0, len(choices), (batch, seq), generator=g)]
        window.append((random_records(g, ids_BS), ids_BS))
    return window


def accumulate(window) -> RoutingAccumulator:
    acc = RoutingAccumulator(num_layers=NUM_LAYERS, num_domains=NUM_DOMAINS, num_experts=NUM_EXPERTS, k=K)
    for records, ids_BS in window:
        acc.add(records, ids_BS)
    return acc


def _loop_counts(window):
    select = torch.zeros(NUM_LAYERS, NUM_DOMAINS, NUM_EXPERTS, dtype=DT)
    kept, prob_sum = select.clone(), select.clone()
    tokens, padding = torch.zeros(NUM_DOMAINS, dtype=DT), 0
    for records, ids_BS in window:
        for t, d in enumerate(ids_BS.reshape(-1).tolist()):
            if d < 0:
                padding += 1
                continue
            tokens[d] += 1
            for layer, r in enumerate(records):
                prob_sum[layer, d] += r.probs_TE[t].to(DT)
                for slot in range(K):
                    select[layer, d, r.indices_TK[t, slot]] += 1
                    kept[layer, d, r.indices_TK[t, slot]] += float(r.kept_TK[t, slot])
    return select, kept, prob_sum, tokens, padding


def test_counts_match_token_loop_and_padding_is_excluded():
    window = random_window(0, [(3, 7), (2, 5)])
    stats = accumulate(window).local_stats()
    select, kept, prob_sum, tokens, padding = _loop_counts(window)
    assert torch.equal(stats.select_LDE, select) and torch.equal(stats.kept_LDE, kept)
    assert torch.allclose(stats.prob_sum_LDE, prob_sum, rtol=1e-12)
    assert torch.equal(stats.tokens_D, tokens) and stats.padding_tokens == padding > 0
    assert stats.micro_batches == 2 and stats.layer_ids == LAYER_IDS
    assert torch.equal(stats.select_LDE.sum(-1), K * tokens.expand(NUM_LAYERS, -1))


def test_window_decomposition_equals_the_unit_decomposition_on_the_windows_units():
    window = random_window(1, [(4, 9), (3, 6), (2, 11)])
    per_layer = accumulate(window).local_stats().per_layer()
    for layer in range(NUM_LAYERS):
        units = [dec.domain_sequence_means(probs_TE=records[layer].probs_TE.to(DT), domain_ids_BS=ids_BS)
                 for records, ids_BS in window]
        means, domains, weights = (torch.cat(parts) for parts in zip(*units))
        expected = dec.divergence_decomposition(seq_means_NE=means, seq_domains_N=domains, seq_weights_N=weights)
        got = [per_layer[name][layer] for name in ("d_total", "d_inter", "d_intra")]
        for g, e in zip(got, expected):
            assert float(g) == pytest.approx(float(e), rel=1e-9, abs=1e-12)
        assert float(got[0]) > float(got[1]) > 0


def test_scalars_tags_values_and_absent_domain():
    window = random_window(2, [(3, 8), (3, 8)], domains=(0, 1, 3))  # "math" never occurs
    stats = accumulate(window).local_stats()
    scalars = stats.scalars(DOMAINS)
    metrics = ("mi", "mi_normalized", "mi_normalized_min", "purity", "max_violation", "load_cv",
               "dead_experts", "dropped_fraction", "d_total", "d_inter", "d_intra",
               "max_violation_global", "routing_variance", "coselection_jaccard")  # no expert outputs: no overlap
    expected = {f"routing/{m}/{suffix}" for m in metrics for suffix in ("layer_1", "layer_3", "mean")}
    expected |= {f"routing/entropy/{d}/{suffix}" for d in ("web", "code", "legal")
                 for suffix in ("layer_1", "layer_3", "mean")}
    expected |= {"routing/tokens", "routing/padding_fraction"}
    assert set(scalars) == expected
    per_layer = stats.per_layer()
    assert scalars["routing/mi/layer_3"] == pytest.approx(float(per_layer["mi"][1]))
    assert scalars["routing/mi/mean"] == pytest.approx(float(per_layer["mi"].mean()))
    assert scalars["routing/tokens"] == float(stats.tokens_D.sum())
    assert all(math.isfinite(v) for v in scalars.values())
    with pytest.raises(ValueError, match="domain names"):
        stats.scalars(DOMAINS[:3])


def test_matrices_shapes_and_normalisation():
    stats = accumulate(random_window(3, [(2, 10)], domains=(0, 1, 3))).local_stats()
    mats = stats.matrices()
    assert set(mats) == {f"routing/{m}/layer_{i}" for m in ("frequency", "mean_prob", "load", "kept_load")
                         for i in LAYER_IDS}
    freq = mats["routing/frequency/layer_1"]
    assert freq.shape == (NUM_DOMAINS, NUM_EXPERTS) and freq[2].isnan().all()
    assert torch.allclose(freq[[0, 1, 3]].sum(-1), torch.ones(3, dtype=DT))
    assert torch.allclose(mats["routing/mean_prob/layer_3"][[0, 1, 3]].sum(-1), torch.ones(3, dtype=DT))
    assert float(mats["routing/load/layer_1"].sum()) == K * float(stats.tokens_D.sum())
    assert bool((mats["routing/kept_load/layer_1"] <= mats["routing/load/layer_1"]).all())


def test_reset_reduce_without_distributed_and_input_checks():
    window = random_window(4, [(2, 6), (2, 6)])
    acc = accumulate(window)
    assert torch.equal(acc.reduce().select_LDE, acc.local_stats().select_LDE)  # no process group: local
    acc.reset()
    assert float(acc.local_stats().tokens_D.sum()) == 0 and acc.local_stats().micro_batches == 0
    records, ids_BS = window[0]
    with pytest.raises(ValueError, match="MoE layers"):
        acc.add(records[:1], ids_BS)
    with pytest.raises(ValueError, match="expected"):
        acc.add(list(reversed(records)), ids_BS)
    empty = RoutingAccumulator(num_layers=NUM_LAYERS, num_domains=NUM_DOMAINS, num_experts=NUM_EXPERTS, k=K)
    scalars = empty.reduce().scalars(DOMAINS)
    assert scalars["routing/tokens"] == 0 and scalars["routing/dead_experts/layer_0"] == NUM_EXPERTS
    assert "routing/mi/layer_0" not in scalars and "routing/padding_fraction" not in scalars


def test_add_needs_no_host_sync():
    # On the meta device any data-dependent host read (.item(), bool(), nonzero, bincount) raises,
    # so a successful add() shows the per-micro-step path never waits for the device.
    records, ids_BS = random_window(5, [(2, 5)])[0]
    fields = ("logits_TE", "probs_TE", "indices_TK", "weights_TK", "kept_TK", "l_aux")
    meta_records = [RoutingRecord(layer_id=r.layer_id, capacity=r.capacity,
                                  **{f: getattr(r, f).to("meta") for f in fields}) for r in records]
    acc = RoutingAccumulator(num_layers=NUM_LAYERS, num_domains=NUM_DOMAINS, num_experts=NUM_EXPERTS, k=K)
    acc.add(meta_records, ids_BS.to("meta"))
    acc.add(meta_records, ids_BS.to("meta"))
    assert acc._flat.device.type == "meta"
