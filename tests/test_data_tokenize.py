"""Byte-level BPE: trained on the train split only, lossless, with <|pad|> and <|eos|>."""

from __future__ import annotations

import numpy as np

import ds_moe_div.data.prepare as prepare_module
from ds_moe_div.data import TokenizerConfig, load_tokenizer, prepare_data
from ds_moe_div.data.documents import scan_corpus
from ds_moe_div.data.readers import resolve_source
from ds_moe_div.data.splits import assign_splits
from ds_moe_div.data.tokenize import encode_documents, special_ids, train_tokenizer
from tests.test_data_common import small_cfg


def test_byte_level_round_trip_and_special_tokens():
    tokenizer = train_tokenizer(["hello world " * 20, "def f(x): return x"], TokenizerConfig(vocab_size=300),
                                show_progress=False)
    assert special_ids(tokenizer) == (0, 1)
    for text in ["hello world", "unseen: ünïcødé 漢字 🙂\ttabs\n\nnewlines", "  leading spaces"]:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
    ids, lengths = encode_documents(tokenizer, ["hello", "world x"], eos_id=1)
    assert lengths.sum() == len(ids) and ids[lengths[0] - 1] == 1 and ids[-1] == 1 and ids.dtype == np.int32


def test_tokenizer_sees_only_the_train_split(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path)
    seen: list[str] = []
    original = prepare_module.train_tokenizer

    def spy(texts, *args, **kwargs):
        texts = list(texts)
        seen.extend(texts)
        return original(texts, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "train_tokenizer", spy)
    data = prepare_data(cfg, show_progress=False)
    scan = scan_corpus(resolve_source(cfg), cfg, show_progress=False)
    split_R = assign_splits(scan.domain_R, scan.scheme.domain_names, val_fraction=cfg.val_fraction,
                            test_fraction=cfg.test_fraction, seed=cfg.split_seed)
    assert seen == [scan.texts[r] for r in np.flatnonzero(split_R == 0)]
    tokenizer = load_tokenizer(data.tokenizer_path)
    assert tokenizer.get_vocab_size() == data.vocab_size == 512
    assert special_ids(tokenizer) == (data.pad_id, data.eos_id)


def test_max_train_mb_trains_on_a_random_part_of_the_train_split(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, tokenizer=TokenizerConfig(vocab_size=512, max_train_mb=0.2))
    seen: list[str] = []
    original = prepare_module.train_tokenizer
    monkeypatch.setattr(prepare_module, "train_tokenizer",
                        lambda texts, *a, **k: original(seen.extend(texts) or seen, *a, **k))
    prepare_data(cfg, show_progress=False)
    scan = scan_corpus(resolve_source(cfg), cfg, show_progress=False)
    split_R = assign_splits(scan.domain_R, scan.scheme.domain_names, val_fraction=cfg.val_fraction,
                            test_fraction=cfg.test_fraction, seed=cfg.split_seed)
    train = {scan.texts[r] for r in np.flatnonzero(split_R == 0)}
    assert set(seen) <= train and 0.15e6 < sum(len(t.encode()) for t in seen) <= 0.2e6
