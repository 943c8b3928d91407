"""Pictures of routing for TensorBoard: expert load (bars, per-expert scalars, histograms) and domain x
expert heatmaps."""
from __future__ import annotations

from collections.abc import Sequence

from ds_moe_div.metrics.accumulator import RoutingStats
from ds_moe_div.metrics.figures import domain_expert_heatmap, expert_load_figure, layers_summary_figure


def expert_load_scalars(stats: RoutingStats) -> dict[str, float]:
    """`routing/load/layer_<i>/expert_<j>`: expert j's share of layer i's top-k selections in the window
    (before the capacity limit; 1/E each when balanced). Layers without selections are left out."""
    matrices = stats.matrices()
    out = {}
    for lid in stats.layer_ids:
        load = matrices[f"routing/load/layer_{lid}"].double()
        total = float(load.sum())
        if total > 0:
            out.update({f"routing/load/layer_{lid}/expert_{j}": float(v) / total for j, v in enumerate(load)})
    return out


def log_routing_pictures(monitor, stats: RoutingStats, domain_names: Sequence[str], step: int) -> None:
    """Per-expert load (scalars and one bar image), per-layer load histograms, per-layer heatmaps, and one
    cross-layer summary (rank 0 only)."""
    if not monitor.enabled:
        return
    matrices = stats.matrices()
    monitor.scalars(expert_load_scalars(stats), step)
    loads = [matrices[f"routing/load/layer_{lid}"] for lid in stats.layer_ids]
    monitor.image("routing/load_bars", expert_load_figure(loads, layer_ids=stats.layer_ids, title=f"step {step}"),
                  step)
    freqs = []
    for lid in stats.layer_ids:
        monitor.histogram(f"routing/load/layer_{lid}", matrices[f"routing/load/layer_{lid}"], step)
        freq = matrices[f"routing/frequency/layer_{lid}"]
        freqs.append(freq)
        monitor.image(f"routing/heatmap/layer_{lid}",
                      domain_expert_heatmap(freq, domain_names, title=f"step {step}", layer=lid), step)
    monitor.image("routing/heatmap/all_layers",
                  layers_summary_figure(freqs, domain_names, layer_ids=stats.layer_ids, title=f"step {step}"), step)
