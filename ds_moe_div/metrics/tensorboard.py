"""Pictures of routing for TensorBoard: expert-load histograms and domain x expert heatmaps."""
from __future__ import annotations

from collections.abc import Sequence

from ds_moe_div.metrics.accumulator import RoutingStats
from ds_moe_div.metrics.figures import domain_expert_heatmap, layers_summary_figure


def log_routing_pictures(monitor, stats: RoutingStats, domain_names: Sequence[str], step: int) -> None:
    """Per-layer load histograms, per-layer heatmaps, and one cross-layer summary (rank 0 only)."""
    if not monitor.enabled:
        return
    matrices = stats.matrices()
    freqs = []
    for lid in stats.layer_ids:
        monitor.histogram(f"routing/load/layer_{lid}", matrices[f"routing/load/layer_{lid}"], step)
        freq = matrices[f"routing/frequency/layer_{lid}"]
        freqs.append(freq)
        monitor.image(f"routing/heatmap/layer_{lid}",
                      domain_expert_heatmap(freq, domain_names, title=f"step {step}", layer=lid), step)
    monitor.image("routing/heatmap/all_layers",
                  layers_summary_figure(freqs, domain_names, layer_ids=stats.layer_ids, title=f"step {step}"), step)
