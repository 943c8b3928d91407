"""Debian downloads that do not depend on how old this machine's package lists are.

A machine's lists (`/var/lib/apt/lists`) can be older than the mirror: the candidate version they name
(or the version installed, which apt prefers over an older one in the lists) may no longer be
downloadable (`E: Can't find a source to download version '6.1.187-1' of 'linux-libc-dev'`, or a 404).
So one build refreshes the lists once, before its first Debian download (`apt-get update`, as root only;
a cached build runs no apt at all), and a package whose candidate still cannot be downloaded falls back
to the newest version `apt-cache madison` lists from a repository. The fallback is recorded (the
manifest's `apt` section and the package's `note`), never silent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

# run(cmd, cwd, what) -> stdout; raises on a non-zero exit (fetch._run, or a fake in tests).
Runner = Callable[[list[str], Path, str], str]
REFRESH_MODES = ("auto", "always", "never")


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


class AptLists:
    """One build's view of apt: lists refreshed at most once, downloads with a recorded fallback.

    refresh: "auto" runs `apt-get update` before the first download when root (a non-root user cannot
    write the lists), "always" tries regardless, "never" uses the lists as found (offline builds).
    """

    def __init__(self, run: Runner, *, refresh: str = "auto", root: bool | None = None) -> None:
        if refresh not in REFRESH_MODES:
            raise ValueError(f"apt refresh must be one of {REFRESH_MODES}, got {refresh!r}")
        self.run = run
        self.refresh = refresh
        self.root = is_root() if root is None else root
        self.lists: str | None = None  # what happened to the lists this build; None = no download yet
        self.fallbacks: dict[str, str] = {}  # package -> what was used instead of the candidate

    def ensure_fresh(self, cwd: Path) -> None:
        """Refresh the lists once per build (the first call decides; later calls do nothing)."""
        if self.lists is not None:
            return
        if self.refresh == "never":
            self.lists = "as found (refresh disabled)"
        elif self.refresh == "auto" and not self.root:
            self.lists = "as found (not root: run 'sudo apt-get update' for current versions)"
        else:
            try:
                self.run(["apt-get", "update", "-qq"], cwd, "apt-get update")
                self.lists = "refreshed (apt-get update)"
            except RuntimeError as error:  # offline: the lists as found may still serve
                self.lists = f"as found (apt-get update failed: {error})"

    def download(self, name: str, dest: Path) -> str | None:
        """`apt-get download name` into dest; on failure the newest other downloadable version.

        Returns None, or a note saying which version replaced the candidate and why.
        """
        self.ensure_fresh(dest)
        what = f"debian:{name}"
        try:
            self.run(["apt-get", "download", name], dest, what)
            return None
        except RuntimeError as first_error:  # the runner's error (FetchError); tried again below
            candidate = self.candidate(name, dest)
            tried = []
            for version in self.versions(name, dest):
                if version == candidate:
                    continue
                tried.append(version)
                if self.try_run(["apt-get", "download", f"{name}={version}"], dest, what) is not None:
                    note = (f"candidate {candidate or '?'} not downloadable ({first_error}); "
                            f"used {version}, the newest version a repository lists")
                    self.fallbacks[name] = note
                    return note
            raise type(first_error)(
                f"{first_error}; no other version downloads either (tried {tried or 'none listed'}). "
                f"Package lists: {self.lists}. Fix: 'apt-get update' (as root), then build again"
            ) from first_error

    def try_run(self, cmd: list[str], cwd: Path, what: str) -> str | None:
        """The command's stdout, or None when it failed."""
        try:
            return self.run(cmd, cwd, what)
        except RuntimeError:
            return None

    def candidate(self, name: str, cwd: Path) -> str | None:
        out = self.try_run(["apt-cache", "policy", name], cwd, f"apt-cache policy {name}") or ""
        for line in out.splitlines():
            if line.strip().startswith("Candidate:"):
                return line.split(":", 1)[1].strip()
        return None

    def versions(self, name: str, cwd: Path) -> list[str]:
        """Versions with a download source, newest first (`apt-cache madison` lists only those)."""
        out = self.try_run(["apt-cache", "madison", name], cwd, f"apt-cache madison {name}") or ""
        versions = []
        for line in out.splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) >= 3 and fields[0] == name and fields[1] not in versions:
                versions.append(fields[1])
        return versions

    def summary(self) -> dict:
        return {"lists": self.lists or "not used (every Debian package was cached)",
                "fallbacks": dict(sorted(self.fallbacks.items()))}
