"""EOS/pad of a hub tokenizer without the project's <|pad|>/<|eos|> (evaluation.special_tokens)."""
from __future__ import annotations

import json

from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from ds_moe_div.data.tokenize import special_ids
from ds_moe_div.evaluation.special_tokens import hf_special_ids


def _tokenizer():
    return Tokenizer(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="<unk>"))


def test_tokenizer_config_names_the_tokens(tmp_path):
    tok = _tokenizer()
    assert special_ids(tok) == (None, None)  # not a ds_moe_div tokenizer
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}, "pad_token": "<unk>"}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert hf_special_ids(tok, tmp_path) == (0, 2)


def test_config_ids_are_the_fallback_and_pad_may_be_missing(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<not-in-vocab>"}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    assert hf_special_ids(_tokenizer(), tmp_path) == (None, 2)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "pad_token_id": 0}))
    assert hf_special_ids(_tokenizer(), tmp_path) == (0, 1)
