"""The data's tokenizer against an imported checkpoint's embedding, checked before any data is prepared.

    check_vocabulary("models/olmoe/tokenizer.json", "models/olmoe")   # ValueError naming both sizes and the fix

Every token id must index a row of the embedding (config.json `vocab_size` rows): a tokenizer whose largest
id is >= that is refused. A smaller tokenizer is accepted (checkpoints often pad the embedding), and so is a
tokenizer.json other than the checkpoint's own, with a warning: sizes cannot tell two vocabularies apart.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from ds_moe_div.hf.load import read_config


def tokenizer_rows(tokenizer) -> int:
    """Largest id + 1 of a `tokenizers.Tokenizer` (added tokens included): the embedding rows it needs."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def check_vocabulary(tokenizer_path, pretrained) -> None:
    from tokenizers import Tokenizer

    from ds_moe_div.data.tokenize import load_tokenizer

    tokenizer_path, pretrained = Path(tokenizer_path), Path(pretrained)
    rows = int(read_config(pretrained)[0].vocab_size)
    needed = tokenizer_rows(load_tokenizer(tokenizer_path, project_tokens=False))
    if needed > rows:
        raise ValueError(f"data.tokenizer.path={tokenizer_path} has token ids up to {needed - 1} ({needed} rows) but "
                         f"{pretrained} embeds only {rows} tokens (config.json vocab_size): ids >= {rows} have no "
                         "embedding row. Use the checkpoint's own tokenizer (leave data.tokenizer.path unset: "
                         f"{pretrained / 'tokenizer.json'}), or a tokenizer of at most {rows} tokens")
    own = pretrained / "tokenizer.json"
    if own.is_file() and own.resolve() != tokenizer_path.resolve() and \
            Tokenizer.from_file(str(own)).to_str() != Tokenizer.from_file(str(tokenizer_path)).to_str():
        warnings.warn(f"data.tokenizer.path={tokenizer_path} is not {own}: it fits the embedding ({needed} <= {rows} "
                      "rows), but the checkpoint was trained with its own vocabulary", stacklevel=2)
