"""fileio: every writer replaces the target whole or leaves it untouched, with no temporary file left."""
from __future__ import annotations

import json
import socket

import pytest
from matplotlib.figure import Figure

from ds_moe_div import fileio


def test_writers_create_parents_and_replace(tmp_path):
    target = tmp_path / "a" / "b.json"
    fileio.write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1} and target.read_text().endswith("\n")
    fileio.write_text(target, "plain")
    assert target.read_text() == "plain"
    fileio.write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["b.json"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        fileio.write_json(target, {"x": object()})  # not JSON-serialisable
    with pytest.raises(RuntimeError), fileio.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_figure_format_follows_the_suffix(tmp_path):
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    png = fileio.write_figure(fig, tmp_path / "f" / "plot.png", dpi=50)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fileio.write_figure(fig, tmp_path / "plot.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["plot.png", "plot.svg"]


def test_free_port_is_bindable():
    port = fileio.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    from ds_moe_div.fileio import atomic_dir

    target = tmp_path / "universal"
    with atomic_dir(target) as tmp:
        (tmp / "zero").mkdir()
        (tmp / "zero" / "a.pt").write_bytes(b"x")
        assert not target.exists()
    assert (target / "zero" / "a.pt").read_bytes() == b"x"
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "other") as tmp:
        (tmp / "half").write_text("partial")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["universal"]  # nothing left of the failed one
