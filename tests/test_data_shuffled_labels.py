"""data.shuffle_labels_seed (the negative control) and data.include_labels (fine-tuning on one group).

Both act after the stratified split and the tokenizer: the documents of each split and the tokenizer
stay those of the unmodified corpus, so a control or a fine-tuned run is evaluated on the same
held-out documents, with the same token ids, as the baseline.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from ds_moe_div.config import load_experiment
from ds_moe_div.data import DataConfig, DataError, prepare_data
from ds_moe_div.data.documents import EXCLUDED, apply_label_options, scan_corpus
from ds_moe_div.data.readers import resolve_source
from ds_moe_div.data.splits import SPLITS, assign_splits
from tests.test_data_common import small_cfg


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_labels")


@pytest.fixture(scope="module")
def scanned(tmp_dir):
    cfg = small_cfg(tmp_dir)
    scan = scan_corpus(resolve_source(cfg), cfg, show_progress=False)
    split_R = assign_splits(scan.domain_R, scan.scheme.domain_names, val_fraction=cfg.val_fraction,
                            test_fraction=cfg.test_fraction, seed=cfg.split_seed)
    return cfg, scan, split_R


@pytest.fixture(scope="module")
def full(tmp_dir):
    return prepare_data(small_cfg(tmp_dir), show_progress=False)


def _counts(domain_R, split_R, s):
    return Counter(domain_R[split_R == s].tolist())


def test_shuffle_keeps_proportions_per_split_and_moves_labels(scanned):
    cfg, scan, split_R = scanned
    shuffled, split_after = apply_label_options(scan, split_R, replace(cfg, shuffle_labels_seed=7))
    assert (split_after == split_R).all()  # same documents in every split
    assert shuffled.scheme.domain_names == scan.scheme.domain_names  # names unchanged
    for s in range(len(SPLITS)):
        assert _counts(shuffled.domain_R, split_R, s) == _counts(scan.domain_R, split_R, s)
    used = split_R >= 0
    moved = float((shuffled.domain_R[used] != scan.domain_R[used]).mean())
    shares = np.bincount(scan.domain_R[used]) / used.sum()
    expected = 1.0 - float((shares ** 2).sum())  # a random permutation moves this share on average
    assert moved > 0.7 * expected > 0.2
    assert (shuffled.domain_R[~used] == scan.domain_R[~used]).all()


def test_shuffle_is_deterministic_per_seed(scanned):
    cfg, scan, split_R = scanned

    def with_seed(seed):
        return apply_label_options(scan, split_R, replace(cfg, shuffle_labels_seed=seed))[0]

    assert (with_seed(3).domain_R == with_seed(3).domain_R).all()
    assert (with_seed(3).domain_R != with_seed(4).domain_R).any()
    assert (apply_label_options(scan, split_R, cfg)[0].domain_R == scan.domain_R).all()  # off: unchanged


def test_include_labels_keeps_one_class_with_its_split(scanned):
    cfg, scan, split_R = scanned
    math = scan.scheme.domain_names.index("math")
    kept, split_after = apply_label_options(scan, split_R, replace(cfg, include_labels=("math",)))
    assert kept.scheme.domain_names == ("math",)
    was_math = scan.domain_R == math
    assert (kept.domain_R[was_math] == 0).all()
    assert (kept.domain_R[(scan.domain_R >= 0) & ~was_math] == EXCLUDED).all()
    assert (split_after[was_math] == split_R[was_math]).all() and (split_after[~was_math] == -1).all()


def test_prepared_control_has_same_documents_and_tokenizer(tmp_dir, full):
    control = prepare_data(small_cfg(tmp_dir, shuffle_labels_seed=11), show_progress=False)
    assert control.cache_path != full.cache_path
    assert control.tokenizer_path.read_bytes() == full.tokenizer_path.read_bytes()
    assert control.domain_names == full.domain_names
    for split in SPLITS:
        assert control.stats.documents[split] == full.stats.documents[split]  # per-class counts kept
        assert sum(control.stats.tokens[split].values()) == sum(full.stats.tokens[split].values())
    assert control.stats.tokens["train"] != full.stats.tokens["train"]  # documents changed class
    manifest = json.loads((control.cache_path / "manifest.json").read_text())
    assert manifest["key_parts"]["label_options"]["shuffle_labels_seed"] == 11
    assert "label_options" not in json.loads((full.cache_path / "manifest.json").read_text())["key_parts"]


def test_prepared_include_labels_uses_the_full_tokenizer(tmp_dir, full):
    math = prepare_data(small_cfg(tmp_dir, include_labels=("math",)), show_progress=False)
    assert math.domain_names == ("math",)
    assert math.tokenizer_path.read_bytes() == full.tokenizer_path.read_bytes()
    for split in SPLITS:
        assert math.stats.documents[split] == {"math": full.stats.documents[split]["math"]}
        assert math.stats.tokens[split] == {"math": full.stats.tokens[split]["math"]}
        assert set(np.unique(math.splits[split].domains_NS1).tolist()) <= {-1, 0}


def test_include_labels_of_another_column(tmp_dir):
    data = prepare_data(small_cfg(tmp_dir, domain_column="subdomain", include_labels=("rust", "go")),
                        show_progress=False)
    assert data.domain_names == ("go", "rust")  # the scheme's (sorted) order


def test_unknown_included_label_names_the_classes(tmp_dir):
    with pytest.raises(DataError, match=r"include_labels names \['maths'\].*classes: \['code', 'math', 'prose'\]"):
        prepare_data(small_cfg(tmp_dir, include_labels=("maths",)), show_progress=False)


def test_options_load_from_the_experiment_config():
    cfg = load_experiment(None, ['data.include_labels=["math"]', "data.shuffle_labels_seed=3"])
    assert cfg.data.include_labels == ("math",) and cfg.data.shuffle_labels_seed == 3
    with pytest.raises(ValueError, match="include_labels.*distinct"):
        DataConfig(include_labels=("math", "math"))


def test_mixed_packing_control_has_identical_token_streams(tmp_path):
    """With `mixed` packing the document order ignores labels, so the shuffled-label control trains and is
    evaluated on exactly the baseline's sequences (only domain ids differ); `by_domain` packing regroups
    documents by the shuffled labels, so its sequences differ (why the control sweep uses `mixed`)."""
    cfg = DataConfig(corpus="fixture", seq_len=64, packing="mixed", cache_dir=str(tmp_path))
    base = prepare_data(cfg, show_progress=False)
    ctrl = prepare_data(replace(cfg, shuffle_labels_seed=0), show_progress=False)
    for split in ("train", "test"):
        np.testing.assert_array_equal(np.asarray(base.splits[split].tokens_NS1),
                                      np.asarray(ctrl.splits[split].tokens_NS1))
        assert (np.asarray(base.splits[split].domains_NS1) != np.asarray(ctrl.splits[split].domains_NS1)).any()
    by_domain = replace(cfg, packing="by_domain")
    a = prepare_data(by_domain, show_progress=False).splits["test"].tokens_NS1
    b = prepare_data(replace(by_domain, shuffle_labels_seed=0), show_progress=False).splits["test"].tokens_NS1
    assert a.shape != b.shape or not np.array_equal(np.asarray(a), np.asarray(b))
