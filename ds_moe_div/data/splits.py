"""Train / val / test split of documents, stratified by domain and fixed by split_seed.

Within each domain the documents are permuted with a seed derived from (split_seed, domain id); the first
round(n * val_fraction) go to val, the next round(n * test_fraction) to test, the rest to train. A
document lands in exactly one split; duplicates were dropped before, so no text is in two splits.
"""

from __future__ import annotations

import numpy as np

from .errors import DataError

SPLITS = ("train", "val", "test")
UNUSED = -1


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def assign_splits(domain_R: np.ndarray, domain_names: tuple[str, ...], *, val_fraction: float,
                  test_fraction: float, seed: int) -> np.ndarray:
    """split_R[r] = index into SPLITS of row r, or UNUSED where domain_R[r] < 0."""
    split_R = np.full(len(domain_R), UNUSED, dtype=np.int8)
    fractions = {"val": val_fraction, "test": test_fraction}
    for d, name in enumerate(domain_names):
        rows = np.flatnonzero(domain_R == d)
        if len(rows) == 0:
            raise DataError(f"domain {name!r} has no documents in the corpus (label map or max_documents left "
                            "none); remove the class from label_map, or use more documents")
        rows = np.random.default_rng([seed, d]).permutation(rows)
        n_val, n_test = _round(len(rows) * val_fraction), _round(len(rows) * test_fraction)
        counts = {"train": len(rows) - n_val - n_test, "val": n_val, "test": n_test}
        for split, count in counts.items():
            if count == 0 and fractions.get(split, 1.0) > 0:
                raise DataError(
                    f"domain {name!r} has no documents in split {split!r} ({len(rows)} documents, "
                    f"val_fraction={val_fraction}, test_fraction={test_fraction}); use a larger "
                    f"{split}_fraction, fewer classes (label_map), or more documents"
                    if split != "train" else
                    f"domain {name!r} has no documents left for 'train' ({len(rows)} documents); "
                    "lower val_fraction/test_fraction or use more documents")
        split_R[rows[n_val + n_test:]] = 0
        split_R[rows[:n_val]] = 1
        split_R[rows[n_val:n_val + n_test]] = 2
    return split_R
