"""Cache: a second call is a hit, the key follows the settings, and builds are atomic."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ds_moe_div.data.prepare as prepare_module
from ds_moe_div.data import TokenizerConfig, prepare_data
from ds_moe_div.data.cache import MANIFEST
from tests.test_data_common import small_cfg

REPO = Path(__file__).resolve().parents[1]


def _no_build(*args, **kwargs):
    raise AssertionError("expected a cache hit, but prepare_data rebuilt")


def _no_training(*args, **kwargs):
    raise AssertionError("expected the cached tokenizer, but prepare_data trained one")


def test_second_call_is_a_cache_hit(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path)
    first = prepare_data(cfg, show_progress=False)
    monkeypatch.setattr(prepare_module, "_build", _no_build)
    start = time.perf_counter()
    second = prepare_data(cfg, show_progress=False)
    assert time.perf_counter() - start < 1.0
    assert second.cache_path == first.cache_path and second.domain_names == first.domain_names
    assert (np.asarray(second.splits["train"].tokens_NS1) == np.asarray(first.splits["train"].tokens_NS1)).all()
    assert second.stats == first.stats


def test_key_follows_seq_len_and_vocab(tmp_path, monkeypatch):
    base = prepare_data(small_cfg(tmp_path), show_progress=False)
    monkeypatch.setattr(prepare_module, "train_tokenizer", _no_training)
    longer = prepare_data(small_cfg(tmp_path, seq_len=96), show_progress=False)  # re-packs, same tokenizer
    assert longer.cache_path != base.cache_path and longer.splits["train"].seq_len == 96
    assert longer.tokenizer_path.read_bytes() == base.tokenizer_path.read_bytes()
    monkeypatch.undo()
    bigger = prepare_data(small_cfg(tmp_path, tokenizer=TokenizerConfig(vocab_size=600)), show_progress=False)
    assert bigger.cache_path != base.cache_path and bigger.vocab_size == 600 != base.vocab_size


def test_given_tokenizer_file_is_used_and_hashed(tmp_path):
    trained = prepare_data(small_cfg(tmp_path), show_progress=False)
    given = tmp_path / "tok.json"
    given.write_bytes(trained.tokenizer_path.read_bytes())
    data = prepare_data(small_cfg(tmp_path, tokenizer=TokenizerConfig(path=str(given))), show_progress=False)
    assert data.vocab_size == trained.vocab_size and data.cache_path != trained.cache_path
    assert (np.asarray(data.splits["val"].tokens_NS1) == np.asarray(trained.splits["val"].tokens_NS1)).all()


CRASH = """
import os, sys
import ds_moe_div.data.prepare as p
from tests.test_data_common import small_cfg
from pathlib import Path
original = p.pack_split
def pack_then_die(*args, **kwargs):
    result = original(*args, **kwargs)
    os._exit(17)  # a hard crash (like SIGKILL) after the first split was written
p.pack_split = pack_then_die
p.prepare_data(small_cfg(Path(sys.argv[1])), show_progress=False)
"""


def test_crash_mid_build_leaves_no_entry_and_next_call_rebuilds(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path)], check=False, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 17, proc.stderr
    cache = tmp_path / "cache"
    assert not list(cache.glob(f"*/{MANIFEST}"))  # nothing that looks complete
    assert list(cache.glob("*.tmp-*"))  # the crashed build's temp folder
    data = prepare_data(small_cfg(tmp_path), show_progress=False)
    assert (data.cache_path / MANIFEST).is_file() and len(data.splits["test"]) > 0


def test_exception_mid_build_cleans_up(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_module, "pack_split", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_data(small_cfg(tmp_path), show_progress=False)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "tokenizers"]


def test_incomplete_entry_is_rebuilt(tmp_path):
    first = prepare_data(small_cfg(tmp_path), show_progress=False)
    (first.cache_path / MANIFEST).unlink()  # e.g. a partial copy of the cache
    (first.cache_path / "train.tokens.npy").write_bytes(b"garbage")
    again = prepare_data(small_cfg(tmp_path), show_progress=False)
    assert again.cache_path == first.cache_path
    assert (again.cache_path / MANIFEST).is_file() and len(again.splits["train"]) == len(first.splits["train"])
