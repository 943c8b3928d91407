"""Domain labels: raw corpus labels -> class ids of the scheme in use, optionally through a label map.

A label map file (JSON, or YAML with PyYAML) maps raw labels to class names, e.g. 49 subdomains -> 3
domains. Two spellings, mixable: {"python": "code", "go": "code"} (raw -> class) or
{"code": ["python", "go"]} (class -> raws). Class ids follow the sorted class names; with
unknown_labels="other" a label missing from the map becomes the class "other".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, at

OTHER = "other"


def label_key(raw: Any, source: str, row: int) -> str:
    """Raw labels are compared as strings (YAML and Parquet may give ints)."""
    if raw is None or isinstance(raw, (dict, list, tuple)):
        raise DataError(f"{at(source, row)}: domain label is {raw!r}; every row needs a scalar label "
                        "(point domain_column at a string or integer column)")
    return str(raw)


def load_label_map(path: str) -> dict[str, str]:
    """Raw label -> class name, from either spelling."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{file}: cannot read the label map ({e.strerror}); check label_map") from None
    if file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise DataError(f"{file}: not valid YAML ({e})") from None
    else:
        try:
            content = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}: not valid JSON ({e}); use .yaml/.yml for a YAML label map") from None
    if not isinstance(content, dict) or not content:
        raise DataError(f"{file}: a label map is a non-empty mapping raw label -> class name "
                        "(or class name -> list of raw labels)")
    mapping: dict[str, str] = {}
    for key, value in content.items():
        pairs = [(str(raw), str(key)) for raw in value] if isinstance(value, list) else [(str(key), str(value))]
        for raw, name in pairs:
            if mapping.get(raw, name) != name:
                raise DataError(f"{file}: label {raw!r} maps to both {mapping[raw]!r} and {name!r}; keep one")
            mapping[raw] = name
    return mapping


@dataclass(frozen=True)
class LabelScheme:
    """domain_names[i] is the class with id i; raw_to_id maps every raw label seen in the corpus."""

    domain_names: tuple[str, ...]
    raw_to_id: dict[str, int]
    unknown_as_other: tuple[str, ...] = ()


def build_scheme(first_seen: dict[str, tuple[str, int]], label_map: dict[str, str] | None,
                 unknown_labels: str, label_map_path: str | None = None) -> LabelScheme:
    """first_seen: raw label -> (source, row) of its first occurrence, for error messages."""
    if label_map is None:
        names = tuple(sorted(first_seen))
        return LabelScheme(names, {raw: i for i, raw in enumerate(names)})
    unknown = [raw for raw in first_seen if raw not in label_map]
    if unknown and unknown_labels == "error":
        source, row = first_seen[unknown[0]]
        more = f" (and {len(unknown) - 1} more: {sorted(unknown)[:10]})" if len(unknown) > 1 else ""
        raise DataError(f"{at(source, row)}: label {unknown[0]!r} is not in the label map {label_map_path}{more}; "
                        'add it to the map, or set unknown_labels="other" to put such rows in class "other"')
    class_names = set(label_map.values()) | ({OTHER} if unknown else set())
    names = tuple(sorted(class_names))
    ids = {name: i for i, name in enumerate(names)}
    raw_to_id = {raw: ids[label_map.get(raw, OTHER)] for raw in first_seen}
    return LabelScheme(names, raw_to_id, tuple(sorted(unknown)))
