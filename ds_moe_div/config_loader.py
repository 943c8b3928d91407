"""Strict loading of experiment configs that are trees of frozen dataclasses (schema elsewhere).

Example::

    @dataclass(frozen=True)
    class ModelConfig:
        num_experts: int = 8
        gate: Literal["top1", "top2"] = "top1"
    @dataclass(frozen=True)
    class ExperimentConfig:
        model: ModelConfig = ModelConfig()
        lr: float | Literal["auto"] = "auto"
    cfg = load_config(ExperimentConfig, "run.json", overrides=["model.num_experts=16"])
    dump_config(cfg, "resolved.json")  # resolved config; load_config reads it back

* An unknown key fails with its dotted path and the nearest valid name ("did you mean ...").
  Types are checked: a bool is not an int; an int is accepted for a float; JSON lists become
  tuples; a `pathlib.Path` is read from a string.
* Comments: keys starting with "#" or "_comment" are ignored in objects that map onto a
  dataclass (`"_comment": "why lr is low"`); any other key, a bare "comment" included, must
  be a field. Fields named "_..." or with init=False are neither loaded nor dumped.
* ValueError/TypeError from `__post_init__` becomes a ConfigError prefixed with the dotted path.
* Numbers: every float must be finite (JSON's NaN / Infinity and `--override x=NaN` are refused), and
  numeric fields are range-checked by their name, for every dataclass (fields added later included):
  see `NUMERIC_RULES` (e.g. `coef` >= 0, `*eps` > 0, `*_steps` >= 0, `*_target` > 0, `lr` > 0).
  A dataclass checks anything more specific in `__post_init__`.
* Schema dataclasses must be frozen and defined at module level (`typing.get_type_hints`
  resolves postponed annotations there). Tests: tests/test_config_loader.py.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from ds_moe_div import fileio

T = TypeVar("T")
_SCALARS = (int, float, bool, str, Path, type(None))


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the dotted path and the fix."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _where(path: str) -> str:
    return f"'{path}'" if path else "the top level"


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if isinstance(tp, type) and origin is None:
        return tp.__name__
    return repr(tp).replace("typing.", "")


def _loadable_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def _check_key(cls: type, key: Any, path: str, loadable: Mapping[str, Any]) -> None:
    if not isinstance(key, str):
        raise ConfigError(f"key {key!r} in {_where(path)} must be a string")
    if key in loadable or key.startswith(("#", "_comment")):
        return
    dotted = _join(path, key)
    if key in {f.name for f in dataclasses.fields(cls)}:
        raise ConfigError(f"key '{dotted}' is internal to {cls.__name__}; remove it")
    close = difflib.get_close_matches(key, list(loadable), n=1, cutoff=0.6)
    if close:
        raise ConfigError(f"unknown key '{dotted}'; did you mean '{_join(path, close[0])}'?")
    valid = ", ".join(repr(name) for name in loadable) or "(none)"
    raise ConfigError(f"unknown key '{dotted}'; valid keys in {_where(path)}: {valid}")


# (name pattern, test, what it must be): a numeric field whose name matches must pass the test. Applied by
# `from_dict` to every dataclass, so a knob added later with a conventional name is covered too.
NUMERIC_RULES: tuple[tuple[str, Any, str], ...] = (
    (r"(.*_)?coef", lambda v: v >= 0, ">= 0 (a negative weight would reward what the term penalises; 0 turns it off)"),
    (r"(.*_)?eps", lambda v: v > 0, "> 0"),
    (r".*_target", lambda v: v > 0, "> 0"),
    (r".*_factor", lambda v: v > 0, "> 0"),
    (r"(.*_)?lr", lambda v: v > 0, "> 0"),
    (r".*_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    (r".*_steps", lambda v: v >= 0, ">= 0"),
    (r".*_size", lambda v: v >= 1, ">= 1"),
)


def check_number(name: str, value: Any, path: str) -> None:
    """Refuse a non-finite float anywhere, and a number outside the range `NUMERIC_RULES` gives `name`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"'{path}' is {value}: numbers in the config must be finite (NaN and Infinity are "
                          f"refused); set a finite value")
    for pattern, ok, requirement in NUMERIC_RULES:
        if re.fullmatch(pattern, name) and not ok(value):
            raise ConfigError(f"'{path}' = {value!r} is out of range: it must be {requirement}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Build the frozen dataclass `cls` from `data`, checking keys and types recursively."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not cls.__dataclass_params__.frozen:
        raise TypeError(f"config dataclass {cls.__name__} must be declared with frozen=True")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(path)} must be an object ({cls.__name__}); got {_show(data)}")
    hints, loadable = typing.get_type_hints(cls), _loadable_fields(cls)
    for key in data:
        _check_key(cls, key, path, loadable)
    for name, f in loadable.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            dotted = _join(path, name)
            raise ConfigError(f"missing required key '{dotted}' ({_type_name(hints[name])}); "
                              f"add it to the config or pass --override {dotted}=<value>")
    kwargs = {n: _convert(hints[n], data[n], _join(path, n)) for n in loadable if n in data}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path or cls.__name__}: {exc}") from exc
    for name, value in kwargs.items():  # after __post_init__, whose messages are more specific
        check_number(name, value, _join(path, name))
    return obj


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return it in its Python form."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, float) and not math.isfinite(value):  # before any union tries its members
        check_number("", value, path)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, path=path)
    if origin in (Union, types.UnionType):
        return _convert_union(tp, args, value, path)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"'{path}' must be {_type_name(tp)}; got {_show(value)}")
    if tp is tuple or origin is tuple:
        return _convert_tuple(tp, args, value, path)
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"'{path}' must be an object with string keys; got {_show(value)}")
        return {k: _convert(args[1] if args else Any, v, _join(path, k)) for k, v in value.items()}
    if tp not in _SCALARS:
        raise TypeError(f"config_loader does not support the annotation {tp!r} at '{path}'")
    return _convert_scalar(tp, value, path)


def _convert_union(tp: Any, args: tuple, value: Any, path: str) -> Any:
    if value is None and type(None) in args:
        return None
    candidates = [a for a in args if a is not type(None)]
    if len(candidates) == 1:  # Optional[X]: keep X's precise message
        return _convert(candidates[0], value, path)
    for candidate in candidates:
        try:
            return _convert(candidate, value, path)
        except ConfigError:
            pass
    raise ConfigError(f"'{path}' must be {_type_name(tp)}; got {_show(value)}")


def _convert_tuple(tp: Any, args: tuple, value: Any, path: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"'{path}' must be a list ({_type_name(tp)}); got {_show(value)}")
    variadic = not args or (len(args) == 2 and args[1] is Ellipsis)
    item_types = [args[0] if args else Any] * len(value) if variadic else list(args)
    if len(value) != len(item_types):
        raise ConfigError(f"'{path}' must have {len(args)} items; got {len(value)}")
    return tuple(_convert(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))


def _convert_scalar(tp: type, value: Any, path: str) -> Any:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is float and is_number:
        return float(value)
    if tp is Path and isinstance(value, (str, Path)):
        return Path(value)
    if type(value) is tp:  # exact type: a bool is not accepted as an int
        return value
    hint = ""
    if tp is float and isinstance(value, str) and re.fullmatch(r"[-+]?[\d.]+[eE][-+]?\d+", value):
        hint = " (YAML reads 1e-3 as a string; write 1.0e-3 or 0.001)"
    raise ConfigError(f"'{path}' must be {_type_name(tp)}; got {_show(value)}{hint}")


def to_dict(obj: Any) -> dict:
    """The dataclass tree `obj` as JSON-ready data (tuples -> lists, Path -> str)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {obj!r}")
    return _to_plain(obj)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _to_plain(getattr(value, name)) for name in _loadable_fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"a.b.c": leaf value} (a non-dict `tree` is one leaf named `prefix`)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """A copy of `data` with each "a.b.c=value" set; value parsed as JSON, else kept as str."""
    result = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"malformed override {item!r}; write it as 'a.b.c=value', "
                              "e.g. --override model.num_experts=8")
        node = result
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # missing (or null) levels are created
                node[part] = {}
            elif not isinstance(node[part], dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {item!r}: '{prefix}' is {_show(node[part])}, "
                                  "not an object, so it has no sub-keys to set")
            node = node[part]
        node[parts[-1]] = _parse_value(raw)
    return result


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def load_file(path: str | os.PathLike) -> dict:
    """Read a .json or .yaml/.yml config file whose top level is an object."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; check the path (cwd: {Path.cwd()})")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc
    elif path.suffix in (".yaml", ".yml"):
        data = _parse_yaml(path, text)
    else:
        raise ConfigError(f"config file '{path}' must end in .json, .yaml or .yml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be an object of keys; got {_show(data)}")
    return data


def _parse_yaml(path: Path, text: str) -> Any:
    import yaml  # only YAML users need PyYAML

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from exc


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Load `path` (or start from {} if None), apply `overrides`, and build `cls` strictly."""
    data = load_file(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def dump_config(obj: Any, path: str | os.PathLike) -> None:
    """Write `to_dict(obj)` as indented JSON atomically (fileio.write_json)."""
    fileio.write_json(path, to_dict(obj))
