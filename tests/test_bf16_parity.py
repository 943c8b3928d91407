"""bf16 ZeRO-2 gradients equal fp32 ones on 2 CPU ranks, with modules used twice per step (ds_moe_div/bf16_parity.py).

DeepSpeed issue #8224: ZeRO-2 + bf16 on several ranks gave wrong gradients when a submodule was used
twice in one step. Two gloo ranks run one ZeRO-2 step each in fp32 and in bf16 (the engine casts the
model to bf16); the full gradients are compared with the fp32 gradient of the concatenated batch.
Measured here (seed 3, DeepSpeed 0.19.8, torch 2.13 CPU): fp32 max relative error 2.7e-7, bf16 max
1.6e-2 (norm.bias; the twice-used embed/shared weights 4.6e-3 - 4.8e-3). A lost use of `shared`
would give 0.21 - 1.0. Tolerances: fp32 1e-5, bf16 5e-2 (3x the measured bf16 error, 4x below the
smallest lost-use error). The same check runs on GPU in scripts/gpu_check.py.
"""

from __future__ import annotations

import pytest

from ds_moe_div import bf16_parity
from tests.dist_utils import run_on_ranks

SEED = 3
TOLERANCE = {"fp32": 1e-5, "bf16": 5e-2}


def zero2_on_rank(rank: int, world_size: int) -> dict:
    from ds_moe_div.distributed import unlink_shm_buffer

    grads = {precision: bf16_parity.zero2_grads(rank, world_size, seed=SEED, bf16=precision == "bf16")
             for precision in ("fp32", "bf16")}
    unlink_shm_buffer(rank)  # DeepSpeed's CPU comm op leaks its /dev/shm buffer otherwise
    return grads


@pytest.mark.slow
def test_zero2_bf16_and_fp32_gradients_match_the_fp32_reference_on_two_ranks():
    ref = bf16_parity.reference_grads(SEED, 2)
    per_rank = run_on_ranks(zero2_on_rank, world_size=2, timeout=600)
    worst = {}
    for precision, tolerance in TOLERANCE.items():
        errors = [bf16_parity.relative_errors(grads[precision], ref) for grads in per_rank]
        assert errors[0] == errors[1], "ranks disagree on the full gradient"
        assert max(errors[0].values()) < tolerance, (precision, errors[0])
        worst[precision] = max(errors[0].values())
    assert worst["bf16"] > 100 * worst["fp32"]  # the bf16 engine really computed in bf16


def test_a_lost_use_is_far_outside_the_bf16_tolerance():
    lost = bf16_parity.dropped_use_error(SEED, 2)
    assert set(lost) == {"embed.weight", "shared.weight", "shared.bias", "norm.weight", "norm.bias"}
    assert min(lost.values()) > 4 * TOLERANCE["bf16"]
