"""Figures of one evaluation: expert-by-domain heatmaps per layer, the cross-layer summary, delta-PPL bars.

PNG files for report.md (paths relative to the report), and the same figures in TensorBoard. Heatmaps
come from `ds_moe_div.metrics.figures` (one colour scale, NaN rows grey and marked "n/a").
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ds_moe_div import fileio, rundir
from ds_moe_div.metrics.accumulator import RoutingStats
from ds_moe_div.metrics.figures import (
    MANY_ROWS,
    ROW_INCHES,
    domain_expert_heatmap,
    layers_summary_figure,
)

MANY_SERIES = 10  # more bar series than this reuse colours: delta-PPL per class becomes a heatmap

HEATMAP_TITLE = "held-out top-k selection frequency"


def routing_figures(stats: RoutingStats, domain_names: Sequence[str]) -> dict:
    """{name: Figure}: `heatmap_layer_<id>` per MoE layer and `heatmap_all_layers`."""
    matrices = stats.matrices()
    freqs = [matrices[f"routing/frequency/layer_{lid}"] for lid in stats.layer_ids]
    figures = {f"heatmap_layer_{lid}": domain_expert_heatmap(freq, domain_names, title=HEATMAP_TITLE, layer=lid)
               for lid, freq in zip(stats.layer_ids, freqs)}
    ncols = None if len(domain_names) >= MANY_ROWS else math.ceil(len(freqs) ** 0.5)  # many: side by side
    figures["heatmap_all_layers"] = layers_summary_figure(freqs, domain_names, layer_ids=stats.layer_ids,
                                                          title=HEATMAP_TITLE, ncols=ncols)
    return figures


def delta_ppl_figure(delta: dict, domain_names: Sequence[str]):
    """Grouped bars: delta-PPL per permuted layer (and all layers), one bar per domain plus overall,
    error bars = std over seeds. With more than MANY_SERIES domains: `delta_ppl_heatmap` instead."""
    if len(domain_names) > MANY_SERIES:
        return delta_ppl_heatmap(delta, domain_names)
    groups = list(delta)
    series = [("all tokens", [delta[g]["mean"] for g in groups], [delta[g]["std"] for g in groups])]
    series += [(name, [delta[g]["per_domain"][name]["mean"] for g in groups],
                [delta[g]["per_domain"][name]["std"] for g in groups]) for name in domain_names]
    fig = Figure(figsize=(min(3.0 + 0.9 * len(groups) * len(series) ** 0.5, 16.0), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for i, (label, means, stds) in enumerate(series):
        heights = [np.nan if m is None else m for m in means]
        errors = [0.0 if s is None else s for s in stds]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, yerr=errors, label=label,
               capsize=2, color="black" if i == 0 else None)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(x, [g.replace("_", " ") for g in groups])
    ax.set_ylabel("PPL(permuted) - PPL")
    ax.set_title("router-permutation delta-PPL (mean ± std over seeds)")
    ax.legend(fontsize=8, ncols=min(len(series), 4))
    return fig


def delta_ppl_heatmap(delta: dict, domain_names: Sequence[str]):
    """Rows: all tokens, then every domain sorted by its delta-PPL with all layers permuted (largest first);
    columns: the permuted layer(s); colour: mean delta-PPL over seeds (diverging around 0)."""
    groups = list(delta)
    last = groups[-1]
    key = [delta[last]["per_domain"][n]["mean"] for n in domain_names]
    order = sorted(range(len(domain_names)), key=lambda d: (key[d] is None, -(key[d] or 0.0)))
    rows = ["all tokens", *[domain_names[d] for d in order]]
    values = [[delta[g]["mean"] for g in groups]]
    values += [[delta[g]["per_domain"][domain_names[d]]["mean"] for g in groups] for d in order]
    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    fig = Figure(figsize=(3.5 + 1.1 * len(groups), 1.6 + ROW_INCHES * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bound = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
    image = ax.imshow(np.ma.masked_invalid(data), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(len(groups)), [g.replace("_", " ") for g in groups], fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title("router-permutation delta-PPL (mean over seeds)")
    fig.colorbar(image, ax=ax, label="PPL(permuted) - PPL", fraction=0.05, pad=0.02)
    return fig


def save_figures(figures: dict, out_dir: Path) -> list[str]:
    """Write each figure as figures/<name>.png under out_dir; return the paths relative to out_dir."""
    return [str(fileio.write_figure(fig, rundir.figure_path(out_dir, name), dpi=120).relative_to(out_dir))
            for name, fig in figures.items()]


def log_to_tensorboard(monitor, figures: dict, scalars: dict[str, float], *, step: int) -> None:
    """Scalars and figures under their tags at the checkpoint's step (rank 0)."""
    monitor.scalars(scalars, step)
    for name, fig in figures.items():
        monitor.image(name, fig, step)
    monitor.flush()


def ablation_figure(ablation: dict, keep_k: dict, domain_names: Sequence[str]):
    """Left: relative PPL change (PPL_masked / PPL - 1) of each evaluated domain (columns) when the top-m
    experts of a domain (rows) are masked; the diagonal is each domain's own experts. Right: keep-k."""
    masked = ablation.get("masked", {})
    panels = 1 + bool(keep_k)
    fig = Figure(figsize=(4.0 + 0.5 * len(domain_names) + 3.5 * (panels - 1), 1.6 + 0.45 * max(len(masked), 1)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, panels, 1)
    rows = list(masked)
    grid = np.array([[np.nan if masked[r]["per_domain"][c]["rel"] is None else masked[r]["per_domain"][c]["rel"]
                      for c in domain_names] for r in rows], dtype=float).reshape(len(rows), len(domain_names))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    middle = np.nanmean(grid) if np.isfinite(grid).any() else 0.0
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, "n/a" if np.isnan(value) else f"{value:+.2f}", ha="center", va="center", fontsize=7,
                color="black" if value > middle else "white")
    ax.set_xticks(range(len(domain_names)), domain_names, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [f"mask {r}" for r in rows])
    ax.set_title(f"expert ablation: PPL / PPL_base - 1 (top-{ablation.get('top_m')} experts per layer)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    if keep_k:
        ax = fig.add_subplot(1, panels, 2)
        labels = list(keep_k)
        series = [("all tokens", [keep_k[g]["rel"] for g in labels])]
        series += [(n, [keep_k[g]["per_domain"][n]["rel"] for g in labels]) for n in domain_names]
        width = 0.8 / len(series)
        x = np.arange(len(labels))
        for i, (label, values) in enumerate(series):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, [np.nan if v is None else v for v in values], width,
                   label=label, color="black" if i == 0 else None)
        ax.set_xticks(x, labels)
        ax.set_ylabel("PPL / PPL_base - 1")
        ax.set_title("keep-k evaluation", fontsize=9)
        ax.legend(fontsize=7)
    return fig
