"""BatchLoader: tensors and masks, rank sharding, exact resume, balanced sampling, evaluation passes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from ds_moe_div.data import (
    IGNORE_INDEX,
    BatchLoader,
    DataError,
    PackedSplit,
    prepare_data,
)
from tests.test_data_common import small_cfg

SEQ = 8


def make_split(domains_N: list[int], num_domains: int = 3, pad_last: int = 3) -> PackedSplit:
    """Row i holds tokens 1000*i + position; its last `pad_last` positions are padding in the final row."""
    n = len(domains_N)
    tokens = (1000 * np.arange(n)[:, None] + np.arange(SEQ + 1)[None, :]).astype(np.int32)
    domains = np.repeat(np.asarray(domains_N, np.int16)[:, None], SEQ + 1, axis=1)
    domains[-1, SEQ + 1 - pad_last:] = -1
    tokens[-1, SEQ + 1 - pad_last:] = 0
    return PackedSplit("train", tokens, domains, np.asarray(domains_N, np.int16), pad_id=0, num_domains=num_domains)


def row_ids(batch) -> list[int]:
    return (batch["input_ids"][:, 0] // 1000).tolist()


def test_batch_shapes_and_label_mask():
    split = make_split([0, 1, 2, 0])
    batch = next(iter(BatchLoader(split, micro_batch_size=4, shuffle=False)))
    assert all(v.dtype == torch.int64 and v.shape == (4, SEQ) for v in batch.values())
    tokens = torch.from_numpy(split.tokens_NS1.astype(np.int64))
    assert (batch["input_ids"] == tokens[:, :-1]).all()
    assert (batch["labels"][:3] == tokens[:3, 1:]).all()
    assert batch["labels"][3].tolist() == tokens[3, 1:6].tolist() + [IGNORE_INDEX] * 3  # targets that are padding
    assert batch["domain_ids"][3].tolist() == [0] * 6 + [-1] * 2
    assert (batch["domain_ids"][1] == 1).all()


def test_ranks_read_disjoint_shards_whose_union_is_the_single_rank_batch():
    split = make_split([i % 3 for i in range(37)])
    single = BatchLoader(split, micro_batch_size=4, seed=5)
    ranks = [BatchLoader(split, micro_batch_size=2, rank=r, world_size=2, seed=5) for r in range(2)]
    seen = []
    for _ in range(3 * len(single)):  # three epochs
        parts = [row_ids(next(loader)) for loader in ranks]
        assert not set(parts[0]) & set(parts[1])
        assert parts[0] + parts[1] == row_ids(next(single))
        seen += parts[0] + parts[1]
    epoch = seen[: len(single) * 4]
    assert len(set(epoch)) == len(epoch) == 36  # each sequence at most once per epoch; 37 % 4 dropped


def test_epochs_are_reshuffled_and_seeded():
    split = make_split([0] * 40)
    a, b = BatchLoader(split, micro_batch_size=40, seed=1), BatchLoader(split, micro_batch_size=40, seed=1)
    first, second = row_ids(next(a)), row_ids(next(a))
    assert sorted(first) == sorted(second) == list(range(40)) and first != second
    assert row_ids(next(b)) == first
    assert row_ids(next(BatchLoader(split, micro_batch_size=40, seed=2))) != first


@pytest.mark.parametrize("sampling", ["natural", "balanced"])
def test_exact_resume(sampling):
    split = make_split([0] * 20 + [1] * 7 + [2] * 3)
    loader = BatchLoader(split, micro_batch_size=3, rank=1, world_size=2, seed=3, sampling=sampling)
    for _ in range(7):
        next(loader)
    state = loader.state_dict()
    expected = [row_ids(next(loader)) for _ in range(9)]  # crosses an epoch boundary (5 steps per epoch)
    resumed = BatchLoader(split, micro_batch_size=3, rank=1, world_size=2, seed=3, sampling=sampling)
    resumed.load_state_dict(state)
    assert [row_ids(next(resumed)) for _ in range(9)] == expected
    # same global batch on another world size: the union continues exactly
    wide = BatchLoader(split, micro_batch_size=6, seed=3, sampling=sampling)
    wide.load_state_dict(state)
    left = BatchLoader(split, micro_batch_size=3, rank=0, world_size=2, seed=3, sampling=sampling)
    left.load_state_dict(state)
    assert row_ids(next(wide)) == row_ids(next(left)) + expected[0]


def test_resume_refuses_a_different_global_batch():
    split = make_split([0] * 20)
    state = BatchLoader(split, micro_batch_size=4).state_dict()
    with pytest.raises(ValueError, match="global_batch_size"):
        BatchLoader(split, micro_batch_size=2).load_state_dict(state)


def test_balanced_sampling_draws_domains_equally():
    domains = [0] * 70 + [1] * 20 + [2] * 10
    split = make_split(domains)
    loader = BatchLoader(split, micro_batch_size=10, seed=0, sampling="balanced")
    assert len(loader) == 12  # 40 draws per domain: >= 100 / 3, and 3 * 40 a multiple of the batch
    counts = Counter()
    for _ in range(3 * len(loader)):
        batch = Counter(domains[i] for i in row_ids(next(loader)))
        assert max(batch.values()) - min(batch[d] for d in range(3)) <= 2  # each batch near balanced
        counts.update(batch)
    assert counts == Counter({0: 120, 1: 120, 2: 120})
    natural = Counter()
    loader = BatchLoader(split, micro_batch_size=10, seed=0)
    for _ in range(len(loader)):
        natural.update(domains[i] for i in row_ids(next(loader)))
    assert natural == Counter({0: 70, 1: 20, 2: 10})


def test_balanced_sampling_needs_shuffle():
    with pytest.raises(ValueError, match="shuffle=True"):
        BatchLoader(make_split([0, 1]), micro_batch_size=1, sampling="balanced", shuffle=False)


def test_eval_pass_covers_every_row_once_with_padded_last_batch():
    split = make_split([i % 3 for i in range(11)])
    loaders = [BatchLoader(split, micro_batch_size=2, rank=r, world_size=2, shuffle=False, loop=False)
               for r in range(2)]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == len(loaders[0]) == 3  # same step count on every rank
    rows = [row for step in zip(*batches, strict=True) for b in step for row in b["input_ids"].tolist()]
    labels = torch.cat([b["labels"] for step in zip(*batches, strict=True) for b in step])
    real = [r[0] // 1000 for r, lab in zip(rows, labels.tolist(), strict=True) if lab[0] != IGNORE_INDEX]
    assert real == list(range(11))  # file order, each row once
    assert (labels[11:] == IGNORE_INDEX).all()  # one padding row, ignored by the loss
    assert (batches[1][-1]["domain_ids"][1] == -1).all()
    assert [row_ids(b) for b in loaders[0]] == [row_ids(b) for b in batches[0]]  # a new pass each iteration


def test_too_small_split_is_refused():
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchLoader(make_split([0, 1, 2]), micro_batch_size=2, world_size=2)


def test_loader_on_prepared_fixture(tmp_path):
    data = prepare_data(small_cfg(tmp_path), show_progress=False)
    loader = BatchLoader(data.splits["train"], micro_batch_size=8, sampling="balanced")
    batch = next(loader)
    assert batch["input_ids"].shape == (8, 64)
    assert batch["input_ids"].max() < data.vocab_size
    present = set(batch["domain_ids"].unique().tolist()) - {-1}
    assert present <= set(range(len(data.domain_names)))
