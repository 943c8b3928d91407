"""Evaluation with a batch budget covers every class first (stratified rows), and warns with the fix when a
class still has no held-out token."""
from __future__ import annotations

import numpy as np

from ds_moe_div.data.prepared import PackedSplit
from ds_moe_div.evaluation.heldout import nll_sums
from ds_moe_div.evaluation.stratify import missing_classes_warning, rows_holding, select, stratified_rows


def _split(row_classes, seq_len: int = 4, num_domains: int = 5) -> PackedSplit:
    """One row per entry: its input positions carry that class (-1: padding only); the last column (a
    target only) carries class 4, which no input position has."""
    dom = np.array([[c] * seq_len + [4] for c in row_classes], dtype=np.int16)
    tok = np.arange(dom.size, dtype=np.int32).reshape(dom.shape)
    return PackedSplit("test", tok, dom, np.array(row_classes, dtype=np.int16), 0, num_domains)


def test_rows_holding_looks_at_input_positions_only():
    holds = rows_holding(_split([0, 1, -1]).domains_NS1, 5)
    assert holds.tolist() == [[True, False, False, False, False], [False, True, False, False, False], [False] * 5]


def test_every_class_first_rarest_first_then_split_order():
    classes = [0] * 10 + [1] * 5 + [2] + [0] * 3 + [3]
    split = _split(classes)
    rows = stratified_rows(split.domains_NS1, budget=6, num_domains=5)
    assert sorted({classes[r] for r in rows}) == [0, 1, 2, 3]
    assert rows.tolist() == [0, 1, 2, 10, 15, 19]  # rows 15 (class 2) and 19 (class 3) first, then 10 (1), fill
    assert stratified_rows(split.domains_NS1, budget=2, num_domains=5).tolist() == [15, 19]  # the rarest two
    assert stratified_rows(split.domains_NS1, budget=100, num_domains=5).tolist() == list(range(len(classes)))


def test_the_first_rows_alone_would_miss_classes_and_the_stratified_pass_scores_every_one():
    """The bug: the first budget rows hold classes 0 and 1 only; the selected rows give each class targets."""
    classes = [0, 1] * 8 + [2, 3]
    split = _split(classes)
    chosen, counts = select(split, max_batches=2, global_batch=3)
    assert len(chosen) == 6 and counts.tolist() == [8, 8, 1, 1, 0]

    def targets(s: PackedSplit) -> list[int]:
        import torch
        ids = torch.as_tensor(np.asarray(s.domains_NS1[:, :-1], dtype=np.int64))
        labels = torch.as_tensor(np.asarray(s.tokens_NS1[:, 1:], dtype=np.int64))
        sums = nll_sums(torch.ones_like(labels, dtype=torch.float32), labels, ids, 5).view(-1, 2)
        return [int(c) for c in sums[1:, 1]]

    first = PackedSplit("test", split.tokens_NS1[:6], split.domains_NS1[:6], split.domain_of_sequence_N[:6], 0, 5)
    assert targets(first)[:4] == [12, 12, 0, 0]
    assert all(t > 0 for t in targets(chosen)[:4])
    whole, _ = select(split, max_batches=None, global_batch=3)
    assert whole is split


def test_warning_names_the_classes_and_the_fix():
    tokens = {"code": 10, "math": 0, "prose": 0}
    text = missing_classes_warning(tokens, split_counts=[5, 3, 0], max_batches=2, split="test")
    assert "(math): raise --max-batches, or use --max-batches all" in text
    assert "no token in the whole test split (prose)" in text and "test_fraction" in text
    assert missing_classes_warning({"code": 1}, split_counts=[1], max_batches=2, split="test") is None
