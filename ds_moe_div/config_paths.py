"""File paths inside the experiment config: absolute when a run writes its config, found again when a run
is read back (`eval`, `compare`, a sweep) from another directory or after the run was moved.

    cfg = absolute(cfg)                                        # training: relative to the cwd -> absolute
    saved, base = locate(saved, run_dir=..., launch_dir=...)   # reading a run back: every path exists, or
                                                               # ConfigError naming it and the fix

The keys are PATH_KEYS; `data.corpus` counts only when it names a local file or folder (not "fixture",
"builtin" or a Hugging Face `datasets` name). Paths are made absolute without resolving symlinks, and
`~` is expanded. The data cache key includes the corpus path, so a run that stored relative paths (older
runs) is read back unchanged, from the directory it was launched in, whenever its paths exist there.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from ds_moe_div.config_loader import ConfigError

PATH_KEYS = ("data.corpus", "data.corpus_dir", "data.label_map", "data.tokenizer.path", "data.cache_dir")
NAMED_CORPORA = ("fixture", "builtin")
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
# Paths that need not exist when a run is read back (a cache is rebuilt where it is missing).
MAY_BE_MISSING = ("data.cache_dir",)


def _is_local_path(key: str, value: str, base: Path) -> bool:
    if key != "data.corpus":
        return True
    if value in NAMED_CORPORA:
        return False
    p = Path(value).expanduser()
    return (p.is_absolute() or value.startswith(("./", "../", "~")) or value.endswith(FILE_SUFFIXES)
            or (base / p).exists())


def _absolute(value: str, base: Path) -> str:
    return os.path.normpath(base / Path(value).expanduser())


def _get(tree: Mapping, key: str):
    node = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict, key: str, value) -> dict:
    """A copy of `tree` with `key` (dotted) set; the other branches are shared."""
    head, _, rest = key.partition(".")
    out = dict(tree)
    out[head] = _set(dict(tree.get(head) or {}), rest, value) if rest else value
    return out


def local_paths(tree: Mapping, base: Path | None = None) -> dict[str, str]:
    """{dotted key: value} of the PATH_KEYS that are set and name local paths (relative or absolute)."""
    base = Path.cwd() if base is None else Path(base)
    found = {}
    for key in PATH_KEYS:
        value = _get(tree, key)
        if isinstance(value, str) and value and _is_local_path(key, value, base):
            found[key] = value
    return found


def absolute_dict(tree: Mapping, base: Path | None = None) -> dict:
    """`tree` (a config as a dict) with every relative path of PATH_KEYS made absolute against `base` (cwd)."""
    base = Path.cwd() if base is None else Path(base)
    out = dict(tree)
    for key, value in local_paths(tree, base).items():
        out = _set(out, key, _absolute(value, base))
    return out


def absolute(cfg, base: Path | None = None):
    """An ExperimentConfig with its relative data and tokenizer paths made absolute against `base` (cwd)."""
    from ds_moe_div.config_loader import from_dict, to_dict

    return dataclasses.replace(cfg, data=from_dict(type(cfg.data), absolute_dict({"data": to_dict(cfg.data)},
                                                                                   base)["data"], path="data"))


def launch_dir(run_dir: Path, saved_run_dir: str | None) -> Path | None:
    """The directory a run was launched from, when its train.run_dir was relative and still matches the tail
    of where the run is now (runs/tiny in /home/me/proj/runs/tiny -> /home/me/proj); else None."""
    if not saved_run_dir:
        return None
    relative, run_dir = Path(saved_run_dir), Path(run_dir).resolve()
    if relative.is_absolute() or run_dir.parts[-len(relative.parts):] != relative.parts:
        return None
    return run_dir.parents[len(relative.parts) - 1]


def locate(saved: Mapping, *, run_dir: Path, overrides: Mapping[str, str] | None = None,
           cwd: Path | None = None) -> tuple[dict, Path]:
    """A run's saved config with every path of PATH_KEYS found, and the directory to prepare its data from.

    `overrides` ({dotted key: path}) replace saved values first (relative ones against `cwd`). Relative
    paths are looked up under the launch directory (see `launch_dir`), the run dir, then `cwd`; when all
    exist under the launch directory the config is returned unchanged with that directory (its data cache
    key is the one training used). Raises ConfigError naming every missing path and the override that
    fixes it.
    """
    cwd = Path.cwd() if cwd is None else Path(cwd)
    run_dir = Path(run_dir).resolve()
    tree = dict(saved)
    for key, value in (overrides or {}).items():
        if key not in PATH_KEYS:
            raise ConfigError(f"--override {key}=...: only the run's paths can be overridden here ({', '.join(PATH_KEYS)})")
        tree = _set(tree, key, _absolute(value, cwd) if _is_local_path(key, value, cwd) else value)
    launched = launch_dir(run_dir, _get(tree, "train.run_dir"))
    paths = local_paths(tree, launched or cwd)
    if launched is not None and all(_exists(k, v, launched) for k, v in paths.items()):
        return tree, launched
    missing = []
    for key, value in paths.items():
        candidates = [Path(value).expanduser()] if Path(value).expanduser().is_absolute() else \
            [Path(_absolute(value, base)) for base in dict.fromkeys(b for b in (launched, run_dir, cwd) if b)]
        found = next((c for c in candidates if _exists(key, str(c), cwd)), None)
        if found is not None:
            tree = _set(tree, key, str(found))
        elif key in MAY_BE_MISSING:
            tree = _set(tree, key, str(candidates[0]))
        else:
            missing.append(f"{key}={value!r} (looked at {', '.join(str(c) for c in candidates)})")
    if missing:
        fixes = " ".join(f"--override {m.split('=')[0]}=<where it is now>" for m in missing)
        raise ConfigError(f"the run {run_dir} names data that is not there: {'; '.join(missing)}. The data was "
                          f"moved or deleted: point the run at it with {fixes}")
    return tree, cwd


def _exists(key: str, value: str, base: Path) -> bool:
    return key in MAY_BE_MISSING or (base / Path(value).expanduser()).exists()


def parse_overrides(items) -> dict[str, str]:
    """["data.corpus_dir=/data/builtin", ...] -> {key: value}; ConfigError for an item without '='."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"--override {item!r}: expected KEY=PATH, e.g. data.corpus_dir=/data/builtin")
        out[key.strip()] = value.strip().strip('"')
    return out
