"""Figures, tables and TensorBoard entries stay readable with many classes (the ~42 subdomains):
sorted and sized heatmaps, top-k tables instead of class-wide matrices, per-expert load."""
from __future__ import annotations

import math

import numpy as np
import torch

from ds_moe_div.evaluation import plots
from ds_moe_div.evaluation.report import plain, render_markdown, top_experts
from ds_moe_div.metrics import figures
from ds_moe_div.metrics.accumulator import RoutingAccumulator
from ds_moe_div.metrics.tensorboard import expert_load_scalars
from ds_moe_div.routing import RoutingRecord

D, E = 42, 8
NAMES = [f"subdomain_{d:02d}" for d in range(D)]


def _freq(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    freq = rng.random((D, E)) ** 6
    freq[5] = np.nan  # a class without held-out tokens
    return freq / np.nansum(freq, axis=1, keepdims=True)


def test_dominant_order_groups_rows_by_expert_then_share_with_empty_rows_last():
    data = np.array([[0.1, 0.9], [0.7, 0.3], [np.nan, np.nan], [0.6, 0.4], [0.2, 0.8], [0.0, 0.0]])
    assert figures.dominant_order(data) == [1, 3, 0, 4, 2, 5]


def test_many_row_heatmap_is_sorted_labelled_and_grows_with_the_rows():
    freq = _freq()
    fig = figures.domain_expert_heatmap(freq, NAMES, layer=0)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    order = figures.dominant_order(freq)
    assert labels == [NAMES[d] for d in order] and sorted(labels) == sorted(NAMES)
    dominant = [int(np.nanargmax(freq[d])) for d in order[:-1]]
    assert dominant == sorted(dominant) and labels[-1] == NAMES[5]
    assert "sorted by dominant expert" in ax.get_ylabel()
    height = fig.get_size_inches()[1]
    assert height / D >= 0.2  # >= 24 px a row at 120 dpi: a 7 pt label fits
    few = figures.domain_expert_heatmap(freq[:4], NAMES[:4])
    assert [t.get_text() for t in few.axes[0].get_yticklabels()] == NAMES[:4]  # few rows keep their order


def test_all_layers_heatmap_with_many_rows_is_one_row_of_panels_in_one_order():
    freqs = [_freq(seed) for seed in range(4)]
    fig = figures.layers_summary_figure(freqs, NAMES, layer_ids=[0, 1, 2, 3])
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4
    positions = [ax.get_position() for ax in panels]
    assert len({round(p.y0, 3) for p in positions}) == 1  # side by side
    labels = [t.get_text() for t in panels[0].get_yticklabels()]
    assert sorted(labels) == sorted(NAMES) and labels != NAMES
    assert fig.get_size_inches()[1] / D >= 0.2


def test_expert_load_bars_show_each_experts_share():
    fig = figures.expert_load_figure([torch.tensor([3.0, 1.0, 0.0, 4.0])], layer_ids=[2])
    ax = fig.axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == [3 / 8, 1 / 8, 0.0, 4 / 8] and ax.get_title() == "layer 2"


def test_per_expert_load_scalars_are_shares_of_each_layers_selections():
    acc = RoutingAccumulator(num_layers=1, num_domains=2, num_experts=4, k=1, layer_ids=(3,))
    probs = torch.full((4, 4), 0.25)
    record = RoutingRecord(layer_id=3, logits_TE=probs.log(), probs_TE=probs,
                           indices_TK=torch.tensor([[0], [0], [1], [3]]), kept_TK=torch.ones(4, 1, dtype=torch.bool),
                           weights_TK=torch.ones(4, 1), l_aux=torch.tensor(0.0))
    acc.add([record], torch.tensor([[0, 0, 1, 1]]))
    scalars = expert_load_scalars(acc.local_stats())
    assert scalars == {"routing/load/layer_3/expert_0": 0.5, "routing/load/layer_3/expert_1": 0.25,
                       "routing/load/layer_3/expert_2": 0.0, "routing/load/layer_3/expert_3": 0.25}


def _many_class_report() -> dict:
    freq = _freq()
    entry = {"mean": 1.0, "std": 0.1, "per_seed": [1.0], "per_domain": {n: {"mean": 0.1 * d, "std": 0.0}
                                                                          for d, n in enumerate(NAMES)}}
    return {"checkpoint": "ck", "run_dir": "run", "tag": "global_step10", "step": 10, "split": "test",
            "domain_column": "subdomain", "domain_names": NAMES, "tokens": 1000, "lm_loss": 2.0, "ppl": math.e ** 2,
            "per_domain": {n: {"lm_loss": 2.0, "ppl": 7.4, "tokens": 10} for n in NAMES},
            "delta_ppl": {"layer_0": entry, "layer_1": entry, "all_layers": entry},
            "permutations": {"kind": "derangement", "seeds": [0]}, "routing": {"routing/tokens": 1000.0},
            "routing_matrices": {f"layer_{i}": {"frequency": freq.tolist()} for i in range(2)}, "figures": [],
            "eval": {"max_batches": 4, "micro_batch_size": 8, "world_size": 1, "ep_size": 1, "dtype": "fp32",
                     "eval_capacity_factor": 2.0, "passes": 7, "seconds": 1.0},
            "config": {"objectives": {}, "data": {"domain_column": "subdomain"}}}


def test_report_tables_stay_narrow_with_many_classes():
    text = render_markdown(plain(_many_class_report()))
    widest = max(line.replace("\\|", "").count("|") - 1 for line in text.splitlines() if line.startswith("|"))
    assert widest <= 4  # class + 3 columns, never 42 + 2
    assert "## Top 3 experts per class" in text
    freq = _freq()
    best = int(np.nanargmax(freq[0]))
    row = next(line for line in text.splitlines() if line.startswith(f"| {NAMES[0]} |") and "%" in line)
    assert f"e{best} {freq[0, best]:.0%}" in row
    assert f"| {NAMES[5]} | n/a | n/a |" in text  # the class without tokens
    assert top_experts([[0.2, None, 0.5, 0.3]], k=2) == [[(2, 0.5), (3, 0.3)]]


def test_delta_ppl_with_many_classes_is_a_heatmap_not_42_bar_colours():
    report = _many_class_report()
    fig = plots.delta_ppl_figure(report["delta_ppl"], NAMES)
    ax = fig.axes[0]
    assert ax.images and not ax.patches
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "all tokens" and labels[1] == NAMES[-1]  # largest delta first
    few = plots.delta_ppl_figure({"layer_0": {"mean": 1.0, "std": 0.1, "per_domain": {"a": {"mean": 1.0, "std": 0}}}},
                                 ["a"])
    assert few.axes[0].patches and not few.axes[0].images
