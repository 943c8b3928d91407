"""On-disk cache entries: content-addressed keys and atomic builds.

An entry is built in a temporary sibling folder and moved into place with os.replace, so a crash never
leaves a half-written entry under the final name; an entry counts as complete only when it holds
manifest.json (written last). Stale temporary folders of crashed builds are removed on the next build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "manifest.json"
STALE_TMP_S = 24 * 3600


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def key_of(parts: dict) -> str:
    """Short hash of a JSON-able description (sorted keys, so dict order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def read_manifest(entry: Path) -> dict | None:
    """The entry's manifest, or None when the entry is absent or incomplete."""
    try:
        return json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_stale_tmp(parent: Path) -> None:
    for tmp in parent.glob("*.tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_entry(entry: Path) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it becomes `entry` (a concurrent builder's entry wins)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(entry.parent)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f"{entry.name}.tmp-"))
    try:
        yield tmp
        if entry.exists() and read_manifest(entry) is None:  # an incomplete entry from a non-atomic copy
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:
            if read_manifest(entry) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
