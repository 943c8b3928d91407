"""Bad inputs raise DataError naming the file, the row and the fix."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from ds_moe_div.data import (
    DataConfig,
    DataError,
    PackedSplit,
    TokenizerConfig,
    check_enough,
    prepare_data,
)
from tests.test_data_common import small_cfg, synthetic_records, write_jsonl


def _prepare(tmp_path, records=None, name="c.jsonl", **overrides):
    path = tmp_path / name
    if records is not None:
        write_jsonl(path, records)
    return prepare_data(small_cfg(tmp_path, corpus=str(path), **overrides), show_progress=False)


def test_missing_text_column(tmp_path):
    records = synthetic_records(30)
    records[4] = {"body": "x", "domain": "code"}
    with pytest.raises(DataError, match=r"c\.jsonl:5: no column 'text' .*\['body', 'domain'\].*text_column"):
        _prepare(tmp_path, records)


def test_missing_nested_domain_column(tmp_path):
    with pytest.raises(DataError, match=r"c\.jsonl:1: no column 'meta\.source'.*domain_column"):
        _prepare(tmp_path, synthetic_records(30), domain_column="meta.source")


def test_label_not_in_map(tmp_path):
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"code": "code", "prose": "prose"}))
    with pytest.raises(DataError, match=r"c\.jsonl:2: label 'math' is not in the label map .*unknown_labels=\"other\""):
        _prepare(tmp_path, synthetic_records(30), label_map=str(label_map))


def test_label_map_conflict_and_malformed(tmp_path):
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"a": ["python"], "b": ["python"]}))
    with pytest.raises(DataError, match="maps to both"):
        _prepare(tmp_path, synthetic_records(30), label_map=str(label_map))
    label_map.write_text("{not json")
    with pytest.raises(DataError, match=r"map\.json: not valid JSON"):
        _prepare(tmp_path, synthetic_records(30), label_map=str(label_map))


def test_empty_documents_are_skipped_and_counted(tmp_path):
    records = synthetic_records(150) + [{"text": "  \n", "domain": "code"}, {"text": "", "domain": "math"}]
    data = _prepare(tmp_path, records)
    assert data.stats.empty_skipped == 2 and data.stats.rows_read == 152


def test_all_documents_empty(tmp_path):
    with pytest.raises(DataError, match=r"c\.jsonl: all 3 documents are empty"):
        _prepare(tmp_path, [{"text": "", "domain": "a"}] * 3)


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    lines = [json.dumps(r).encode() for r in synthetic_records(30)]
    lines[6] = b'{"text": "caf\xe9", "domain": "prose"}'
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"c\.jsonl\.gz:7: invalid UTF-8 at byte 13 .*iconv"):
        _prepare(tmp_path, name="c.jsonl.gz")


def test_unpaired_surrogate(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps(r) for r in synthetic_records(30)]
    lines[2] = '{"text": "bad \\ud800 escape", "domain": "prose"}'
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"c\.jsonl:3: text holds an unpaired surrogate"):
        _prepare(tmp_path)


def test_bad_json_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(synthetic_records(1)[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid JSON"):
        _prepare(tmp_path)


def test_non_string_text(tmp_path):
    with pytest.raises(DataError, match=r"c\.jsonl:1: column 'text' holds int"):
        _prepare(tmp_path, [{"text": 5, "domain": "a"}])


def test_domain_without_documents_in_a_split(tmp_path):
    records = synthetic_records(150) + [{"text": f"rare {i}", "domain": "rare"} for i in range(4)]
    with pytest.raises(DataError, match=r"domain 'rare' has no documents in split 'val' \(4 documents.*larger "
                                        r"val_fraction, fewer classes"):
        _prepare(tmp_path, records)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare_data(DataConfig(corpus=str(tmp_path / "nope.jsonl"), cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match="no built-in corpus there"):
        prepare_data(DataConfig(corpus="builtin", corpus_dir=str(tmp_path), cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match="tokenizer file not found"):
        _prepare(tmp_path, synthetic_records(30), tokenizer=TokenizerConfig(path=str(tmp_path / "t.json")))


def test_tokenizer_without_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "plain.json"
    Tokenizer(models.BPE()).save(str(path))
    # A given tokenizer needs no <|pad|>/<|eos|> (a checkpoint's own), but some end-of-text token.
    with pytest.raises(DataError, match=r"no end-of-text token.*Add \"eos_token\""):
        _prepare(tmp_path, synthetic_records(30), tokenizer=TokenizerConfig(path=str(path)))


def test_check_enough():
    split = PackedSplit("train", np.zeros((3, 9), np.int32), np.zeros((3, 9), np.int16), np.zeros(3, np.int16),
                        pad_id=0, num_domains=1)
    check_enough(split, 3)
    with pytest.raises(DataError, match=r"'train' holds 3 sequences of seq_len 8, fewer than one global batch of 4"):
        check_enough(split, 4)


def test_unloadable_datasets_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    with pytest.raises(DataError, match="someone/nonexistent: not a local .*datasets could not load it"):
        prepare_data(DataConfig(corpus="someone/nonexistent", cache_dir=str(tmp_path)), show_progress=False)
