"""What prepare_data returns: packed splits as read-only memmaps, the tokenizer, labels and statistics."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from .splits import SPLITS


@dataclass(frozen=True)
class PackedSplit:
    """Rows of seq_len+1 tokens. domains_NS1 holds each token's document domain id (-1 = padding);
    domain_of_sequence_N the domain of each row (its only one in by_domain packing, its majority in mixed).
    loss_mask_NS1 (instruction data only): 1 where the token is scored as a target, 0 for prompt tokens and
    padding; None: every non-padding target is scored."""

    name: str
    tokens_NS1: np.ndarray  # int32 [N, seq_len+1]
    domains_NS1: np.ndarray  # int16 [N, seq_len+1]
    domain_of_sequence_N: np.ndarray  # int16 [N]
    pad_id: int
    num_domains: int
    loss_mask_NS1: np.ndarray | None = None  # uint8 [N, seq_len+1]

    @property
    def seq_len(self) -> int:
        return self.tokens_NS1.shape[1] - 1

    def __len__(self) -> int:
        return self.tokens_NS1.shape[0]


@dataclass(frozen=True)
class DataStats:
    """Per split: documents and tokens (EOS included) per domain name, packed sequences, padding tokens.
    Corpus-wide: rows read and documents left out (empty, exact duplicate, beyond max_documents).
    Instruction data only (else empty), per split: examples truncated to one row, examples dropped because
    no response token was left, and scored target tokens."""

    documents: dict[str, dict[str, int]]
    tokens: dict[str, dict[str, int]]
    sequences: dict[str, int]
    padding_tokens: dict[str, int]
    rows_read: int
    empty_skipped: int
    duplicates_skipped: int
    subsampled_out: int
    unknown_as_other: tuple[str, ...]
    build_seconds: float
    truncated_examples: dict[str, int] = field(default_factory=dict)
    dropped_examples: dict[str, int] = field(default_factory=dict)
    scored_tokens: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> DataStats:
        return cls(**{**d, "unknown_as_other": tuple(d["unknown_as_other"])})


@dataclass(frozen=True)
class PreparedData:
    tokenizer_path: Path
    vocab_size: int
    pad_id: int
    eos_id: int
    domain_names: tuple[str, ...]  # domain id -> label name of the scheme in use
    splits: dict[str, PackedSplit]  # "train", "val", "test"
    cache_path: Path
    stats: DataStats


def load_prepared(entry: Path, manifest: dict) -> PreparedData:
    splits = {}
    for name in SPLITS:
        arrays = [np.load(entry / f"{name}.{kind}.npy", mmap_mode="r") for kind in ("tokens", "domains", "seq_domain")]
        mask = entry / f"{name}.loss_mask.npy"
        splits[name] = PackedSplit(name, *arrays, pad_id=manifest["pad_id"], num_domains=len(manifest["domain_names"]),
                                   loss_mask_NS1=np.load(mask, mmap_mode="r") if mask.is_file() else None)
    return PreparedData(tokenizer_path=entry / "tokenizer.json", vocab_size=manifest["vocab_size"],
                        pad_id=manifest["pad_id"], eos_id=manifest["eos_id"],
                        domain_names=tuple(manifest["domain_names"]), splits=splits, cache_path=entry,
                        stats=DataStats.from_dict(manifest["stats"]))
