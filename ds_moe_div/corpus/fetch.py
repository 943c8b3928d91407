"""Fetch packages from Debian (apt-get download), PyPI (pip download) and npm (npm pack) into a cache.

Nothing is installed: a .deb is unpacked with `dpkg-deb -x` into the cache. Each fetched package gets a
`record.json` (registry, name, version, file, sha256) beside it; a package with a record and its file is
never downloaded again, so a second build downloads nothing.

Cache layout: <cache>/<registry>/<safe name>/{record.json, <file>, root/ (unpacked .deb)}.
Debian downloads go through `apt.AptLists` (lists refreshed once per build, recorded version fallback).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ds_moe_div import fileio
from ds_moe_div.corpus.apt import AptLists

DEFAULT_CACHE = Path("~/.cache/ds_moe_div/registry")
FETCH_TIMEOUT_S = 600
REGISTRIES = ("debian", "pypi", "npm")


class FetchError(RuntimeError):
    """A package could not be fetched or unpacked; the message says which and why."""


@dataclass(frozen=True)
class Fetched:
    registry: str
    name: str
    version: str
    file: str
    sha256: str
    size: int
    note: str | None = None  # e.g. the version that replaced an undownloadable Debian candidate

    def path(self, cache_dir: Path) -> Path:
        return package_dir(cache_dir, self.registry, self.name) / self.file


def default_cache_dir() -> Path:
    return Path(os.environ.get("DS_MOE_DIV_CACHE", DEFAULT_CACHE)).expanduser()


def package_dir(cache_dir: Path, registry: str, name: str) -> Path:
    return Path(cache_dir) / registry / re.sub(r"[^A-Za-z0-9._=-]+", "_", name)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=FETCH_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as e:
        raise FetchError(f"{what}: command not found: {cmd[0]}") from e
    except subprocess.TimeoutExpired as e:
        raise FetchError(
            f"{what}: timed out after {FETCH_TIMEOUT_S}s: {' '.join(cmd)}"
        ) from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(
            f"{what}: {' '.join(cmd)} exited {proc.returncode}: {' | '.join(tail)}"
        )
    return proc.stdout


def apt_lists(refresh: str = "auto") -> AptLists:
    """The apt state of one build (see apt.py); fetch() makes a throwaway one when given none."""
    return AptLists(_run, refresh=refresh)


def _download(registry: str, name: str, dest: Path, apt: AptLists | None = None) -> str | None:
    """Download one package into dest; returns a note when a fallback version was used."""
    what = f"{registry}:{name}"
    if registry == "debian":
        return (apt or apt_lists()).download(name, dest)
    elif registry == "pypi":
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(dest),
            name,
        ]
        _run(cmd, dest, what)
    elif registry == "npm":
        _run(["npm", "pack", "--silent", name], dest, what)
    else:
        raise ValueError(f"unknown registry {registry!r}; expected one of {REGISTRIES}")
    return None


def _version_of(registry: str, name: str, file: str) -> str:
    if registry == "debian":  # pkg_1.2-3_all.deb, epoch colon is url-quoted as %3a
        return file.split("_")[1].replace("%3a", ":")
    if registry == "npm":  # scope-name-1.2.3.tgz
        return re.sub(r"\.tgz$", "", file).rsplit("-", 1)[-1]
    if "==" in name:
        return name.split("==", 1)[1]
    m = re.match(r"[^-]+-([0-9][^-]*?)(\.tar\.gz|\.zip|-py)", file)
    return m.group(1) if m else "unknown"


def cached(registry: str, name: str, cache_dir: Path) -> Fetched | None:
    """The cached package's record, or None when it was never fetched (or its file is gone)."""
    record_path = package_dir(cache_dir, registry, name) / "record.json"
    if record_path.is_file():
        record = Fetched(**json.loads(record_path.read_text()))
        if record.path(cache_dir).is_file():
            return record
    return None


def fetch(registry: str, name: str, cache_dir: Path, apt: AptLists | None = None) -> Fetched:
    """Return the cached package, downloading it first only if it is not cached yet."""
    record = cached(registry, name, cache_dir)
    if record is not None:
        return record
    pkg_dir = package_dir(cache_dir, registry, name)
    record_path = pkg_dir / "record.json"
    pkg_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=pkg_dir, prefix=".download.") as tmp:
        note = _download(registry, name, Path(tmp), apt)
        files = sorted(p for p in Path(tmp).iterdir() if p.is_file())
        if len(files) != 1:
            raise FetchError(
                f"{registry}:{name}: expected one downloaded file, got {[p.name for p in files]}"
            )
        got = files[0]
        record = Fetched(
            registry,
            name,
            _version_of(registry, name, got.name),
            got.name,
            sha256_file(got),
            got.stat().st_size,
            note,
        )
        os.replace(got, pkg_dir / got.name)
    fileio.write_text(record_path, json.dumps(asdict(record), indent=1))
    return record


def unpack_deb(record: Fetched, cache_dir: Path) -> Path:
    """Unpack a cached .deb once (dpkg-deb -x into a temp folder, then rename) and return its root."""
    pkg_dir = package_dir(cache_dir, record.registry, record.name)
    root = pkg_dir / "root"
    stamp = pkg_dir / "root.sha256"
    if root.is_dir() and stamp.is_file() and stamp.read_text().strip() == record.sha256:
        return root
    tmp = Path(tempfile.mkdtemp(dir=pkg_dir, prefix=".root."))
    try:
        _run(
            ["dpkg-deb", "-x", str(record.path(cache_dir)), str(tmp)],
            pkg_dir,
            f"unpack {record.name}",
        )
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fileio.write_text(stamp, record.sha256 + "\n")
    return root
