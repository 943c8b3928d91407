"""The held-out sequences of a run, labelled with another label scheme of the same corpus.

    split, names = relabelled_split(cfg.data, data, "test", column="subdomain")

A run's splits are stratified by ITS label column, so preparing the data with another `domain_column`
would draw other held-out documents, some of them from the model's training split. Instead, this
re-derives the run's own split assignment (same scan, same seed), re-packs those documents exactly as
the run's data pipeline did, and takes each token's label from the other column. The re-packed tokens
are checked to be identical to the prepared split; only the domain ids differ.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from ds_moe_div.data import DataConfig, DataError, PackedSplit, PreparedData
from ds_moe_div.data.documents import iter_documents, scan_corpus
from ds_moe_div.data.packing import DocStore, majority_domain, pack_split
from ds_moe_div.data.readers import resolve_source
from ds_moe_div.data.splits import SPLITS, assign_splits
from ds_moe_div.data.tokenize import encode_documents, load_tokenizer


def relabelled_split(cfg: DataConfig, data: PreparedData, split: str, *, column: str) -> tuple[PackedSplit, tuple]:
    """(the packed `split` of `data` with domain ids of `column`, that scheme's domain names)."""
    source = resolve_source(cfg)
    scan = scan_corpus(source, cfg, show_progress=False)
    other = scan_corpus(source, dataclasses.replace(cfg, domain_column=column, label_map=None), show_progress=False)
    split_R = assign_splits(scan.domain_R, scan.scheme.domain_names, val_fraction=cfg.val_fraction,
                            test_fraction=cfg.test_fraction, seed=cfg.split_seed)
    index = SPLITS.index(split)
    rows = np.flatnonzero(split_R == index)
    texts = [text for row, text in iter_documents(source, cfg, scan) if split_R[row] == index]
    ids, lengths = encode_documents(load_tokenizer(data.tokenizer_path), texts, data.eos_id)
    domains_D = scan.domain_R[rows]
    labels = np.repeat(other.domain_R[rows], lengths).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        tokens_NS1, domains_NS1 = _pack(Path(tmp), "tokens", ids, lengths, domains_D, cfg, data, index)
        labels_NS1, _ = _pack(Path(tmp), "labels", labels, lengths, domains_D, cfg, data, index)
    reference = data.splits[split]
    if not (np.array_equal(tokens_NS1, reference.tokens_NS1) and np.array_equal(domains_NS1, reference.domains_NS1)):
        raise DataError(f"re-packing the {split!r} split of {cfg.corpus!r} did not reproduce the prepared one "
                        f"({data.cache_path}); the corpus or the data pipeline changed since it was prepared")
    names = other.scheme.domain_names
    new_NS1 = np.where(domains_NS1 >= 0, labels_NS1, -1).astype(np.int16)
    relabelled = PackedSplit(split, tokens_NS1, new_NS1, majority_domain(new_NS1, len(names)),
                             pad_id=reference.pad_id, num_domains=len(names))
    return relabelled, names


def _pack(tmp: Path, name: str, ids, lengths, domains_D, cfg: DataConfig, data: PreparedData, index: int):
    """Pack as prepare_data does (same stream order and row placement); return (tokens, domains) arrays."""
    store = DocStore(tmp / f"{name}.docs.bin")
    store.add(ids, lengths, domains_D)
    pack_split(store, tmp, name, packing=cfg.packing, seq_len=cfg.seq_len, pad_id=data.pad_id,
               num_domains=len(data.domain_names), seed=cfg.split_seed + index)
    return np.load(tmp / f"{name}.tokens.npy"), np.load(tmp / f"{name}.domains.npy")
