"""Exact and near-exact duplicate detection for a stream of documents.

Exact: SHA-1 of the text with whitespace collapsed and case folded. Near-exact: MinHash over word
5-shingles (`NUM_PERM` permutations, LSH in `NUM_BANDS` bands); a candidate that shares a band is a
duplicate when its estimated Jaccard similarity is at least `threshold`. License texts come in many
variants that differ by a name or a year; these collapse. The first document seen is kept, so the result
is deterministic for a fixed input order.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

NUM_PERM = 32
NUM_BANDS = 8
SHINGLE_WORDS = 5
_MERSENNE = np.uint64((1 << 61) - 1)
_WORD = re.compile(r"\w+")
_rng = np.random.default_rng(20240601)
_PERM_A = _rng.integers(1, 1 << 31, size=NUM_PERM, dtype=np.uint64)
_PERM_B = _rng.integers(0, 1 << 31, size=NUM_PERM, dtype=np.uint64)


def exact_key(text: str) -> bytes:
    return hashlib.sha1(" ".join(text.split()).casefold().encode("utf-8")).digest()


_WORD_HASHES: dict[str, int] = {}


def _word_hash(word: str) -> int:
    """CRC-32 of the word, memoised: the same few thousand words recur in every document."""
    value = _WORD_HASHES.get(word)
    if value is None:
        if len(_WORD_HASHES) > 2_000_000:
            _WORD_HASHES.clear()
        value = _WORD_HASHES[word] = zlib.crc32(word.encode("utf-8"))
    return value


def minhash(text: str) -> np.ndarray | None:
    """MinHash signature (NUM_PERM uint64) of the word 5-shingles; None when the text is too short."""
    words = np.array(
        [_word_hash(w) for w in _WORD.findall(text.casefold())], dtype=np.uint64
    )
    if len(words) < SHINGLE_WORDS:
        return None
    shingles = np.zeros(len(words) - SHINGLE_WORDS + 1, dtype=np.uint64)
    for offset in range(SHINGLE_WORDS):  # polynomial hash of the window, 32 bits
        shingles = (
            shingles * np.uint64(1_000_003) + words[offset : offset + len(shingles)]
        ) & np.uint64(0xFFFFFFFF)
    shingles = np.unique(shingles)
    hashed = (shingles[None, :] * _PERM_A[:, None] + _PERM_B[:, None]) % _MERSENNE
    return hashed.min(axis=1)


class Deduplicator:
    """Stateful filter: `is_duplicate(text)` is True for an exact or near-exact repeat of an earlier text."""

    def __init__(self, *, threshold: float = 0.8, near: bool = True) -> None:
        self.threshold = threshold
        self.near = near
        self._exact: set[bytes] = set()
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(NUM_BANDS)]
        self._signatures: list[np.ndarray] = []
        self.exact_hits = 0
        self.near_hits = 0

    def is_duplicate(self, text: str) -> bool:
        key = exact_key(text)
        if key in self._exact:
            self.exact_hits += 1
            return True
        signature = minhash(text) if self.near else None
        if signature is not None and self._near_match(signature):
            self.near_hits += 1
            return True
        self._exact.add(key)
        if signature is not None:
            self._add(signature)
        return False

    def _bands(self, signature: np.ndarray) -> list[bytes]:
        rows = NUM_PERM // NUM_BANDS
        return [
            signature[b * rows : (b + 1) * rows].tobytes() for b in range(NUM_BANDS)
        ]

    def _near_match(self, signature: np.ndarray) -> bool:
        seen: set[int] = set()
        for band, key in zip(self._buckets, self._bands(signature)):
            for index in band.get(key, ()):
                if index not in seen:
                    seen.add(index)
                    if (
                        float(np.mean(self._signatures[index] == signature))
                        >= self.threshold
                    ):
                        return True
        return False

    def _add(self, signature: np.ndarray) -> None:
        index = len(self._signatures)
        self._signatures.append(signature)
        for band, key in zip(self._buckets, self._bands(signature)):
            band.setdefault(key, []).append(index)
