"""(pad_id, eos_id) of an imported Hugging Face checkpoint whose tokenizer lacks the project's <|pad|>/<|eos|>.

    pad_id, eos_id = hf_special_ids(tokenizer, "models/olmoe")   # tokenizers.Tokenizer, model.pretrained dir

The same rule as the data pipeline (ds_moe_div/data/special.py `declared_ids`): the end-of-text token is, in
order, tokenizer_config.json's / special_tokens_map.json's eos_token (a string or {"content": ...}),
generation_config.json's eos_token_id, config.json's eos_token_id (the first of a list). The pad token
likewise (pad_token, pad_token_id); None when the checkpoint has none: callers pad with EOS and mask.
"""
from __future__ import annotations

from ds_moe_div.data.special import declared_ids


def hf_special_ids(tokenizer, pretrained) -> tuple[int | None, int | None]:
    return declared_ids(tokenizer, pretrained)
