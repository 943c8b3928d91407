"""Which held-out rows an evaluation with a batch budget scores: every class first, then the split's order.

    rows = stratified_rows(split.domains_NS1, budget=max_batches * global_batch, num_domains=D)
    split = subset(split, rows)        # a PackedSplit of those rows, in the split's order

Packed rows sit in a seeded random order, so the first `budget` rows are a random sample in which a rare
class (4 of 41 subdomains at the default 32 batches) can be missing. Here every class that has a token in
the split gets at least one row (rarest classes first, each its first row in split order that holds
it), then the budget is filled with the remaining rows in split order. A row holds a class when one of its
input positions (the target's domain, see heldout.py) carries that class. Deterministic: every rank and
every run of the same data picks the same rows.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ds_moe_div.data.prepared import PackedSplit

BLOCK = 4096


def rows_holding(domains_NS1: np.ndarray, num_domains: int) -> np.ndarray:
    """bool [N, D]: row n has an input position of class d."""
    out = np.zeros((len(domains_NS1), num_domains), dtype=bool)
    for start in range(0, len(domains_NS1), BLOCK):
        block = np.asarray(domains_NS1[start:start + BLOCK, :-1], dtype=np.int64)
        rows, cols = np.nonzero(block >= 0)
        out[start + rows, block[rows, cols]] = True
    return out


def stratified_rows(domains_NS1: np.ndarray, *, budget: int, num_domains: int) -> np.ndarray:
    """Sorted row indices, min(budget, N) of them: one row for each class present in the split (as the
    budget allows, rarest first), then the first rows in split order."""
    n = len(domains_NS1)
    budget = min(budget, n)
    if budget >= n:
        return np.arange(n)
    holds_ND = rows_holding(domains_NS1, num_domains)
    chosen: list[int] = []
    covered = np.zeros(num_domains, dtype=bool)
    for d in np.argsort(holds_ND.sum(0), kind="stable"):
        if len(chosen) >= budget:
            break
        if covered[d] or not holds_ND[:, d].any():
            continue
        row = int(np.flatnonzero(holds_ND[:, d])[0])
        chosen.append(row)
        covered |= holds_ND[row]
    taken = np.zeros(n, dtype=bool)
    taken[chosen] = True
    fill = np.flatnonzero(~taken)[:budget - len(chosen)]
    return np.sort(np.concatenate([np.asarray(chosen, dtype=np.int64), fill]))


def subset(split: PackedSplit, rows: np.ndarray) -> PackedSplit:
    """The rows `rows` of `split` (copied into memory), same name, pad id and classes."""
    if len(rows) == len(split) and np.array_equal(rows, np.arange(len(split))):
        return split
    return PackedSplit(split.name, np.asarray(split.tokens_NS1[rows]), np.asarray(split.domains_NS1[rows]),
                       np.asarray(split.domain_of_sequence_N[rows]), split.pad_id, split.num_domains)


def select(split: PackedSplit, *, max_batches: int | None, global_batch: int) -> tuple[PackedSplit, np.ndarray]:
    """(the rows an evaluation of at most `max_batches` global batches scores, rows of the whole split
    holding each class [D]). max_batches None: the whole split."""
    counts_D = rows_holding(split.domains_NS1, split.num_domains).sum(0)
    if max_batches is None:
        return split, counts_D
    rows = stratified_rows(split.domains_NS1, budget=max_batches * global_batch, num_domains=split.num_domains)
    return subset(split, rows), counts_D


def missing_classes_warning(tokens_by_class: dict[str, int], *, split_counts: Sequence[int], max_batches,
                            split: str) -> str | None:
    """A warning naming the classes with no scored token and the fix, or None when every class has tokens.
    `split_counts[d]`: rows of the whole split holding class d (0: the split has none of it)."""
    empty = [name for name, tokens in tokens_by_class.items() if tokens == 0]
    if not empty:
        return None
    names = list(tokens_by_class)
    absent = [n for n in empty if split_counts[names.index(n)] == 0]
    short = [n for n in empty if n not in absent]
    parts = []
    if short:
        parts.append(f"{len(short)} class(es) got no held-out token within --max-batches {max_batches} "
                     f"({', '.join(short)}): raise --max-batches, or use --max-batches all")
    if absent:
        parts.append(f"{len(absent)} class(es) have no token in the whole {split} split ({', '.join(absent)}): "
                     f"their per-class numbers are n/a; a larger {split}_fraction in the data config gives them some")
    return "warning: " + "; ".join(parts)
