"""Domain x expert heatmaps of routing frequency (methods spec, section 7), headless (Agg).

    .venv/bin/python -m pytest tests/test_metrics_figures.py -q

Figures are built with `matplotlib.figure.Figure` on an Agg canvas, never through pyplot: no
display, no global figure registry to leak from a long training run. Inputs are the matrices of
`RoutingStats.matrices()` (tensors or arrays); NaN rows (a domain absent from the window) are
drawn grey and labelled "n/a" instead of looking like "never routed".
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

CMAP = "viridis"          # sequential and perceptually uniform: dark = rarely chosen, yellow = often
MAX_ANNOTATED_CELLS = 160  # above this the numbers become unreadable; the colour carries the value


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


def _draw(ax, data_DE: np.ndarray, domain_names: Sequence[str], vmax: float, *,
          show_domains: bool = True):
    num_domains, num_experts = data_DE.shape
    if len(domain_names) != num_domains:
        raise ValueError(f"{len(domain_names)} domain names for a matrix with {num_domains} rows")
    image = ax.imshow(np.ma.masked_invalid(data_DE), cmap=_cmap(), vmin=0.0, vmax=vmax,
                      aspect="auto", interpolation="nearest")
    step = max(1, math.ceil(num_experts / 32))
    ax.set_xticks(range(0, num_experts, step), [str(j) for j in range(0, num_experts, step)],
                  fontsize=8 if num_experts > 16 else 9)
    ax.set_yticks(range(num_domains), list(domain_names) if show_domains else [""] * num_domains)
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


def domain_expert_heatmap(freq_DE, domain_names: Sequence[str], *, title: str = "top-k selection frequency",
                          layer: int | None = None, vmax: float | None = None,
                          colorbar_label: str = "share of the domain's selections") -> Figure:
    """One layer's domain x expert matrix (rows: domains, columns: expert ids) with a colorbar; cells
    are annotated with their value when the matrix has <= MAX_ANNOTATED_CELLS cells. vmax defaults to
    the matrix maximum (colour scale starts at 0)."""
    data = _as_array(freq_DE)
    num_domains, num_experts = data.shape
    fig = _figure(min(2.5 + 0.55 * num_experts, 18.0), min(1.6 + 0.45 * num_domains, 12.0))
    ax = fig.add_subplot()
    image = _draw(ax, data, domain_names, _vmax([data], vmax))
    ax.set_ylabel("domain")
    ax.set_title(title if layer is None else f"{title} — layer {layer}")
    fig.colorbar(image, ax=ax, label=colorbar_label, fraction=0.05, pad=0.02)
    return fig


def layers_summary_figure(freqs_DE: Sequence, domain_names: Sequence[str], *,
                          layer_ids: Sequence[int] | None = None, title: str = "top-k selection frequency",
                          vmax: float | None = None, ncols: int | None = None,
                          colorbar_label: str = "share of the domain's selections") -> Figure:
    """A grid with one heatmap per layer and ONE shared colour scale (0 .. max over all layers), so
    layers compare by colour; domain names on the first column only."""
    arrays = [_as_array(f) for f in freqs_DE]
    if not arrays:
        raise ValueError("layers_summary_figure needs at least one layer")
    layer_ids = list(range(len(arrays))) if layer_ids is None else list(layer_ids)
    ncols = ncols or min(len(arrays), 3)
    nrows = math.ceil(len(arrays) / ncols)
    num_domains, num_experts = arrays[0].shape
    panel_w, panel_h = min(1.2 + 0.45 * num_experts, 10.0), min(1.0 + 0.4 * num_domains, 8.0)
    fig = _figure(ncols * panel_w + 1.5, nrows * panel_h + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    top = _vmax(arrays, vmax)
    for i, ax in enumerate(axes.flat):
        if i >= len(arrays):
            ax.set_axis_off()
            continue
        image = _draw(ax, arrays[i], domain_names, top, show_domains=i % ncols == 0)
        ax.set_title(f"layer {layer_ids[i]}", fontsize=10)
        if i % ncols == 0:
            ax.set_ylabel("domain")
    fig.suptitle(title)
    fig.colorbar(image, ax=axes, label=colorbar_label, fraction=0.04, pad=0.02)
    return fig
