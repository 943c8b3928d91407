"""prepare_data end to end: splits, packing, label schemes, readers, streaming."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from ds_moe_div.data import DataConfig, load_tokenizer, prepare_data
from ds_moe_div.data.documents import iter_documents, scan_corpus
from ds_moe_div.data.readers import FIXTURE, resolve_source
from ds_moe_div.data.splits import SPLITS, assign_splits
from tests.test_data_common import (
    corpus_path,
    read_records,
    small_cfg,
    synthetic_records,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_prepare")


@pytest.fixture(scope="module")
def by_domain(tmp_dir):
    return prepare_data(small_cfg(tmp_dir), show_progress=False)


@pytest.fixture(scope="module")
def mixed(tmp_dir):
    return prepare_data(small_cfg(tmp_dir, packing="mixed"), show_progress=False)


def _texts_by_label(tmp_dir, column="domain") -> dict[str, str]:
    texts: dict[str, list[str]] = {}
    for record in read_records(corpus_path(tmp_dir)):
        texts.setdefault(record[column], []).append(record["text"])
    return {label: "\x00".join(t) for label, t in texts.items()}


def test_splits_disjoint_stratified_and_seeded(tmp_dir):
    cfg = small_cfg(tmp_dir)
    scan = scan_corpus(resolve_source(cfg), cfg, show_progress=False)
    split_R = assign_splits(scan.domain_R, scan.scheme.domain_names, val_fraction=0.1, test_fraction=0.1, seed=1)
    used = scan.domain_R >= 0
    assert ((split_R >= 0) == used).all()  # every used document in exactly one split, the others in none
    for d in range(len(scan.scheme.domain_names)):
        n = int((scan.domain_R == d).sum())
        counts = Counter(split_R[scan.domain_R == d].tolist())
        assert counts[1] == counts[2] == int(np.floor(n * 0.1 + 0.5)) >= 1
        assert counts[0] == n - counts[1] - counts[2]
    again = assign_splits(scan.domain_R, scan.scheme.domain_names, val_fraction=0.1, test_fraction=0.1, seed=1)
    other = assign_splits(scan.domain_R, scan.scheme.domain_names, val_fraction=0.1, test_fraction=0.1, seed=2)
    assert (again == split_R).all() and (other != split_R).any()


def test_no_text_in_two_splits(tmp_path):
    records = synthetic_records(90)
    write_jsonl(tmp_path / "dup.jsonl", records + records[:30])  # 30 exact duplicates
    data = prepare_data(small_cfg(tmp_path, corpus=str(tmp_path / "dup.jsonl")), show_progress=False)
    assert data.stats.duplicates_skipped == 30
    assert sum(sum(d.values()) for d in data.stats.documents.values()) == 90


def test_by_domain_rows_hold_one_domain_and_pad_at_the_end(by_domain):
    for split in by_domain.splits.values():
        dom = np.asarray(split.domains_NS1)
        tok = np.asarray(split.tokens_NS1)
        assert tok.dtype == np.int32 and dom.dtype == np.int16 and tok.shape == dom.shape
        assert tok.shape[1] == 65 and len(split) == tok.shape[0] > 0
        for row, seq_domain in zip(dom, split.domain_of_sequence_N, strict=True):
            real = row[row >= 0]
            assert (real == seq_domain).all()
            assert (row[: len(real)] >= 0).all()  # padding only as a suffix
        assert (tok[dom < 0] == by_domain.pad_id).all()
        assert set(np.unique(split.domain_of_sequence_N)) == set(range(len(by_domain.domain_names)))
    first = by_domain.splits["train"].domain_of_sequence_N[:100]  # rows stored shuffled: a prefix mixes domains
    assert len(set(first.tolist())) == len(by_domain.domain_names)


def test_mixed_rows_change_domain_only_after_eos(mixed):
    tok, dom = np.asarray(mixed.splits["train"].tokens_NS1), np.asarray(mixed.splits["train"].domains_NS1)
    change = (dom[:, 1:] != dom[:, :-1]) & (dom[:, 1:] >= 0)
    assert change.any(), "mixed packing should put documents of different domains in one row"
    assert (tok[:, :-1][change] == mixed.eos_id).all()


@pytest.mark.parametrize("packing", ["by_domain", "mixed"])
def test_every_domain_id_maps_back_to_its_label(packing, by_domain, mixed, tmp_dir):
    data = by_domain if packing == "by_domain" else mixed
    tokenizer = load_tokenizer(data.tokenizer_path)
    texts = _texts_by_label(tmp_dir)
    checked = 0
    for split in data.splits.values():
        for tok_row, dom_row in zip(split.tokens_NS1[:300], split.domains_NS1[:300], strict=True):
            real = int((dom_row >= 0).sum())
            bounds = [0, *(np.flatnonzero(tok_row[:real] == data.eos_id) + 1).tolist(), real]
            for start, end in itertools.pairwise(bounds):  # pieces of documents in the row
                ids = [int(t) for t in tok_row[start:end] if t != data.eos_id]
                domain = set(dom_row[start:end].tolist())
                if not ids:
                    continue
                assert len(domain) == 1
                name = data.domain_names[domain.pop()]
                # a piece cut at the row edge may split a UTF-8 character: drop the replacement chars there
                text = tokenizer.decode(ids, skip_special_tokens=False).strip("\ufffd")
                assert text in texts[name]
                checked += 1
    assert checked > 10


def test_stats_count_documents_and_tokens(by_domain):
    stats = by_domain.stats
    for split in SPLITS:
        assert set(stats.documents[split]) == set(by_domain.domain_names)
        assert all(n > 0 for n in stats.documents[split].values())
        real_tokens = int((np.asarray(by_domain.splits[split].domains_NS1) >= 0).sum())
        n_rows = stats.sequences[split]
        # rows overlap by one token: real positions = tokens + (rows - streams), one stream per domain
        assert real_tokens == sum(stats.tokens[split].values()) + n_rows - len(by_domain.domain_names)
        assert stats.padding_tokens[split] == int((np.asarray(by_domain.splits[split].domains_NS1) < 0).sum())


def test_label_map_merges_49_to_3(tmp_dir, by_domain, tmp_path):
    records = read_records(corpus_path(tmp_dir))
    groups: dict[str, set[str]] = {}
    for r in records:
        groups.setdefault(r["domain"], set()).add(r["subdomain"])
    label_map = tmp_path / "sub_to_domain.json"
    label_map.write_text(json.dumps({d: sorted(s) for d, s in groups.items()}))
    merged = prepare_data(small_cfg(tmp_dir, domain_column="subdomain", label_map=str(label_map)),
                          show_progress=False)
    assert merged.domain_names == by_domain.domain_names == ("code", "math", "prose")
    assert merged.cache_path != by_domain.cache_path
    for name in SPLITS:  # same documents, same stratification, same tokenizer: identical arrays
        assert (np.asarray(merged.splits[name].tokens_NS1) == np.asarray(by_domain.splits[name].tokens_NS1)).all()
        assert (np.asarray(merged.splits[name].domains_NS1) == np.asarray(by_domain.splits[name].domains_NS1)).all()


def test_subdomain_scheme_without_map(tmp_dir):
    records = read_records(corpus_path(tmp_dir))
    data = prepare_data(small_cfg(tmp_dir, domain_column="subdomain", val_fraction=0.0, test_fraction=0.0,
                                  max_documents=None), show_progress=False)
    assert data.domain_names == tuple(sorted({r["subdomain"] for r in records}))
    assert len(data.splits["val"]) == 0 and len(data.splits["test"]) == 0


def test_unknown_labels_become_other(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", synthetic_records(150))
    label_map = tmp_path / "map.yaml"
    label_map.write_text("code: [code]\nprose: prose\n")
    data = prepare_data(small_cfg(tmp_path, corpus=str(tmp_path / "c.jsonl"), label_map=str(label_map),
                                  unknown_labels="other"), show_progress=False)
    assert data.domain_names == ("code", "other", "prose")
    assert data.stats.unknown_as_other == ("math",)
    assert sum(data.stats.documents["train"].values()) == 150 - 2 * 15 - 0


def test_streaming_gives_identical_arrays(by_domain, tmp_dir):
    cfg = small_cfg(tmp_dir, streaming=True)
    assert scan_corpus(resolve_source(cfg), cfg, show_progress=False).texts is None  # nothing held in memory
    streamed = prepare_data(small_cfg(tmp_dir, streaming=True, cache_dir=str(tmp_dir / "cache_stream")),
                            show_progress=False)
    for name in SPLITS:
        assert (np.asarray(streamed.splits[name].tokens_NS1) == np.asarray(by_domain.splits[name].tokens_NS1)).all()


def test_max_documents_keeps_a_random_subset(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", synthetic_records(300))
    cfg = small_cfg(tmp_path, corpus=str(tmp_path / "c.jsonl"), max_documents=120)
    scan = scan_corpus(resolve_source(cfg), cfg, show_progress=False)
    kept = np.flatnonzero(scan.domain_R >= 0)
    assert len(kept) == 120 and kept.max() > 200  # not simply the first 120 rows
    assert len(list(iter_documents(resolve_source(cfg), cfg, scan))) == 120


def test_parquet_with_nested_label_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = synthetic_records(150)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet", row_group_size=40)
    write_jsonl(tmp_path / "c.jsonl", records)
    from_parquet = prepare_data(small_cfg(tmp_path, corpus=str(tmp_path / "c.parquet"), domain_column="meta.label"),
                                show_progress=False)
    from_jsonl = prepare_data(small_cfg(tmp_path, corpus=str(tmp_path / "c.jsonl")), show_progress=False)
    assert from_parquet.domain_names == from_jsonl.domain_names
    assert (np.asarray(from_parquet.splits["train"].tokens_NS1) == np.asarray(from_jsonl.splits["train"].tokens_NS1)).all()


@pytest.mark.parametrize("streaming", [False, True])
def test_datasets_reader_offline(tmp_path, monkeypatch, streaming):
    import csv

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    folder = tmp_path / "csv_corpus"
    folder.mkdir()
    records = synthetic_records(150)
    with open(folder / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "domain"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "domain": r["domain"]} for r in records)
    data = prepare_data(DataConfig(corpus=str(folder), cache_dir=str(tmp_path / "cache"), seq_len=32,
                                   streaming=streaming, val_fraction=0.1, test_fraction=0.1), show_progress=False)
    assert data.domain_names == ("code", "math", "prose")
    assert sum(data.stats.documents["val"].values()) == 15


def test_corpus_folder_of_files(tmp_path):
    records = synthetic_records(150)
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "a.jsonl.gz", records[:70])
    write_jsonl(tmp_path / "corpus" / "b.jsonl", records[70:])
    data = prepare_data(small_cfg(tmp_path, corpus=str(tmp_path / "corpus")), show_progress=False)
    assert data.stats.rows_read == 150


@pytest.mark.parametrize("column", ["domain", "group", "subdomain"])
def test_fixture_with_default_settings_for_each_label_scheme(column, tmp_path):
    """The committed fixture prepares with the defaults the trainer uses, at all three granularities."""
    records = read_records(FIXTURE)
    assert set(records[0]) == {"text", "domain", "group", "subdomain", "source", "license"}
    data = prepare_data(DataConfig(cache_dir=str(tmp_path), domain_column=column), show_progress=False)
    assert data.domain_names == tuple(sorted({r[column] for r in records}))
    assert data.vocab_size == 4096 and data.splits["train"].seq_len == 256
    for split in SPLITS:
        assert set(np.unique(data.splits[split].domain_of_sequence_N)) == set(range(len(data.domain_names)))
