"""The mean output norm of the selected experts (metrics/output_norm.py) against a loop; in the routing
window (one buffer, its tags, absent without expert outputs) and in the evaluation's specialisation sums.
Two ranks = the concatenated batch: tests/test_metrics_paper.py::test_two_ranks_equal_the_concatenated...

    .venv/bin/python -m pytest tests/test_metrics_output_norm.py -q
"""
from __future__ import annotations

import math

import pytest
import torch

from ds_moe_div.evaluation.specialisation import _overlap_sums
from ds_moe_div.metrics.accumulator import RoutingAccumulator
from ds_moe_div.metrics.output_norm import expert_output_norm, output_norm_sums
from tests.test_metrics_paper import DOMAINS, LAYERS, RANK_STEPS, E, K, _records, _steps


def naive_mean_norm(outputs_TKM, kept_TK, mask_T):
    total, slots = 0.0, 0
    for t in range(outputs_TKM.shape[0]):
        if mask_T is not None and not mask_T[t]:
            continue
        for k in range(outputs_TKM.shape[1]):
            if kept_TK[t, k]:
                total += math.sqrt(sum(float(x) ** 2 for x in outputs_TKM[t, k]))
                slots += 1
    return total / slots if slots else math.nan


def naive_window_norms(steps):
    """Per layer, the loop's mean norm over every labelled token of every micro-batch (concatenated)."""
    out = []
    for layer in range(LAYERS):
        parts = [(r[layer].expert_outputs_TKM, r[layer].kept_TK, ids.reshape(-1) >= 0)
                 for step in steps for r, ids in step]
        out.append(naive_mean_norm(*(torch.cat(x) for x in zip(*parts))))
    return out


def test_expert_output_norm_against_a_loop_and_dropped_slots_do_not_leak():
    g = torch.Generator().manual_seed(3)
    outputs = torch.randn(13, 3, 7, generator=g, dtype=torch.float64) * torch.rand(13, 3, 1, generator=g, dtype=torch.float64) * 4
    kept = torch.rand(13, 3, generator=g) > 0.3
    mask = torch.rand(13, generator=g) > 0.2
    for m in (None, mask):
        got = float(expert_output_norm(outputs_TKM=outputs, kept_TK=kept, mask_T=m))
        assert got == pytest.approx(naive_mean_norm(outputs, kept, m), rel=1e-12)
    garbage = outputs.clone()
    garbage[~kept] = float("inf")
    total, slots = output_norm_sums(outputs_TKM=garbage, kept_TK=kept, weight_T=mask)
    assert float(slots) == float((kept & mask[:, None]).sum())
    assert float(total / slots) == pytest.approx(naive_mean_norm(outputs, kept, mask), rel=1e-12)
    assert float(expert_output_norm(outputs_TKM=(3 * outputs).bfloat16(), kept_TK=kept)) == pytest.approx(
        3 * naive_mean_norm(outputs, kept, None), rel=1e-2)  # bf16 inputs: computed in fp32
    assert math.isnan(float(expert_output_norm(outputs_TKM=outputs, kept_TK=torch.zeros_like(kept))))


@pytest.mark.parametrize("paper_metrics", [True, False])
def test_window_norm_equals_the_loop_on_the_concatenated_window_and_its_tags(paper_metrics):
    steps = _steps(*RANK_STEPS[0])
    acc = RoutingAccumulator(num_layers=LAYERS, num_domains=DOMAINS, num_experts=E, k=K, window_steps=4,
                             paper_metrics=paper_metrics)
    for step in steps:
        for records, ids in step:
            acc.add(records, ids)
        acc.end_step()
    stats = acc.local_stats()
    expected = naive_window_norms(steps)
    assert stats.per_layer()["expert_output_norm"].tolist() == pytest.approx(expected, rel=1e-6)  # fp32 outputs
    scalars = stats.scalars(["a", "b", "c"])
    for layer, value in enumerate(expected):
        assert scalars[f"routing/expert_output_norm/layer_{layer}"] == pytest.approx(value, rel=1e-6)
    assert scalars["routing/expert_output_norm/mean"] == pytest.approx(sum(expected) / LAYERS, rel=1e-6)


def test_window_without_expert_outputs_logs_no_norm():
    g = torch.Generator().manual_seed(5)

    acc = RoutingAccumulator(num_layers=LAYERS, num_domains=DOMAINS, num_experts=E, k=K)
    acc.add(_records(g, 12, with_outputs=False), torch.randint(-1, DOMAINS, (3, 4), generator=g))
    stats = acc.local_stats()
    assert math.isnan(float(stats.per_layer()["expert_output_norm"][0]))
    assert not any("expert_output_norm" in tag for tag in stats.scalars(["a", "b", "c"]))


def test_evaluation_sums_carry_the_norm_next_to_the_overlap():
    steps = _steps(*RANK_STEPS[1])
    sums = None
    for step in steps:
        for records, ids in step:
            sums = _overlap_sums(records, ids.reshape(-1) >= 0, sums)
    norm_sum_L, slots_L = sums.view(4, LAYERS)[2:]
    assert (norm_sum_L / slots_L).tolist() == pytest.approx(naive_window_norms(steps), rel=1e-6)
