"""Data configuration: which corpus, which label column, how to split, tokenise and pack.

Frozen dataclasses checked in __post_init__; a bad value raises ValueError naming the field and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

PACKINGS = ("by_domain", "mixed")
SAMPLINGS = ("natural", "balanced")
UNKNOWN_LABELS = ("error", "other")
FORMATS = ("text", "instruction")
LOSS_ON = ("all", "response")
MIN_VOCAB = 256 + 2  # every byte of the byte-level alphabet plus <|pad|> and <|eos|>


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class TokenizerConfig:
    """Byte-level BPE: load `path` (a tokenizer.json with <|pad|> and <|eos|>) or train one on the train split.

    max_train_mb caps the training text: a seeded random sample of train documents up to that many MB
    (UTF-8) when the train split is larger; null trains on all of it.
    """

    path: str | None = None
    vocab_size: int = 4096
    min_frequency: int = 2
    max_train_mb: float | None = 256.0

    def __post_init__(self) -> None:
        _check(self.vocab_size >= MIN_VOCAB,
               f"tokenizer.vocab_size={self.vocab_size}: must be >= {MIN_VOCAB} (256 bytes + 2 special tokens)")
        _check(self.min_frequency >= 1, f"tokenizer.min_frequency={self.min_frequency}: must be >= 1")
        _check(self.path is None or bool(self.path), "tokenizer.path is empty: use null to train a tokenizer")
        _check(self.max_train_mb is None or self.max_train_mb > 0,
               f"tokenizer.max_train_mb={self.max_train_mb}: must be > 0, or null for the whole train split")


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes packed [N, seq_len+1] token and domain-id arrays.

    corpus: "fixture" (the committed mini corpus), "builtin" (corpus_dir/corpus.jsonl.gz), a local
    .jsonl / .jsonl.gz / .parquet file or a folder of them, or a Hugging Face `datasets` name or path
    (`hf_config`, `hf_split` pick the subset; HF_DATASETS_OFFLINE=1 works with local files).
    domain_column may be dotted for nested fields ("meta.pile_set_name"). label_map: see labels.py
    (raw -> class or class -> [raws]; unknown_labels applies only with a map). max_documents keeps a seeded
    random subset (split_seed) of that many documents. include_labels keeps only the documents of these
    classes (names after label_map; empty = all) and shuffle_labels_seed permutes the classes among the
    documents of each split (the negative control: proportions kept, names unchanged); both act after the
    split and the tokenizer, so splits and tokenizer stay those of the full corpus (see documents.py
    `apply_label_options`). streaming re-reads the corpus on each pass instead
    of holding it in memory; the result is identical. num_proc goes to `datasets.load_dataset`; the
    tokenizer's batch API uses all cores on its own (RAYON_NUM_THREADS limits it).
    format "instruction": each row is one example, `messages_column` (a list of {"role", "content"}) or
    `prompt_column` + `response_column`, rendered with the chat template of the folder holding
    tokenizer.path (see instruction.py); text_column is not read. loss_on "response" scores only the
    response (assistant) tokens; routing statistics and domain objectives still see every real token.
    """

    corpus: str = "fixture"
    corpus_dir: str | None = None
    text_column: str = "text"
    domain_column: str = "domain"
    label_map: str | None = None
    unknown_labels: Literal["error", "other"] = "error"
    seq_len: int = 256
    packing: Literal["by_domain", "mixed"] = "by_domain"
    sampling: Literal["natural", "balanced"] = "natural"
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 1234
    max_documents: int | None = None
    include_labels: tuple[str, ...] = ()
    shuffle_labels_seed: int | None = None
    streaming: bool = False
    num_proc: int = 2
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cache_dir: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    # Instruction data (see instruction.py): rows with messages_column, or prompt_column + response_column.
    format: Literal["text", "instruction"] = "text"
    loss_on: Literal["all", "response"] | None = None  # None: "all" for text, "response" for instruction
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"

    @property
    def scored(self) -> str:
        """Which tokens the LM loss scores: "all" or "response" (loss_on, or the format's default)."""
        return self.loss_on or ("response" if self.format == "instruction" else "all")

    def __post_init__(self) -> None:
        _check(bool(self.corpus), 'corpus is empty: use "fixture", "builtin", a file/folder path or a datasets name')
        _check(self.corpus != "builtin" or self.corpus_dir is not None,
               'corpus="builtin" needs corpus_dir: the folder the corpus builder wrote corpus.jsonl.gz into')
        _check(bool(self.text_column), "text_column is empty: name the column that holds the document text")
        _check(bool(self.domain_column), "domain_column is empty: name the column that holds the domain label")
        _check(self.unknown_labels in UNKNOWN_LABELS, f"unknown_labels={self.unknown_labels!r}: use one of {UNKNOWN_LABELS}")
        _check(self.seq_len >= 2, f"seq_len={self.seq_len}: must be >= 2")
        _check(self.packing in PACKINGS, f"packing={self.packing!r}: use one of {PACKINGS}")
        _check(self.sampling in SAMPLINGS, f"sampling={self.sampling!r}: use one of {SAMPLINGS}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"{name}={value}: must be in [0, 1)")
        _check(self.val_fraction + self.test_fraction < 1.0,
               f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction}: must be < 1 "
               "so that the train split keeps documents")
        _check(self.max_documents is None or self.max_documents >= 1,
               f"max_documents={self.max_documents}: must be >= 1, or null for all documents")
        _check(len(set(self.include_labels)) == len(self.include_labels) and all(self.include_labels),
               f"include_labels={list(self.include_labels)}: names must be non-empty and distinct")
        _check(self.num_proc >= 1, f"num_proc={self.num_proc}: must be >= 1")
        _check(bool(self.hf_split), "hf_split is empty: name the datasets split to read (e.g. train)")
        _check(isinstance(self.tokenizer, TokenizerConfig), "tokenizer must be a TokenizerConfig")
        self._check_instruction()

    def _check_instruction(self) -> None:
        _check(self.format in FORMATS, f"format={self.format!r}: use one of {FORMATS}")
        _check(self.loss_on is None or self.loss_on in LOSS_ON, f"loss_on={self.loss_on!r}: use one of {LOSS_ON} or null")
        _check(self.loss_on != "response" or self.format == "instruction",
               'loss_on="response" needs format="instruction": text documents have no response; '
               'set data.format to "instruction" (prompt/response or messages columns) or loss_on to "all"')
        for name in ("prompt_column", "response_column", "messages_column"):
            _check(bool(getattr(self, name)), f"{name} is empty: name the column of instruction examples that holds it")


def cache_root(cfg: DataConfig) -> Path:
    """cfg.cache_dir, else $DS_MOE_DIV_CACHE/data, else ~/.cache/ds_moe_div/data."""
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("DS_MOE_DIV_CACHE", "~/.cache/ds_moe_div")).expanduser() / "data"
