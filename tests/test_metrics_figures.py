"""Heatmap figures render headless to real PNGs with the expected layout.

    .venv/bin/python -m pytest tests/test_metrics_figures.py -q
"""
from __future__ import annotations

import struct

import pytest
import torch

from ds_moe_div.fileio import write_figure
from ds_moe_div.metrics import figures
from ds_moe_div.metrics.routing import domain_expert_frequency

DOMAINS = ["web", "code", "math", "legal"]


def _png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def _freq(seed: int, num_experts: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    select_DE = torch.rand(len(DOMAINS), num_experts, generator=g).pow(4) * 100
    select_DE[2] = 0  # a domain absent from the window: a grey "n/a" row
    return domain_expert_frequency(select_DE=select_DE.double())


def test_heatmap_png_is_written_with_labels(tmp_path):
    fig = figures.domain_expert_heatmap(_freq(0), DOMAINS, title="selection frequency", layer=3)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == DOMAINS
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(j) for j in range(8)]
    assert ax.get_title() == "selection frequency — layer 3" and len(fig.axes) == 2  # + colorbar
    assert sum(t.get_text() == "n/a" for t in ax.texts) == 8 and len(ax.texts) == 32
    path = write_figure(fig, tmp_path / "sub" / "heatmap.png", dpi=120)
    width, height = _png_size(path)
    assert width > 400 and height > 200 and path.stat().st_size > 10_000
    assert list(path.parent.iterdir()) == [path]  # atomic write left no temporary file


def test_large_heatmap_is_not_annotated():
    fig = figures.domain_expert_heatmap(torch.rand(6, 64), [f"d{i}" for i in range(6)])
    assert len(fig.axes[0].texts) == 0
    assert len(fig.axes[0].get_xticklabels()) == 32  # every second expert id


def test_layers_summary_shares_one_colour_scale(tmp_path):
    freqs = [_freq(seed) for seed in range(5)]
    fig = figures.layers_summary_figure(freqs, DOMAINS, layer_ids=[1, 3, 5, 7, 9])
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 5
    top = max(float(f.nan_to_num(0).max()) for f in freqs)
    assert all(im.get_clim() == (0.0, pytest.approx(top)) for im in images)
    assert [ax.get_title() for ax in fig.axes if ax.images] == [f"layer {i}" for i in (1, 3, 5, 7, 9)]
    width, height = _png_size(write_figure(fig, tmp_path / "layers.png", dpi=120))
    assert width > height > 300


def test_wrong_number_of_domain_names_fails():
    with pytest.raises(ValueError, match="domain names"):
        figures.domain_expert_heatmap(_freq(0), DOMAINS[:3])
    with pytest.raises(ValueError, match="at least one layer"):
        figures.layers_summary_figure([], DOMAINS)
