"""One validating pass over the corpus: labels, empty and duplicate documents, the max_documents subset.

The result gives each row of the corpus a domain id (-1 = not used) and, unless streaming, keeps the
texts so that later passes (tokenizer training, tokenisation) need not read the corpus again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ds_moe_div import progress

from .config import DataConfig
from .errors import DataError, at
from .labels import LabelScheme, build_scheme, label_key, load_label_map
from .readers import Source, iter_rows

EMPTY, DUPLICATE, SUBSAMPLED, EXCLUDED = -1, -2, -3, -4


@dataclass(frozen=True)
class Scan:
    """domain_R[r] = domain id of corpus row r, or EMPTY / DUPLICATE / SUBSAMPLED / EXCLUDED (include_labels);
    bytes_R its UTF-8 size."""

    domain_R: np.ndarray
    bytes_R: np.ndarray
    scheme: LabelScheme
    texts: list[str] | None  # None when streaming: re-read the corpus instead

    def count(self, code: int) -> int:
        return int((self.domain_R == code).sum())


def _utf8(text: str, source: str, row: int) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{at(source, row)}: text holds an unpaired surrogate {text[e.start]!r} at character {e.start} "
                        "(invalid UTF-8, often a bad \\ud8xx JSON escape); fix or drop that document") from None


def scan_corpus(source: Source, cfg: DataConfig, *, show_progress: bool = True) -> Scan:
    codes: dict[str, int] = {}
    first_seen: dict[str, tuple[str, int]] = {}
    code_R = array("i")
    bytes_R = array("q")
    seen: set[bytes] = set()
    texts: list[str] | None = None if cfg.streaming else []
    rows = progress.wrap(iter_rows(source, cfg), desc="read corpus", unit="doc", enabled=show_progress)
    for text, raw, src, row in rows:
        key = label_key(raw, src, row)
        code, size = EMPTY, 0
        if text.strip():
            encoded = _utf8(text, src, row)
            size = len(encoded)
            digest = hashlib.blake2b(encoded, digest_size=12).digest()
            code = DUPLICATE if digest in seen else codes.setdefault(key, len(codes))
            seen.add(digest)
            first_seen.setdefault(key, (src, row))
        code_R.append(code)
        bytes_R.append(size)
        if texts is not None:
            texts.append(text if code >= 0 else "")
    if not first_seen:
        what = f"all {len(code_R)} documents are empty" if code_R else "no rows"
        raise DataError(f"{source.hf_name or source.files[0]}: {what}; check the corpus path and text_column")
    label_map = load_label_map(cfg.label_map) if cfg.label_map else None
    scheme = build_scheme(first_seen, label_map, cfg.unknown_labels, cfg.label_map)
    lookup = np.array([scheme.raw_to_id[raw] for raw in codes], dtype=np.int16)
    code_np = np.frombuffer(code_R, dtype=np.int32)
    domain_R = np.where(code_np >= 0, lookup[np.maximum(code_np, 0)], code_np).astype(np.int16)
    _subsample(domain_R, cfg)
    return Scan(domain_R, np.frombuffer(bytes_R, dtype=np.int64), scheme, texts)


def _subsample(domain_R: np.ndarray, cfg: DataConfig) -> None:
    """Keep a seeded uniform random subset of max_documents documents (corpora are often sorted by source)."""
    kept = np.flatnonzero(domain_R >= 0)
    if cfg.max_documents is None or len(kept) <= cfg.max_documents:
        return
    rng = np.random.default_rng([cfg.split_seed, 7])
    keep = np.zeros(len(domain_R), dtype=bool)
    keep[rng.choice(kept, size=cfg.max_documents, replace=False)] = True
    domain_R[(domain_R >= 0) & ~keep] = SUBSAMPLED


def iter_documents(source: Source, cfg: DataConfig, scan: Scan) -> Iterator[tuple[int, str]]:
    """(row, text) of every used document, in corpus order; re-reads the corpus when streaming."""
    if scan.texts is not None:
        for row in np.flatnonzero(scan.domain_R >= 0).tolist():
            yield row, scan.texts[row]
        return
    n_rows = 0
    for text, *_ in iter_rows(source, cfg):
        if n_rows >= len(scan.domain_R):
            n_rows += 1
            break
        if scan.domain_R[n_rows] >= 0:
            yield n_rows, text
        n_rows += 1
    if n_rows != len(scan.domain_R):
        raise DataError(f"{source.hf_name or source.files[0]}: the corpus changed while it was being read ({len(scan.domain_R)} rows, then "
                        f"{n_rows}); do not modify it during prepare_data")


def label_options_key(cfg: DataConfig) -> dict | None:
    """The part of the cache key for include_labels / shuffle_labels_seed (None when both are off, so
    existing cache entries keep their keys). Not part of the tokenizer key: the options act after it."""
    if not cfg.include_labels and cfg.shuffle_labels_seed is None:
        return None
    return {"include_labels": list(cfg.include_labels), "shuffle_labels_seed": cfg.shuffle_labels_seed}


def apply_label_options(scan: Scan, split_R: np.ndarray, cfg: DataConfig) -> tuple[Scan, np.ndarray]:
    """include_labels, then shuffle_labels_seed, applied after the split (and the tokenizer) was fixed.

    include_labels keeps the documents of those classes (ids renumbered in the scheme's order); the
    others become UNUSED in split_R and EXCLUDED in domain_R. shuffle_labels_seed permutes the
    domain ids among the used documents of each split with rng([seed, split]): each split keeps its
    document count per class and its documents; only which document carries which name changes.
    """
    domain_R, split_R, scheme = scan.domain_R.copy(), split_R.copy(), scan.scheme
    if cfg.include_labels:
        names = scheme.domain_names
        missing = [n for n in cfg.include_labels if n not in names]
        if missing:
            raise DataError(f"include_labels names {missing}, which are not classes of domain_column "
                            f"{cfg.domain_column!r}; classes: {list(names)}")
        kept = [d for d, n in enumerate(names) if n in cfg.include_labels]
        new_id = np.full(len(names), EXCLUDED, dtype=np.int16)
        new_id[kept] = np.arange(len(kept))
        used = domain_R >= 0
        domain_R[used] = new_id[domain_R[used]]
        split_R[domain_R < 0] = -1
        raw_to_id = {raw: int(new_id[d]) for raw, d in scheme.raw_to_id.items() if new_id[d] >= 0}
        scheme = LabelScheme(tuple(names[d] for d in kept), raw_to_id, scheme.unknown_as_other)
    if cfg.shuffle_labels_seed is not None:
        for s in np.unique(split_R[split_R >= 0]).tolist():
            rows = np.flatnonzero(split_R == s)
            domain_R[rows] = np.random.default_rng([cfg.shuffle_labels_seed, s]).permutation(domain_R[rows])
    return Scan(domain_R, scan.bytes_R, scheme, scan.texts), split_R
