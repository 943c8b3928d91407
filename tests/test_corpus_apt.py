"""The corpus builder on a fresh machine with stale apt lists (ds_moe_div/corpus/apt.py), no network.

Every subprocess call is faked by a tiny apt: `apt-get update` makes the lists current, `apt-get
download` succeeds only for a version the fake mirror still has, `apt-cache policy/madison` answer
from the lists. The stale state is the one seen on a real machine: the candidate is the installed
linux-libc-dev 6.1.187-1, which no repository in the lists offers.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ds_moe_div.corpus import apt, build, fetch
from ds_moe_div.corpus.readers import Item
from ds_moe_div.corpus.sources import Part, Source


class FakeApt:
    def __init__(self, *, update_fails: bool = False, mirror: dict[str, set[str]] | None = None) -> None:
        self.fresh = False
        self.update_fails = update_fails
        self.calls: list[list[str]] = []
        # what the mirror can still serve; the stale lists list 6.1.176-1 and prefer the installed 6.1.187-1
        self.mirror = mirror if mirror is not None else {
            "linux-libc-dev": {"6.1.176-1", "6.1.190-1"}, "libc6-dev": {"2.36-9"}}
        self.stale = {"linux-libc-dev": ("6.1.187-1", ["6.1.176-1"]), "libc6-dev": ("2.36-9", ["2.36-9"])}
        self.current = {"linux-libc-dev": ("6.1.190-1", ["6.1.190-1"]), "libc6-dev": ("2.36-9", ["2.36-9"])}

    def lists(self, name):
        return (self.current if self.fresh else self.stale)[name]

    def __call__(self, cmd, cwd=None, **kwargs):
        self.calls.append(list(cmd))
        rc, out, err = 0, "", ""
        if cmd[:2] == ["apt-get", "update"]:
            if self.update_fails:
                rc, err = 100, "E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease"
            self.fresh = not self.update_fails
        elif cmd[:2] == ["apt-get", "download"]:
            name, _, version = cmd[2].partition("=")
            version = version or self.lists(name)[0]
            if version in self.mirror.get(name, ()):
                (Path(cwd) / f"{name}_{version}_amd64.deb").write_bytes(f"{name} {version}".encode())
            else:
                rc, err = 100, f"E: Can't find a source to download version '{version}' of '{name}:amd64'"
        elif cmd[:3] == ["apt-cache", "policy", cmd[2]]:
            out = f"{cmd[2]}:\n  Installed: (none)\n  Candidate: {self.lists(cmd[2])[0]}\n"
        elif cmd[:2] == ["apt-cache", "madison"]:
            out = "".join(f"{cmd[2]} | {v} | http://deb.debian.org/debian bookworm/main amd64 Packages\n"
                          for v in self.lists(cmd[2])[1])
        else:
            raise AssertionError(f"unexpected command {cmd}")
        return subprocess.CompletedProcess(cmd, rc, out, err)

    def commands(self, *prefix: str) -> list[list[str]]:
        return [c for c in self.calls if c[: len(prefix)] == list(prefix)]


def c_source() -> Source:
    """A stand-in for subdomain "c": it needs linux-libc-dev and libc6-dev, as the real one does."""
    packages = (("debian", "linux-libc-dev"), ("debian", "libc6-dev"))

    def reader(cache):
        texts = [cache.archive(reg, name).read_text() for reg, name in packages]
        return [Item(f"debian:{i}.h", lambda i=i: f"/* header {i} from {texts} */\n" + "int x;\n" * 40)
                for i in range(5)]

    return Source("c", "code", "code", "GPL-2.0", (Part(packages, reader),))


def prose_source() -> Source:
    def reader(cache):
        return [Item(f"p/{i}", lambda i=i: f"doc {i} " + " ".join(f"w{i}_{j}" for j in range(80)))
                for i in range(5)]

    return Source("sotu", "prose", "speech", "CC0-1.0", (Part((), reader),), "prose")


@pytest.fixture
def world(monkeypatch):
    def install(fake: FakeApt, *, root: bool) -> FakeApt:
        monkeypatch.setattr(fetch.subprocess, "run", fake)
        monkeypatch.setattr(apt, "is_root", lambda: root)
        monkeypatch.setattr(build, "select", lambda tier, subdomains: [c_source(), prose_source()])
        return fake

    return install


def built(out: Path) -> tuple[dict, dict]:
    return json.loads((out / "manifest.json").read_text()), json.loads((out / "stats.json").read_text())


def test_root_refreshes_lists_once_before_the_first_debian_download(tmp_path, world):
    fake = world(FakeApt(), root=True)
    build.build_corpus(tmp_path / "a", cache_dir=tmp_path / "cache", show_progress=False)
    assert fake.calls[0] == ["apt-get", "update", "-qq"] and len(fake.commands("apt-get", "update")) == 1
    assert fake.commands("apt-get", "download") == [
        ["apt-get", "download", "linux-libc-dev"], ["apt-get", "download", "libc6-dev"]]
    manifest, stats = built(tmp_path / "a")
    versions = {p["name"]: p["version"] for p in manifest["packages"]}
    assert versions == {"linux-libc-dev": "6.1.190-1", "libc6-dev": "2.36-9"}
    assert all(len(p["sha256"]) == 64 and p["note"] is None for p in manifest["packages"])
    assert manifest["apt"] == {"lists": "refreshed (apt-get update)", "fallbacks": {}}
    assert manifest["subdomains"]["c"] == ["debian:libc6-dev", "debian:linux-libc-dev"]
    assert stats["warnings"] == [] and stats["labels"]["subdomain"] == ["c", "sotu"]
    # a second build from the cache runs no apt at all (works offline) and records the same versions
    fake.calls.clear()
    build.build_corpus(tmp_path / "b", cache_dir=tmp_path / "cache", show_progress=False)
    assert fake.calls == []
    again, _ = built(tmp_path / "b")
    assert again["packages"] == manifest["packages"] and again["apt"]["lists"].startswith("not used")


def test_stale_lists_fall_back_to_a_downloadable_version_and_record_it(tmp_path, world):
    fake = world(FakeApt(), root=False)  # not root: the lists cannot be refreshed
    build.build_corpus(tmp_path / "a", cache_dir=tmp_path / "cache", show_progress=False)
    assert fake.commands("apt-get", "update") == []
    assert ["apt-get", "download", "linux-libc-dev=6.1.176-1"] in fake.calls
    manifest, stats = built(tmp_path / "a")
    libc = next(p for p in manifest["packages"] if p["name"] == "linux-libc-dev")
    assert libc["version"] == "6.1.176-1" and libc["file"] == "linux-libc-dev_6.1.176-1_amd64.deb"
    assert "candidate 6.1.187-1 not downloadable" in libc["note"] and "used 6.1.176-1" in libc["note"]
    assert manifest["apt"]["fallbacks"] == {"linux-libc-dev": libc["note"]}
    assert "not root" in manifest["apt"]["lists"]
    assert stats["warnings"] == manifest["warnings"] == [f"debian:linux-libc-dev 6.1.176-1: {libc['note']}"]
    assert stats["labels"]["subdomain"] == ["c", "sotu"]  # the label set is complete


def test_a_missing_subdomain_fails_loudly_unless_allowed(tmp_path, world):
    world(FakeApt(mirror={"libc6-dev": {"2.36-9"}}), root=False)  # no linux-libc-dev version downloads
    with pytest.raises(build.IncompleteCorpusError) as error:
        build.build_corpus(tmp_path / "a", cache_dir=tmp_path / "cache", show_progress=False)
    message = str(error.value)
    assert "  c: FetchError: debian:linux-libc-dev" in message and "6.1.187-1" in message
    assert "apt-get update" in message and "--allow-missing" in message and "sotu" not in message
    assert not (tmp_path / "a").exists()
    build.build_corpus(tmp_path / "b", cache_dir=tmp_path / "cache", show_progress=False, allow_missing=True)
    manifest, stats = built(tmp_path / "b")
    assert list(stats["missing"]) == ["c"] and stats["labels"]["subdomain"] == ["sotu"]
    assert stats["warnings"][0].startswith("missing subdomain c: FetchError") and manifest["warnings"] == stats[
        "warnings"]


def test_offline_update_failure_is_recorded_and_cached_lists_still_serve(tmp_path, world):
    fake = world(FakeApt(update_fails=True), root=True)
    build.build_corpus(tmp_path / "a", cache_dir=tmp_path / "cache", show_progress=False)
    assert len(fake.commands("apt-get", "update")) == 1
    manifest, _ = built(tmp_path / "a")
    assert manifest["apt"]["lists"].startswith("as found (apt-get update failed")
    assert {p["name"]: p["version"] for p in manifest["packages"]}["linux-libc-dev"] == "6.1.176-1"


def test_refresh_never_and_bad_mode(tmp_path, world):
    fake = world(FakeApt(), root=True)
    build.build_corpus(tmp_path / "a", cache_dir=tmp_path / "cache", show_progress=False, apt_refresh="never")
    assert fake.commands("apt-get", "update") == []
    with pytest.raises(ValueError, match="apt refresh must be one of"):
        build.build_corpus(tmp_path / "b", show_progress=False, apt_refresh="sometimes")
