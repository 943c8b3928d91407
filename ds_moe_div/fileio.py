"""Atomic file writes, one semantics for every file the project writes (JSON, text, CSV, PNG, bytes):
a temporary file in the target's directory, flushed and fsync'd, then `os.replace`d over the target, so a
reader (or a crash) never sees half a file. The temporary name is `.<name>.<random>.tmp`; it is removed
on failure. Files end up mode 0644 (mkstemp creates 0600).

    write_json(path, data)
    with atomic_path(path) as tmp:    # for writers that need a file name (savefig, tokenizer.save, copyfile)
        fig.savefig(tmp, format="png")
    with atomic_dir(path) as tmp:     # a whole directory: filled under a temporary name, then renamed
        write_files_into(tmp)
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write to; on success it replaces `path` (fsync'd first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory next to `path` (`.<name>.<random>.tmp`); on success its files are
    fsync'd and it is renamed to `path` (which must not exist), else it is removed. A reader sees the whole
    directory or none of it."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data, *, indent: int | None = 2, **dumps_kwargs) -> Path:
    """`data` as JSON with a trailing newline."""
    return write_text(path, json.dumps(data, indent=indent, **dumps_kwargs) + "\n")


def write_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """A matplotlib figure (pyplot-free Figure objects included), its format taken from the suffix."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for MASTER_PORT / the launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
