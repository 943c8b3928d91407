"""Domain x expert heatmaps of routing frequency (methods spec, section 7), headless (Agg).

    .venv/bin/python -m pytest tests/test_metrics_figures.py -q

Figures are built with `matplotlib.figure.Figure` on an Agg canvas, never through pyplot: no
display, no global figure registry to leak from a long training run. Inputs are the matrices of
`RoutingStats.matrices()` (tensors or arrays); NaN rows (a domain absent from the window) are
drawn grey and labelled "n/a" instead of looking like "never routed".

Many classes (the ~42 subdomains): from MANY_ROWS rows on, the rows are sorted by their dominant expert
(then by its share, descending; rows without data last), so classes that share an expert sit together,
and the figure grows with the rows (ROW_INCHES each, smaller labels) instead of squeezing them into a
fixed height; the all-layers figure then puts its layers side by side with one row order, so a class
reads across layers on one line.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

CMAP = "viridis"          # sequential and perceptually uniform: dark = rarely chosen, yellow = often
MAX_ANNOTATED_CELLS = 160  # above this the numbers become unreadable; the colour carries the value
MANY_ROWS = 16             # from here on rows are sorted by dominant expert and sized per row
ROW_INCHES = 0.24          # height of one row when there are many (a 7 pt label fits; 29 px at 120 dpi)
MAX_INCHES = 40.0


def _as_array(matrix) -> np.ndarray:
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu().double().numpy()
    return np.asarray(matrix, dtype=float)


def _cmap() -> Colormap:
    return colormaps[CMAP].with_extremes(bad="#d9d9d9")


def _vmax(arrays: Sequence[np.ndarray], vmax: float | None) -> float:
    if vmax is not None:
        return vmax
    finite = [a[np.isfinite(a)] for a in arrays]
    peak = max((float(f.max()) for f in finite if f.size), default=0.0)
    return peak if peak > 0 else 1.0


def dominant_order(data_DE) -> list[int]:
    """Row order: by dominant expert (argmax), then by that expert's share, descending; rows without data
    (all NaN or all 0) last, in their original order."""
    data = _as_array(data_DE)
    filled = np.nan_to_num(data, nan=-1.0)
    empty = [d for d in range(len(data)) if not (filled[d] > 0).any()]
    rows = [d for d in range(len(data)) if d not in empty]
    rows.sort(key=lambda d: (int(filled[d].argmax()), -float(filled[d].max()), d))
    return rows + empty


def _row_inches(num_domains: int) -> float:
    return 0.45 if num_domains < MANY_ROWS else ROW_INCHES


def _draw(ax, data_DE: np.ndarray, domain_names: Sequence[str], vmax: float, *,
          show_domains: bool = True):
    num_domains, num_experts = data_DE.shape
    if len(domain_names) != num_domains:
        raise ValueError(f"{len(domain_names)} domain names for a matrix with {num_domains} rows")
    many = num_domains >= MANY_ROWS
    image = ax.imshow(np.ma.masked_invalid(data_DE), cmap=_cmap(), vmin=0.0, vmax=vmax,
                      aspect="auto", interpolation="nearest")
    step = max(1, math.ceil(num_experts / 32))
    ax.set_xticks(range(0, num_experts, step), [str(j) for j in range(0, num_experts, step)],
                  fontsize=8 if num_experts > 16 else 9)
    ax.set_yticks(range(num_domains), list(domain_names) if show_domains else [""] * num_domains,
                  fontsize=7 if many else 9)
    ax.set_xlabel("expert")
    ax.tick_params(length=2)
    if data_DE.size <= MAX_ANNOTATED_CELLS:
        _annotate(ax, data_DE, vmax)
    return image


def _annotate(ax, data_DE: np.ndarray, vmax: float) -> None:
    size = 8 if data_DE.shape[1] <= 12 else 6
    for (d, j), value in np.ndenumerate(data_DE):
        if not np.isfinite(value):
            ax.text(j, d, "n/a", ha="center", va="center", fontsize=size, color="#555555")
            continue
        colour = "black" if value > 0.6 * vmax else "white"  # contrast with viridis' dark/light ends
        ax.text(j, d, f"{value:.2f}".lstrip("0") if value < 1 else f"{value:.1f}",
                ha="center", va="center", fontsize=size, color=colour)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _ordered(arrays: Sequence[np.ndarray], domain_names: Sequence[str], sort_rows: bool | None):
    """(arrays, names, sorted?) with the rows in dominant-expert order (of the mean over `arrays`)."""
    if len(domain_names) != arrays[0].shape[0]:
        raise ValueError(f"{len(domain_names)} domain names for a matrix with {arrays[0].shape[0]} rows")
    if not (len(domain_names) >= MANY_ROWS if sort_rows is None else sort_rows):
        return list(arrays), list(domain_names), False
    with warnings.catch_warnings():  # a row without data in every layer: its mean is NaN, sorted last
        warnings.simplefilter("ignore", RuntimeWarning)
        order = dominant_order(np.nanmean(np.stack(arrays), axis=0) if len(arrays) > 1 else arrays[0])
    return [a[order] for a in arrays], [domain_names[d] for d in order], True


def domain_expert_heatmap(freq_DE, domain_names: Sequence[str], *, title: str = "top-k selection frequency",
                          layer: int | None = None, vmax: float | None = None,
                          colorbar_label: str = "share of the domain's selections",
                          sort_rows: bool | None = None) -> Figure:
    """One layer's domain x expert matrix (rows: domains, columns: expert ids) with a colorbar; cells
    are annotated with their value when the matrix has <= MAX_ANNOTATED_CELLS cells. vmax defaults to
    the matrix maximum (colour scale starts at 0). sort_rows (None: from MANY_ROWS rows on) orders the
    rows by dominant expert."""
    (data,), names, ordered = _ordered([_as_array(freq_DE)], domain_names, sort_rows)
    num_domains, num_experts = data.shape
    height = min(1.6 + _row_inches(num_domains) * num_domains, MAX_INCHES)
    fig = _figure(min(2.5 + 0.55 * num_experts, 18.0) + (1.0 if ordered else 0.0), height)
    ax = fig.add_subplot()
    image = _draw(ax, data, names, _vmax([data], vmax))
    ax.set_ylabel("domain (sorted by dominant expert)" if ordered else "domain")
    ax.set_title(title if layer is None else f"{title} — layer {layer}")
    fig.colorbar(image, ax=ax, label=colorbar_label, fraction=0.05, pad=0.02)
    return fig


def layers_summary_figure(freqs_DE: Sequence, domain_names: Sequence[str], *,
                          layer_ids: Sequence[int] | None = None, title: str = "top-k selection frequency",
                          vmax: float | None = None, ncols: int | None = None,
                          colorbar_label: str = "share of the domain's selections",
                          sort_rows: bool | None = None) -> Figure:
    """A grid with one heatmap per layer and ONE shared colour scale (0 .. max over all layers), so
    layers compare by colour; domain names on the first column only. With many rows (or sort_rows) the
    rows follow the dominant expert of the mean over layers, and the layers stand in one row of panels
    (ncols = number of layers) so each class reads across the layers on one line."""
    arrays = [_as_array(f) for f in freqs_DE]
    if not arrays:
        raise ValueError("layers_summary_figure needs at least one layer")
    arrays, names, ordered = _ordered(arrays, domain_names, sort_rows)
    layer_ids = list(range(len(arrays))) if layer_ids is None else list(layer_ids)
    num_domains, num_experts = arrays[0].shape
    many = num_domains >= MANY_ROWS
    ncols = len(arrays) if many and ncols is None else (ncols or min(len(arrays), 3))
    nrows = math.ceil(len(arrays) / ncols)
    panel_w = min(1.2 + 0.45 * num_experts, 10.0)
    panel_h = min(1.0 + _row_inches(num_domains) * num_domains, MAX_INCHES) if many else min(1.0 + 0.4 * num_domains, 8.0)
    fig = _figure(ncols * panel_w + (3.0 if many else 1.5), min(nrows * panel_h + 0.6, 2 * MAX_INCHES))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    top = _vmax(arrays, vmax)
    for i, ax in enumerate(axes.flat):
        if i >= len(arrays):
            ax.set_axis_off()
            continue
        image = _draw(ax, arrays[i], names, top, show_domains=i % ncols == 0)
        ax.set_title(f"layer {layer_ids[i]}", fontsize=10)
        if i % ncols == 0:
            ax.set_ylabel("domain (sorted by dominant expert)" if ordered else "domain")
    fig.suptitle(title)
    fig.colorbar(image, ax=axes, label=colorbar_label, fraction=0.04, pad=0.02)
    return fig


def expert_load_figure(loads_E: Sequence, *, layer_ids: Sequence[int], title: str = "expert load") -> Figure:
    """One bar chart per layer: each expert's share of the layer's top-k selections (x: expert id), with
    the uniform share 1/E as a dashed line; which expert is over- or under-used reads off directly."""
    arrays = [_as_array(load) for load in loads_E]
    if not arrays:
        raise ValueError("expert_load_figure needs at least one layer")
    num_experts = arrays[0].shape[0]
    ncols = min(len(arrays), 4)
    nrows = math.ceil(len(arrays) / ncols)
    fig = _figure(ncols * min(1.5 + 0.3 * num_experts, 8.0), nrows * 2.4 + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    step = max(1, math.ceil(num_experts / 32))
    for i, ax in enumerate(axes.flat):
        if i >= len(arrays):
            ax.set_axis_off()
            continue
        total = arrays[i].sum()
        share = arrays[i] / total if total > 0 else np.zeros_like(arrays[i])
        ax.bar(range(num_experts), share, color="#3b528b")
        ax.axhline(1.0 / num_experts, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(0, num_experts, step), [str(j) for j in range(0, num_experts, step)], fontsize=8)
        ax.set_title(f"layer {layer_ids[i]}", fontsize=10)
        ax.set_xlabel("expert")
        if i % ncols == 0:
            ax.set_ylabel("share of selections")
    fig.suptitle(title)
    return fig
