"""Pack tokenised documents into rows of seq_len+1 tokens, with the domain id of every token.

Documents (each followed by <|eos|>) are concatenated into a stream and cut into windows of seq_len+1
tokens with stride seq_len, so consecutive rows share one token and every token of the stream is a
target exactly once. "by_domain": one stream per domain, so a row never mixes domains; "mixed": one
stream of all documents in a seeded random order, each token keeping its own document's domain id.
The last row of a stream is filled with <|pad|> and domain -1. Rows are written to .npy memmaps in a
seeded random order, so any prefix of a split (an evaluation capped at k batches) samples all domains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHUNK_TOKENS = 1 << 20


class DocStore:
    """Tokenised documents of one split, appended to a flat int32 file; lengths and domains kept in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_bytes(b"")
        self._lengths: list[np.ndarray] = []
        self._domains: list[np.ndarray] = []

    def add(self, ids: np.ndarray, lengths: np.ndarray, domains: np.ndarray) -> None:
        with open(self.path, "ab") as f:
            ids.astype(np.int32, copy=False).tofile(f)
        self._lengths.append(lengths.astype(np.int64))
        self._domains.append(domains.astype(np.int16))

    def unlink(self) -> None:
        self.path.unlink()

    def close(self) -> tuple[np.ndarray, np.ndarray]:
        """(lengths_R, domains_R) over documents (R, docs/SHAPES.md), in the order they were added."""
        cat = np.concatenate
        return (cat(self._lengths) if self._lengths else np.zeros(0, np.int64),
                cat(self._domains) if self._domains else np.zeros(0, np.int16))


class RowWriter:
    """Cuts a stream given in chunks into [seq_len+1] rows; the i-th row goes to index position_N[i]."""

    def __init__(self, tokens_NS1: np.ndarray, domains_NS1: np.ndarray, pad_id: int, position_N: np.ndarray) -> None:
        self.tokens_NS1, self.domains_NS1, self.pad_id = tokens_NS1, domains_NS1, pad_id
        self.position_N = position_N
        self.width = tokens_NS1.shape[1]
        self.row = 0
        self.padding = 0
        self._tok = np.zeros(0, np.int32)
        self._dom = np.zeros(0, np.int16)

    def extend(self, tok: np.ndarray, dom: np.ndarray) -> None:
        tok, dom = np.concatenate([self._tok, tok]), np.concatenate([self._dom, dom])
        stride = self.width - 1
        n_rows = (len(tok) - 1) // stride
        if n_rows > 0:
            windows = np.lib.stride_tricks.sliding_window_view
            where = self.position_N[self.row:self.row + n_rows]
            self.tokens_NS1[where] = windows(tok, self.width)[::stride][:n_rows]
            self.domains_NS1[where] = windows(dom, self.width)[::stride][:n_rows]
            self.row += n_rows
        self._tok, self._dom = tok[n_rows * stride:], dom[n_rows * stride:]

    def end_stream(self) -> None:
        """Write the partial last row (padded); the next chunk starts a new stream."""
        if len(self._tok) > 1:
            n, where = len(self._tok), self.position_N[self.row]
            self.tokens_NS1[where] = self.pad_id
            self.domains_NS1[where] = -1
            self.tokens_NS1[where, :n] = self._tok
            self.domains_NS1[where, :n] = self._dom
            self.padding += self.width - n
            self.row += 1
        self._tok, self._dom = np.zeros(0, np.int32), np.zeros(0, np.int16)


def stream_orders(domains_R: np.ndarray, *, packing: str, num_domains: int, seed: int) -> list[np.ndarray]:
    """Document indices of each stream: one per domain (by_domain) or one of all documents (mixed)."""
    if packing == "mixed":
        return [np.random.default_rng([seed, 0]).permutation(len(domains_R))] if len(domains_R) else []
    orders = []
    for d in range(num_domains):
        docs = np.flatnonzero(domains_R == d)
        if len(docs):
            orders.append(np.random.default_rng([seed, 1, d]).permutation(docs))
    return orders


def count_rows(lengths_R: np.ndarray, orders: list[np.ndarray], seq_len: int) -> int:
    return sum(-(-(int(lengths_R[o].sum()) - 1) // seq_len) for o in orders)


def majority_domain(domains_NS1: np.ndarray, num_domains: int) -> np.ndarray:
    """Per row, the domain holding most input tokens (padding ignored); by_domain rows hold only one."""
    out = np.empty(len(domains_NS1), dtype=np.int16)
    for start in range(0, len(domains_NS1), 4096):
        block = np.asarray(domains_NS1[start:start + 4096, :-1], dtype=np.int64)
        keys = np.arange(len(block))[:, None] * (num_domains + 1) + block + 1  # column 0 counts padding
        counts = np.bincount(keys.ravel(), minlength=len(block) * (num_domains + 1)).reshape(len(block), -1)
        out[start:start + len(block)] = counts[:, 1:].argmax(axis=1)
    return out


def pack_split(store: DocStore, out_dir: Path, name: str, *, packing: str, seq_len: int, pad_id: int,
               num_domains: int, seed: int) -> dict:
    """Write {name}.tokens.npy [N,S+1] int32, {name}.domains.npy int16, {name}.seq_domain.npy [N] int16."""
    lengths_R, domains_R = store.close()
    orders = stream_orders(domains_R, packing=packing, num_domains=num_domains, seed=seed)
    n_rows = count_rows(lengths_R, orders, seq_len)
    shape = (n_rows, seq_len + 1)
    paths = {kind: out_dir / f"{name}.{kind}.npy" for kind in ("tokens", "domains", "seq_domain")}
    if n_rows == 0:
        np.save(paths["tokens"], np.zeros(shape, np.int32))
        np.save(paths["domains"], np.zeros(shape, np.int16))
        np.save(paths["seq_domain"], np.zeros(0, np.int16))
        return {"sequences": 0, "padding_tokens": 0}
    open_memmap = np.lib.format.open_memmap
    tokens_NS1 = open_memmap(paths["tokens"], mode="w+", dtype=np.int32, shape=shape)
    domains_NS1 = open_memmap(paths["domains"], mode="w+", dtype=np.int16, shape=shape)
    doc_tokens = np.memmap(store.path, dtype=np.int32, mode="r")
    starts_R = np.concatenate([[0], np.cumsum(lengths_R)[:-1]])
    writer = RowWriter(tokens_NS1, domains_NS1, pad_id, np.random.default_rng([seed, 2]).permutation(n_rows))
    for order in orders:
        pieces, dom_pieces, size = [], [], 0
        for doc in order.tolist():
            start, length = int(starts_R[doc]), int(lengths_R[doc])
            pieces.append(doc_tokens[start:start + length])
            dom_pieces.append(np.full(length, domains_R[doc], dtype=np.int16))
            size += length
            if size >= CHUNK_TOKENS:
                writer.extend(np.concatenate(pieces), np.concatenate(dom_pieces))
                pieces, dom_pieces, size = [], [], 0
        if pieces:
            writer.extend(np.concatenate(pieces), np.concatenate(dom_pieces))
        writer.end_stream()
    assert writer.row == n_rows, (writer.row, n_rows)
    np.save(paths["seq_domain"], majority_domain(domains_NS1, num_domains))
    tokens_NS1.flush()
    domains_NS1.flush()
    del tokens_NS1, domains_NS1, doc_tokens
    return {"sequences": n_rows, "padding_tokens": writer.padding}
