"""DataConfig / TokenizerConfig validation: a bad value names the field and the fix."""

from __future__ import annotations

import pytest

from ds_moe_div.data import DataConfig, TokenizerConfig
from ds_moe_div.data.config import cache_root


def test_defaults_are_valid():
    cfg = DataConfig()
    assert cfg.corpus == "fixture" and cfg.tokenizer == TokenizerConfig() and cfg.packing == "by_domain"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"seq_len": 1}, "seq_len=1"),
    ({"packing": "random"}, "packing='random'.*by_domain"),
    ({"sampling": "uniform"}, "sampling='uniform'"),
    ({"unknown_labels": "drop"}, "unknown_labels='drop'"),
    ({"val_fraction": 1.0}, r"val_fraction=1.0: must be in \[0, 1\)"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
    ({"max_documents": 0}, "max_documents=0"),
    ({"num_proc": 0}, "num_proc=0"),
    ({"corpus": "builtin"}, "corpus_dir"),
    ({"text_column": ""}, "text_column"),
])
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_tokenizer_config_checks():
    with pytest.raises(ValueError, match="tokenizer.vocab_size=100: must be >= 258"):
        TokenizerConfig(vocab_size=100)
    with pytest.raises(ValueError, match="tokenizer.min_frequency"):
        TokenizerConfig(min_frequency=0)


def test_cache_root(monkeypatch, tmp_path):
    assert cache_root(DataConfig(cache_dir=str(tmp_path))) == tmp_path
    monkeypatch.setenv("DS_MOE_DIV_CACHE", str(tmp_path / "root"))
    assert cache_root(DataConfig()) == tmp_path / "root" / "data"
    monkeypatch.delenv("DS_MOE_DIV_CACHE")
    assert str(cache_root(DataConfig())).endswith(".cache/ds_moe_div/data")
