"""Pack instruction examples into rows of seq_len+1 tokens with a loss mask: whole examples, never split.

An example longer than a row (seq_len+1 tokens) is truncated to its first seq_len+1 tokens (counted as
`truncated_examples` in the data's stats); one left without a scored target is dropped (`dropped_examples`).
Examples are laid into rows greedily in their stream's order (one stream per domain for "by_domain", one
seeded shuffle of all for "mixed", as packing.py): the next example starts a new row when it does not fit
the current one, whose rest is padding (<pad>, domain -1, mask 0). Rows do not overlap (unlike text rows);
a row's first token is never a target. Several examples may share a row and attend to the earlier ones,
as documents do in text packing. Rows are written in a seeded random order.
Files: {name}.tokens.npy, .domains.npy, .seq_domain.npy as packing.py, and {name}.loss_mask.npy [N, S+1]
uint8 (1 = the token is scored when it is a target).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .packing import DocStore, majority_domain, stream_orders


class ExampleStore(DocStore):
    """DocStore with a per-token uint8 loss mask in a second flat file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.mask_path = path.with_name(path.name + ".mask")
        self.mask_path.write_bytes(b"")

    def add(self, ids: np.ndarray, lengths: np.ndarray, domains: np.ndarray, mask: np.ndarray | None = None) -> None:
        super().add(ids, lengths, domains)
        with open(self.mask_path, "ab") as f:
            np.asarray(mask, dtype=np.uint8).tofile(f)

    def unlink(self) -> None:
        self.path.unlink()
        self.mask_path.unlink()


def fit_to_row(ids: np.ndarray, mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """(ids, mask, truncated) cut to `width` tokens, or None when no scored target is left (position 0 of
    a row is never a target)."""
    truncated = len(ids) > width
    ids, mask = ids[:width], mask[:width]
    return (ids, mask, truncated) if mask[1:].any() else None


def assign_rows(lengths_R: np.ndarray, orders: list[np.ndarray], width: int) -> list[list[int]]:
    """Example indices of each row: greedy, in stream order, a new row when the next does not fit."""
    rows: list[list[int]] = []
    for order in orders:
        current, fill = [], 0
        for doc in order.tolist():
            n = int(lengths_R[doc])
            if current and fill + n > width:
                rows.append(current)
                current, fill = [], 0
            current.append(doc)
            fill += n
        if current:
            rows.append(current)
    return rows


def pack_examples(store: ExampleStore, out_dir: Path, name: str, *, packing: str, seq_len: int, pad_id: int,
                  num_domains: int, seed: int) -> dict:
    """Write the split's arrays; returns {"sequences", "padding_tokens", "scored_tokens"}."""
    lengths_R, domains_R = store.close()
    width = seq_len + 1
    rows = assign_rows(lengths_R, stream_orders(domains_R, packing=packing, num_domains=num_domains, seed=seed), width)
    shape = (len(rows), width)
    kinds = {"tokens": np.int32, "domains": np.int16, "loss_mask": np.uint8}
    paths = {kind: out_dir / f"{name}.{kind}.npy" for kind in (*kinds, "seq_domain")}
    if not rows:
        for kind, dtype in kinds.items():
            np.save(paths[kind], np.zeros(shape, dtype))
        np.save(paths["seq_domain"], np.zeros(0, np.int16))
        return {"sequences": 0, "padding_tokens": 0, "scored_tokens": 0}
    arrays = {kind: np.lib.format.open_memmap(paths[kind], mode="w+", dtype=dtype, shape=shape)
              for kind, dtype in kinds.items()}
    doc_tokens = np.memmap(store.path, dtype=np.int32, mode="r")
    doc_mask = np.memmap(store.mask_path, dtype=np.uint8, mode="r")
    starts_R = np.concatenate([[0], np.cumsum(lengths_R)[:-1]])
    position_N = np.random.default_rng([seed, 2]).permutation(len(rows))
    padding = 0
    for docs, where in zip(rows, position_N.tolist(), strict=True):
        col = 0
        for doc in docs:
            start, n = int(starts_R[doc]), int(lengths_R[doc])
            arrays["tokens"][where, col:col + n] = doc_tokens[start:start + n]
            arrays["loss_mask"][where, col:col + n] = doc_mask[start:start + n]
            arrays["domains"][where, col:col + n] = domains_R[doc]
            col += n
        arrays["tokens"][where, col:] = pad_id
        arrays["domains"][where, col:] = -1
        arrays["loss_mask"][where, col:] = 0
        padding += width - col
    np.save(paths["seq_domain"], majority_domain(arrays["domains"], num_domains))
    scored = int(arrays["loss_mask"][:, 1:].sum(dtype=np.int64))
    for array in arrays.values():
        array.flush()
    del arrays, doc_tokens, doc_mask
    return {"sequences": len(rows), "padding_tokens": padding, "scored_tokens": scored}
