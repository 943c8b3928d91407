"""Generic readers: files of unpacked .deb packages and members of npm/PyPI archives, picked by glob.

A reader returns `Item`s: a `source` name (registry:package:path) and a `load()` that reads the text
only when the builder wants it, so a capped build never reads files past its cap.
"""

from __future__ import annotations

import fnmatch
import gzip
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ds_moe_div.corpus.text import decode

# Larger single files are generated tables or bundles, not text to learn from (a reader that wants one,
# such as Metamath's 40 MB set.mm, passes max_file_bytes=None).
MAX_FILE_BYTES = 4 << 20


@dataclass(frozen=True)
class Item:
    source: str
    load: Callable[[], str]


class Context(Protocol):
    """What a reader may ask of the builder: unpacked .deb roots and cached archive paths."""

    def deb_root(self, package: str) -> Path: ...

    def archive(self, registry: str, name: str) -> Path: ...


Reader = Callable[[Context], Iterable[Item]]


def read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return decode(data)


def _matches(rel: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in include) and not any(
        fnmatch.fnmatchcase(rel, p) for p in exclude
    )


def deb_files(
    packages: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...] = (),
    load: Callable[[Path], str] = read_text_file,
    max_file_bytes: int | None = MAX_FILE_BYTES,
) -> Reader:
    """Files of unpacked .deb packages whose path (relative to the package root) matches a glob."""

    def reader(ctx: Context) -> Iterator[Item]:
        for package in packages:
            root = ctx.deb_root(package)
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root).as_posix()
                wanted = (
                    path.is_file()
                    and not path.is_symlink()
                    and _matches(rel, include, exclude)
                )
                if wanted and (
                    max_file_bytes is None or path.stat().st_size <= max_file_bytes
                ):
                    yield Item(f"debian:{package}:/{rel}", lambda p=path: load(p))

    return reader


def archive_members(
    registry: str,
    name: str,
    include: tuple[str, ...],
    exclude: tuple[str, ...] = (),
    load: Callable[[str, bytes], str] = lambda member, data: decode(data),
) -> Reader:
    """Members of a cached .tgz / .tar.gz / .whl / .zip, read once into memory (these are small)."""

    def reader(ctx: Context) -> Iterator[Item]:
        path = ctx.archive(registry, name)
        for member, data in iter_archive(path, include, exclude):
            yield Item(
                f"{registry}:{name}:{member}", lambda m=member, d=data: load(m, d)
            )

    return reader


def iter_archive(
    path: Path, include: tuple[str, ...], exclude: tuple[str, ...] = ()
) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) in archive order; tar is read sequentially (random access is quadratic)."""
    if path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir() and _matches(info.filename, include, exclude):
                    yield info.filename, archive.read(info)
        return
    with tarfile.open(path, mode="r|*") as archive:
        for member in archive:
            if member.isfile() and _matches(member.name, include, exclude):
                handle = archive.extractfile(member)
                if handle is not None:
                    yield member.name, handle.read()
