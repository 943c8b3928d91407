"""The held-out sequences of a run, labelled with the TRUE labels of a column of its corpus.

    split, names = relabelled_split(cfg.data, data, "test", column="subdomain")   # another label scheme
    split, names = relabelled_split(cfg.data, data, "test", column=cfg.data.domain_column)  # true labels
                                                                      # of a shuffled-label run

A run's splits are stratified by ITS label column, so preparing the data with another `domain_column`
would draw other held-out documents, some of them from the model's training split. Instead, this
re-derives the run's own split assignment (same scan, same seed), applies the run's label options as
prepare_data does (include_labels drops documents, shuffle_labels_seed permutes the labels that decide
the by_domain packing streams), re-packs those documents exactly as the run's data pipeline did, and
takes each token's label from `column`, never shuffled. The re-packed tokens and domain ids are checked
to be identical to the prepared split; only the labels returned differ.

Names: the run's own column keeps the run's classes (after include_labels); another column keeps the
classes that label at least one document the run uses (all of them unless include_labels dropped some).
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from ds_moe_div.data import DataConfig, DataError, PackedSplit, PreparedData
from ds_moe_div.data.documents import apply_label_options, iter_documents, scan_corpus
from ds_moe_div.data.packing import DocStore, majority_domain, pack_split
from ds_moe_div.data.readers import resolve_source
from ds_moe_div.data.splits import SPLITS, assign_splits
from ds_moe_div.data.tokenize import encode_documents, load_tokenizer


def relabelled_split(cfg: DataConfig, data: PreparedData, split: str, *, column: str) -> tuple[PackedSplit, tuple]:
    """(the packed `split` of `data` with the true domain ids of `column`, that scheme's domain names)."""
    source = resolve_source(cfg)
    scan = scan_corpus(source, cfg, show_progress=False)
    split_R = assign_splits(scan.domain_R, scan.scheme.domain_names, val_fraction=cfg.val_fraction,
                            test_fraction=cfg.test_fraction, seed=cfg.split_seed)
    run_scan, run_split_R = apply_label_options(scan, split_R, cfg)  # as prepared (the packing depends on it)
    true_R, names = _true_labels(source, cfg, scan, split_R, run_split_R, column)
    index = SPLITS.index(split)
    rows = np.flatnonzero(run_split_R == index)
    texts = [text for row, text in iter_documents(source, cfg, run_scan) if run_split_R[row] == index]
    ids, lengths = encode_documents(load_tokenizer(data.tokenizer_path, project_tokens=False), texts, data.eos_id)
    domains_R = run_scan.domain_R[rows]
    labels = np.repeat(true_R[rows], lengths).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        tokens_NS1, domains_NS1 = _pack(Path(tmp), "tokens", ids, lengths, domains_R, cfg, data, index)
        labels_NS1, _ = _pack(Path(tmp), "labels", labels, lengths, domains_R, cfg, data, index)
    reference = data.splits[split]
    if not (np.array_equal(tokens_NS1, reference.tokens_NS1) and np.array_equal(domains_NS1, reference.domains_NS1)):
        raise DataError(f"re-packing the {split!r} split of {cfg.corpus!r} did not reproduce the prepared one "
                        f"({data.cache_path}); the corpus or the data pipeline changed since it was prepared")
    new_NS1 = np.where(domains_NS1 >= 0, labels_NS1, -1).astype(np.int16)
    relabelled = PackedSplit(split, tokens_NS1, new_NS1, majority_domain(new_NS1, len(names)),
                             pad_id=reference.pad_id, num_domains=len(names))
    return relabelled, names


def _true_labels(source, cfg: DataConfig, scan, split_R: np.ndarray, run_split_R: np.ndarray,
                 column: str) -> tuple[np.ndarray, tuple]:
    """(domain id of every corpus row under `column`, never shuffled; the names of those ids)."""
    if column == cfg.domain_column:  # the run's scheme (label_map, include_labels), without the shuffle
        true_scan, _ = apply_label_options(scan, split_R, dataclasses.replace(cfg, shuffle_labels_seed=None))
        return true_scan.domain_R, true_scan.scheme.domain_names
    other_cfg = dataclasses.replace(cfg, domain_column=column, label_map=None, include_labels=(),
                                    shuffle_labels_seed=None)
    other = scan_corpus(source, other_cfg, show_progress=False)
    used = run_split_R >= 0
    if (other.domain_R[used] < 0).any():  # same texts, so the same empty, duplicate and subsampled rows
        raise DataError(f"column {column!r} does not label every document of the run; the corpus changed?")
    present = np.unique(other.domain_R[used])
    new_id = np.full(len(other.scheme.domain_names), -1, dtype=np.int16)
    new_id[present] = np.arange(len(present))
    true_R = np.where(other.domain_R >= 0, new_id[np.maximum(other.domain_R, 0)], -1).astype(np.int16)
    return true_R, tuple(other.scheme.domain_names[d] for d in present.tolist())


def _pack(tmp: Path, name: str, ids, lengths, domains_R, cfg: DataConfig, data: PreparedData, index: int):
    """Pack as prepare_data does (same stream order and row placement); return (tokens, domains) arrays."""
    store = DocStore(tmp / f"{name}.docs.bin")
    store.add(ids, lengths, domains_R)
    pack_split(store, tmp, name, packing=cfg.packing, seq_len=cfg.seq_len, pad_id=data.pad_id,
               num_domains=len(data.domain_names), seed=cfg.split_seed + index)
    return np.load(tmp / f"{name}.tokens.npy"), np.load(tmp / f"{name}.domains.npy")
