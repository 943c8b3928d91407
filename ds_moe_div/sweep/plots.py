"""Comparison plots of a sweep, headless (Agg, no pyplot), written atomically as PNG.

    plot_loss_curves(results, variants, out_dir / "loss_curves.png")
    plot_delta_ppl(summaries, out_dir / "delta_ppl_per_layer.png")
    plot_heatmaps(results, variants, out_dir / "heatmaps.png")     # None when no report has heatmaps

Loss curves: the mean over seeds per variant with a min-max band, at the steps every seed logged.
Heatmaps: the eval's own heatmap images (report.json "figures": {name: path relative to the report, or
absolute}, or a list of paths) of each variant's first evaluated seed, side by side.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ds_moe_div import fileio
from ds_moe_div.sweep.aggregate import CURVE_TAGS, RunResult, VariantSummary

MAX_HEATMAP_ROWS = 6


def _colour(i: int, n: int):
    return colormaps["tab10" if n <= 10 else "tab20"](i % (10 if n <= 10 else 20))


def _band(runs: list[RunResult], tag: str):
    series = [dict(r.curves[tag]) for r in runs if r.curves.get(tag)]
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if not steps:
        return None
    values = np.array([[s[step] for step in steps] for s in series])
    return np.array(steps), values.mean(0), values.min(0), values.max(0)


def plot_loss_curves(results: list[RunResult], variants, path: Path) -> Path | None:
    tags = [t for t in CURVE_TAGS if any(r.curves.get(t) for r in results)]
    if not tags:
        return None
    fig = Figure(figsize=(6.0 * len(tags), 4.2))
    for j, tag in enumerate(tags):
        ax = fig.add_subplot(1, len(tags), j + 1)
        for i, variant in enumerate(variants):
            band = _band([r for r in results if r.variant == variant], tag)
            if band is None:
                continue
            steps, mean, low, high = band
            colour = _colour(i, len(variants))
            ax.plot(steps, mean, color=colour, label=variant, lw=1.4, marker="o" if len(steps) < 8 else None)
            ax.fill_between(steps, low, high, color=colour, alpha=0.2, lw=0)
        ax.set(title=f"{tag} (mean, min-max over seeds)", xlabel="step", ylabel="nats/token")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8, ncol=2)
    return fileio.write_figure(fig, path, dpi=110, bbox_inches="tight")


def plot_delta_ppl(summaries: list[VariantSummary], path: Path) -> Path | None:
    layers = list(dict.fromkeys(k for s in summaries for k in s.mean if k.startswith("delta_ppl/layer_")))
    if not layers:
        return None
    fig = Figure(figsize=(max(6.0, 1.3 * len(layers) * max(1, len(summaries)) / 3), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(summaries))
    x = np.arange(len(layers))
    for i, s in enumerate(summaries):
        means = [s.mean.get(k, np.nan) for k in layers]
        stds = [0.0 if np.isnan(s.std.get(k, np.nan)) else s.std[k] for k in layers]
        ax.bar(x + (i - (len(summaries) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
               color=_colour(i, len(summaries)), label=s.variant)
    ax.set_xticks(x, [k.split("/")[1] for k in layers])
    ax.set(title="router-permutation ΔPPL per MoE layer (mean ± std over seeds)", ylabel="PPL permuted - PPL")
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(fontsize=8, ncol=2)
    return fileio.write_figure(fig, path, dpi=110, bbox_inches="tight")


def heatmap_images(result: RunResult) -> dict[str, Path]:
    """name -> image path of the heatmaps an eval report lists under "figures"."""
    figures = (result.report or {}).get("figures") or {}
    items = figures.items() if isinstance(figures, dict) else ((Path(str(p)).stem, p) for p in figures)
    found = {}
    for name, value in items:
        p = Path(str(value))
        p = p if p.is_absolute() else result.report_path.parent / p
        if "heatmap" in str(name) and p.suffix.lower() == ".png" and p.is_file():
            found[str(name)] = p
    return found


def plot_heatmaps(results: list[RunResult], variants, path: Path) -> Path | None:
    from matplotlib.image import imread

    firsts = {}
    for r in results:
        if r.report is not None and r.variant not in firsts and heatmap_images(r):
            firsts[r.variant] = heatmap_images(r)
    columns = [v for v in variants if v in firsts]
    if not columns:
        return None
    names = sorted({n for images in firsts.values() for n in images}, key=lambda n: ("all" not in n, n))
    names = names[:MAX_HEATMAP_ROWS]
    fig = Figure(figsize=(4.8 * len(columns), 3.4 * len(names)))
    for row, name in enumerate(names):
        for col, variant in enumerate(columns):
            ax = fig.add_subplot(len(names), len(columns), row * len(columns) + col + 1)
            ax.axis("off")
            if name in firsts[variant]:
                ax.imshow(imread(firsts[variant][name]))
            if row == 0:
                ax.set_title(variant, fontsize=10)
            if col == 0:
                ax.text(-0.02, 0.5, name, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=8)
    return fileio.write_figure(fig, path, dpi=110, bbox_inches="tight")


def plot_all(results: list[RunResult], summaries: list[VariantSummary], variants, out_dir: Path) -> list[Path]:
    made = [plot_loss_curves(results, variants, out_dir / "loss_curves.png"),
            plot_delta_ppl(summaries, out_dir / "delta_ppl_per_layer.png"),
            plot_heatmaps(results, variants, out_dir / "heatmaps.png")]
    return [p for p in made if p is not None]
