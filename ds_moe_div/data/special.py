"""End-of-text and padding ids of a tokenizer: the project's own, or a Hugging Face checkpoint's.

    ids = special_token_ids(tokenizer, Path(path).parent, source=path)   # SpecialIds(pad_id, eos_id, eos_from)

EOS, the first one found: `eos_token` of tokenizer_config.json in the tokenizer's folder (a string or
{"content": ...}), `eos_token` of special_tokens_map.json, `eos_token_id` of generation_config.json, then of
config.json (the first of a list), then the project's <|eos|>. A named token must be in the vocabulary and
an id below its size, else the next source is asked. No EOS anywhere: DataError naming the fix.
Padding, found the same way (pad_token / pad_token_id, then <|pad|>), else the EOS id: no pad token is
required. Padding is never scored (label -100, domain -1) and only ever fills the end of a row, after every
real token of a causal model, so which id fills it changes no loss and no statistic.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

PROJECT_PAD, PROJECT_EOS = "<|pad|>", "<|eos|>"
TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
ID_FILES = ("generation_config.json", "config.json")


@dataclass(frozen=True)
class SpecialIds:
    pad_id: int
    eos_id: int
    eos_from: str  # where the EOS came from, e.g. "tokenizer_config.json eos_token '</s>'"


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _declared(tokenizer, directory: Path | None, token_key: str, id_key: str) -> tuple[int, str] | None:
    """(id, where) of the first declaration of `token_key` / `id_key` in the folder's files, or None."""
    if directory is None:
        return None
    size = tokenizer.get_vocab_size()
    for name in TOKEN_FILES:
        token = read_json(directory / name).get(token_key)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token), f"{name} {token_key} {token!r}"
    for name in ID_FILES:
        value = read_json(directory / name).get(id_key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size:
            return value, f"{name} {id_key} {value}"
    return None


def declared_ids(tokenizer, directory) -> tuple[int | None, int | None]:
    """(pad_id, eos_id) the folder's files declare (no project-token fallback); None where nothing does."""
    directory = Path(directory)
    pad, eos = (_declared(tokenizer, directory, f"{kind}_token", f"{kind}_token_id") for kind in ("pad", "eos"))
    return (pad[0] if pad else None), (eos[0] if eos else None)


def special_token_ids(tokenizer, directory, *, source) -> SpecialIds:
    """EOS and padding ids (see the module docstring); `directory` None: the project's tokens only."""
    directory = Path(directory) if directory is not None else None
    eos = _declared(tokenizer, directory, "eos_token", "eos_token_id")
    if eos is None and tokenizer.token_to_id(PROJECT_EOS) is not None:
        eos = tokenizer.token_to_id(PROJECT_EOS), f"the project's {PROJECT_EOS}"
    if eos is None:
        folder = directory if directory is not None else Path(str(source)).parent
        raise DataError(
            f"{source}: the tokenizer has no end-of-text token: none of tokenizer_config.json / "
            f"special_tokens_map.json 'eos_token', generation_config.json / config.json 'eos_token_id' in {folder} "
            f"names one, and it holds no {PROJECT_EOS}. Add \"eos_token\": \"<its end-of-text token>\" to "
            f"{folder / 'tokenizer_config.json'} (a checkpoint's tokenizer folder has it), or leave "
            "data.tokenizer.path null to train a tokenizer with <|pad|>/<|eos|>")
    pad = _declared(tokenizer, directory, "pad_token", "pad_token_id")
    pad_id = pad[0] if pad else tokenizer.token_to_id(PROJECT_PAD)
    return SpecialIds(pad_id=eos[0] if pad_id is None else pad_id, eos_id=eos[0], eos_from=eos[1])


def folder_identity(directory: Path) -> dict:
    """What of a tokenizer's folder decides its special ids and chat template (for cache keys): the
    digests of its tokenizer_config / special_tokens_map / generation_config / chat template files, and
    config.json's eos/pad ids (not the whole model config)."""
    from .cache import file_digest

    names = (*TOKEN_FILES, "generation_config.json", "chat_template.jinja", "chat_template.json")
    config = read_json(directory / "config.json")
    return {"files": {name: file_digest(directory / name) for name in names if (directory / name).is_file()},
            "config": [config.get("eos_token_id"), config.get("pad_token_id")]}
