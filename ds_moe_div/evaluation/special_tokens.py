"""(pad_id, eos_id) of an imported Hugging Face checkpoint whose tokenizer lacks the project's <|pad|>/<|eos|>.

    pad_id, eos_id = hf_special_ids(tokenizer, "models/olmoe")   # tokenizers.Tokenizer, model.pretrained dir

The end-of-text token is, in order: tokenizer_config.json's eos_token (a string or {"content": ...}),
generation_config.json's eos_token_id, config.json's eos_token_id (the first of a list). The pad token
likewise (pad_token, pad_token_id); None when the checkpoint has none: callers pad with EOS and mask.
"""
from __future__ import annotations

import json
from pathlib import Path


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _token_id(tokenizer, directory: Path, token_key: str, id_key: str) -> int | None:
    token = _read(directory / "tokenizer_config.json").get(token_key)
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
        return tokenizer.token_to_id(token)
    for name in ("generation_config.json", "config.json"):
        value = _read(directory / name).get(id_key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def hf_special_ids(tokenizer, pretrained) -> tuple[int | None, int | None]:
    directory = Path(pretrained)
    return (_token_id(tokenizer, directory, "pad_token", "pad_token_id"),
            _token_id(tokenizer, directory, "eos_token", "eos_token_id"))
