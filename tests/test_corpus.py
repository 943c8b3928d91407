"""Tests of the corpus builder (ds_moe_div/corpus) and the committed fixture mini_corpus.jsonl.gz.

pytest tests/test_corpus.py -m "not network"     # offline, seconds
pytest tests/test_corpus.py -m network           # a small real build from the registries
"""

from __future__ import annotations

import gzip
import json
import os
import socket
from collections import Counter
from pathlib import Path

import pytest

from ds_moe_div.corpus import build, dedup, fetch, sources, text
from ds_moe_div.corpus.readers import Item
from ds_moe_div.corpus.sources import DOMAINS, GROUPS, SOURCES, Part, Source

FIXTURE = Path(__file__).resolve().parents[1] / "ds_moe_div/assets/mini_corpus.jsonl.gz"
FIXTURE_LICENSES = {
    "LicenseRef-public-domain",
    "CC0-1.0",
    "BSD-3-Clause",
    "MIT OR Apache-2.0",
    "PSF-2.0 AND BSD-3-Clause",
}
MIT = (
    "Copyright (c) {year} {name}\n\nPermission is hereby granted, free of charge, to any person obtaining "
    "a copy of this software and associated documentation files (the Software), to deal in the Software "
    "without restriction, including without limitation the rights to use, copy, modify, merge, publish, "
    "distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the "
    "Software is furnished to do so. THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND."
)


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --- splitting ---------------------------------------------------------------------------------------


def test_split_prose_at_blank_lines_within_limit():
    paragraphs = [f"paragraph {i} " + "word " * 30 for i in range(20)]
    chunks = text.split_text("\n\n".join(paragraphs), max_chars=500, kind="prose")
    assert all(len(c) <= 500 for c in chunks)
    assert all(
        c.startswith("paragraph ") for c in chunks
    )  # every cut is at a paragraph start
    assert sum(c.count("paragraph ") for c in chunks) == 20


def test_split_code_at_line_ends_and_hard_cuts_long_lines():
    code = "\n".join(f"x_{i} = {i}" for i in range(1000)) + "\n" + "y" * 2500
    chunks = text.split_text(code, max_chars=1000, kind="code")
    assert all(len(c) <= 1000 for c in chunks)
    assert all(c.startswith(("x_", "y")) for c in chunks)
    assert "".join(chunks).count("y") == 2500


def test_split_short_text_is_one_chunk_and_blank_is_none():
    assert text.split_text("hello", max_chars=10) == ["hello"]
    assert text.split_text(" \n\n ", max_chars=10) == []
    with pytest.raises(ValueError):
        text.split_text("x", max_chars=0)


def test_normalise_and_markup_to_text():
    assert text.normalise("a  \r\nb\n\n\n\nc\t") == "a\nb\n\nc"
    assert "Hello world" in text.html_to_text(
        "<html><script>x()</script><p>Hello <b>world</b></p></html>"
    )
    assert "x()" not in text.html_to_text("<script>x()</script>")
    roff = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n'
    assert text.roff_to_text(roff).split() == [
        "NAME",
        "ls",
        "-",
        "list",
        "directory",
        "contents",
    ]


# --- dedup ---------------------------------------------------------------------------------------------


def test_license_near_variants_collapse_and_different_texts_stay():
    d = dedup.Deduplicator()
    assert not d.is_duplicate(MIT.format(year=2019, name="John Smith"))
    assert d.is_duplicate(MIT.format(year=2021, name="Jane Q. Doe"))
    assert d.is_duplicate(
        "  " + MIT.format(year=2019, name="John Smith").upper()
    )  # exact after folding
    assert not d.is_duplicate(
        "Call me Ishmael. Some years ago, never mind how long precisely, having little"
    )
    assert (d.exact_hits, d.near_hits) == (1, 1)


def test_minhash_is_deterministic_and_none_for_tiny_texts():
    assert dedup.minhash("too short") is None
    a, b = (
        dedup.minhash(MIT.format(year=1, name="A")),
        dedup.minhash(MIT.format(year=1, name="A")),
    )
    assert (a == b).all()


# --- builder on fake sources (no network) -----------------------------------------------------------


def fake_source(subdomain: str, files: dict[str, str], **kwargs) -> Source:
    def reader(ctx):
        return [Item(name, lambda t=body: t) for name, body in files.items()]

    return Source(
        subdomain,
        kwargs.get("domain", "prose"),
        kwargs.get("group", "literature"),
        "CC0-1.0",
        (Part((), reader),),
        kwargs.get("split", "prose"),
    )


def prose_files(n: int, words: int = 200) -> dict[str, str]:
    return {
        f"src/{i}.txt": f"document {i}: " + " ".join(f"w{i}_{j}" for j in range(words))
        for i in range(n)
    }


def test_collect_orders_by_path_hash_caps_and_dedups(tmp_path):
    files = prose_files(30)
    files["src/copy.txt"] = files["src/3.txt"]
    cache = build.PackageCache(tmp_path)
    full = build.collect(fake_source("s", files), "lite", cache, max_bytes=10**9)
    assert len(full.documents) == 30 and full.exact_duplicates == 1
    expected = sorted(files, key=build.path_hash)
    got = [d["source"] for d in full.documents]
    assert got == [s for s in expected if s in got]
    capped = build.collect(fake_source("s", files), "lite", cache, max_bytes=5000)
    assert 5000 <= capped.bytes < 5000 + 2000
    assert [d["source"] for d in capped.documents] == got[: len(capped.documents)]


def test_build_is_deterministic_atomic_and_reports_missing_when_allowed(tmp_path, monkeypatch):
    good = fake_source("good", prose_files(40))

    def broken(ctx):
        raise fetch.FetchError("debian:nothing: apt-get download exited 100")

    bad = Source("bad", "code", "code", "MIT", (Part((), broken),))
    monkeypatch.setattr(build, "select", lambda tier, subdomains: [good, bad])
    first = build.build_corpus(
        tmp_path / "a", cache_dir=tmp_path / "cache", show_progress=False, allow_missing=True
    )
    second = build.build_corpus(
        tmp_path / "b", cache_dir=tmp_path / "cache", show_progress=False, allow_missing=True
    )
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in first.parent.iterdir()) == [
        "corpus.jsonl.gz",
        "manifest.json",
        "stats.json",
    ]
    stats = json.loads((first.parent / "stats.json").read_text())
    assert "apt-get download exited 100" in stats["missing"]["bad"]
    assert any(w.startswith("missing subdomain bad:") for w in stats["warnings"])
    assert stats["labels"]["subdomain"] == ["good"] and stats["settings"]["allow_missing"]
    assert stats["subdomains"]["good"]["documents"] == 40
    with pytest.raises(build.IncompleteCorpusError, match=r"(?s)bad: FetchError.*--allow-missing"):
        build.build_corpus(tmp_path / "c", cache_dir=tmp_path / "cache", show_progress=False)
    assert not (tmp_path / "c").exists()  # nothing written: no corpus with a silently smaller label set
    docs = read_jsonl_gz(first)
    assert [d["source"] for d in docs] != sorted(d["source"] for d in docs)  # shuffled


def test_atomic_write_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "corpus.jsonl.gz"
    target.write_bytes(b"old")

    def boom():
        yield {k: "x" for k in build.FIELDS}
        raise OSError("disk full")

    with pytest.raises(OSError):
        build.write_jsonl_gz(target, boom())
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.jsonl.gz"]


def test_second_fetch_uses_cache_and_downloads_nothing(tmp_path, monkeypatch):
    calls = []

    def fake_download(registry, name, dest, apt=None):
        calls.append(name)
        (dest / "pkg_1.0-1_all.deb").write_bytes(b"payload")

    monkeypatch.setattr(fetch, "_download", fake_download)
    first = fetch.fetch("debian", "pkg", tmp_path)
    second = fetch.fetch("debian", "pkg", tmp_path)
    assert calls == ["pkg"] and first == second
    assert first.version == "1.0-1" and first.sha256 == fetch.sha256_file(
        first.path(tmp_path)
    )


# --- the source table ------------------------------------------------------------------------------


def test_source_table_labels():
    names = [s.subdomain for s in SOURCES]
    assert len(names) == len(set(names)) and 45 <= len(names) <= 49
    assert {s.domain for s in SOURCES} == set(DOMAINS)
    assert {s.group for s in SOURCES} == set(GROUPS) and len(GROUPS) == 11
    assert all((s.group in ("code", "math")) == (s.group == s.domain) for s in SOURCES)
    assert all(s.license and s.parts for s in SOURCES)
    lite = sources.select("lite")
    assert 40 <= len(lite) < len(SOURCES)
    with pytest.raises(ValueError, match="unknown subdomains"):
        sources.select("lite", ["nonsense"])


# --- the committed fixture ------------------------------------------------------------------------


def test_fixture_schema_labels_and_licenses():
    docs = read_jsonl_gz(FIXTURE)
    assert 250_000 <= FIXTURE.stat().st_size <= 700_000
    by_name = {s.subdomain: s for s in SOURCES}
    for doc in docs:
        assert set(doc) == set(build.FIELDS)
        source = by_name[doc["subdomain"]]
        assert (doc["domain"], doc["group"], doc["license"]) == (
            source.domain,
            source.group,
            source.license,
        )
        assert doc["license"] in FIXTURE_LICENSES
        assert 1000 <= len(doc["text"].encode("utf-8")) <= 8192
    counts = Counter(d["subdomain"] for d in docs)
    assert len(counts) >= 10 and min(counts.values()) >= 20
    assert {d["domain"] for d in docs} == set(DOMAINS)
    assert len({d["group"] for d in docs}) >= 6


# --- the real thing --------------------------------------------------------------------------------


def registries_reachable(timeout: float = 3.0) -> str | None:
    """None when PyPI, npm and Debian answer on port 443/80, else why not."""
    for host, port in (
        ("pypi.org", 443),
        ("registry.npmjs.org", 443),
        ("deb.debian.org", 80),
    ):
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as error:
            return f"{host}:{port} unreachable ({error})"
    return None


@pytest.mark.network
def test_real_build_of_cheap_subdomains(tmp_path):
    why = registries_reachable()
    if why:
        pytest.skip(f"package registries not reachable: {why}")
    cache = Path(os.environ.get("DS_MOE_DIV_CACHE", tmp_path / "cache"))
    # "c" reads linux-libc-dev, whose candidate on a machine with stale lists is not downloadable.
    subdomains = ["c", "devils-dictionary", "sotu", "license-permissive"]
    path = build.build_corpus(
        tmp_path / "out",
        mb_per_subdomain=0.2,
        cache_dir=cache,
        subdomains=subdomains,
        show_progress=False,
    )
    docs = read_jsonl_gz(path)
    assert Counter(d["subdomain"] for d in docs).keys() == set(subdomains)
    stats = json.loads((path.parent / "stats.json").read_text())
    assert (
        stats["missing"] == {}
        and stats["subdomains"]["license-permissive"]["near_duplicates"] > 0
    )
    assert stats["labels"]["subdomain"] == sorted(subdomains)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert all(len(p["sha256"]) == 64 and p["version"] for p in manifest["packages"])
    assert {p["name"] for p in manifest["packages"]} >= {"linux-libc-dev", "libc6-dev", "dict-devil"}
    assert manifest["apt"]["lists"]
    again = build.build_corpus(
        tmp_path / "again",
        mb_per_subdomain=0.2,
        cache_dir=cache,
        subdomains=subdomains,
        show_progress=False,
    )
    assert (
        json.loads((again.parent / "manifest.json").read_text())["downloaded_this_run"]
        == []
    )
    assert again.read_bytes() == path.read_bytes()
