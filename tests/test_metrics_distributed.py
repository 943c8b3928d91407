"""RoutingAccumulator.reduce on 2 real gloo ranks == one process fed both ranks' micro-batches.

    .venv/bin/python -m pytest tests/test_metrics_distributed.py -q

Rank 0 and rank 1 see different numbers and shapes of micro-batches with uneven domain counts, and
rank 1 never sees domain 2 ("math"). After the reduce every rank must hold exactly the counters (and
hence the scalars) of a single accumulator fed the concatenation of both windows, with ONE all-reduce.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_on_ranks
from tests.test_metrics_accumulator import DOMAINS, accumulate, random_window

pytestmark = pytest.mark.slow  # spawns 2 processes (one spawn for the whole module, ~5 s)

WINDOWS = {  # rank: (seed, micro-batch shapes, domains present)
    0: (10, [(3, 7), (2, 9)], (0, 1, 2, 3)),
    1: (11, [(4, 5), (1, 12), (2, 3)], (0, 1, 3)),
}
COUNTERS = ("select_LDE", "kept_LDE", "prob_sum_LDE", "unit_entropy_sum_LD", "tokens_D")


def _rank_window(rank: int):
    seed, shapes, domains = WINDOWS[rank]
    return random_window(seed, shapes, domains)


def _reduce_on_rank(rank: int, world_size: int) -> dict:
    acc = accumulate(_rank_window(rank))
    local = acc.local_stats()
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda tensor, *a, **kw: calls.append(tensor.numel()) or original(tensor, *a, **kw)
    try:
        world = acc.reduce(dist.group.WORLD)
        default = acc.reduce()
    finally:
        dist.all_reduce = original
    return {"calls": calls, "world": world, "default": default, "local": local,
            "local_after": acc.local_stats(), "scalars": world.scalars(DOMAINS)}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_on_ranks(_reduce_on_rank, world_size=2, timeout=120)


def _assert_same_counters(got, expected) -> None:
    for name in COUNTERS:
        assert torch.allclose(getattr(got, name), getattr(expected, name), rtol=1e-12, atol=1e-12), name
    assert got.padding_tokens == expected.padding_tokens
    assert got.micro_batches == expected.micro_batches
    assert got.layer_ids == expected.layer_ids


def test_reduced_counters_equal_single_process_on_concatenated_windows(results):
    expected = accumulate(_rank_window(0) + _rank_window(1)).local_stats()
    assert float(_rank_window(1)[0][1].eq(2).sum()) == 0  # rank 1 really lacks domain 2
    for res in results:
        _assert_same_counters(res["world"], expected)
        _assert_same_counters(res["default"], expected)  # group=None = the world group


def test_reduced_scalars_equal_single_process_scalars(results):
    expected = accumulate(_rank_window(0) + _rank_window(1)).local_stats().scalars(DOMAINS)
    for res in results:
        assert res["scalars"].keys() == expected.keys()
        for tag, value in expected.items():
            assert res["scalars"][tag] == pytest.approx(value, rel=1e-9, abs=1e-12), tag
    assert "routing/entropy/math/layer_1" in expected  # present globally though rank 1 never saw it


def test_one_all_reduce_per_reduce_and_local_counters_untouched(results):
    for rank, res in enumerate(results):
        assert len(res["calls"]) == 2  # two reduce() calls, one all-reduce each
        assert res["calls"][0] == res["calls"][1]
        _assert_same_counters(res["local_after"], res["local"])
        _assert_same_counters(res["local"], accumulate(_rank_window(rank)).local_stats())
