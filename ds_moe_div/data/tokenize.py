"""Byte-level BPE (`tokenizers`): train on the train split, load for evaluation, encode in batches.

Special tokens <|pad|> (id 0 when trained here) and <|eos|> (id 1). No post-processor: the packer
appends the end-of-text token after every document itself. A tokenizer given by path (a checkpoint's)
needs neither: its own EOS and padding come from special.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import TokenizerConfig
from .errors import DataError

PAD, EOS = "<|pad|>", "<|eos|>"


def new_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, *, length: int | None = None,
                    show_progress: bool = True) -> Tokenizer:
    """Train on `texts` (the train split only: val/test text must not shape the vocabulary)."""
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=[PAD, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=show_progress)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


def load_tokenizer(path: str | Path, *, project_tokens: bool = True) -> Tokenizer:
    """A tokenizer.json; with <|pad|> and <|eos|> unless `project_tokens` is False (a checkpoint's own
    tokenizer, whose EOS special.py finds)."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for bad files
        raise DataError(f"{path}: not a loadable tokenizer.json ({e}); check tokenizer.path") from None
    if not project_tokens:
        return tokenizer
    missing = [token for token in (PAD, EOS) if tokenizer.token_to_id(token) is None]
    if missing:
        raise DataError(f"{path}: tokenizer lacks special tokens {missing}; add them "
                        "(tokenizer.add_special_tokens) or leave tokenizer.path null to train one")
    return tokenizer


def special_ids(tokenizer: Tokenizer) -> tuple[int | None, int | None]:
    """(pad_id, eos_id) of the project's <|pad|>/<|eos|> (None where absent; see special.py otherwise)."""
    return tokenizer.token_to_id(PAD), tokenizer.token_to_id(EOS)


def encode_documents(tokenizer: Tokenizer, texts: list[str], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated int32 ids of `texts`, each followed by <|eos|>, and the per-document lengths."""
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.empty(int(lengths.sum()), dtype=np.int32)
    ends = np.cumsum(lengths)
    for encoding, end, length in zip(encodings, ends.tolist(), lengths.tolist(), strict=True):
        ids[end - length:end - 1] = encoding.ids
        ids[end - 1] = eos_id
    return ids, lengths
