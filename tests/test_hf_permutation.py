"""Router permutation on an AutoEP layer with selection biases (DeepSeek-V3's random `e_score_correction_bias`
and a random Loss-Free `expert_bias`): the biases move with the router rows (evaluation/permutation.py).

If a bias stayed in place, the permuted router would select with another expert's bias: the permuted
selection would not be the relabelled original one, and permuting router, biases and experts together
would not leave the model's function unchanged."""
from __future__ import annotations

import pytest
import torch

from ds_moe_div.evaluation.permutation import derangement, permuted_routers
from ds_moe_div.hf import autoep
from tests import hf_fixtures
from tests.hf_fixtures import batch, reference_and_ours

tiny_dirs = hf_fixtures.tiny_dirs  # session fixture

pytestmark = pytest.mark.filterwarnings("ignore")
# The tiny DeepSeek-V3 routes group-limited (8 experts in 4 groups of consecutive indices, top-2 groups):
# a relabelling that keeps the model's function must map groups onto groups, as this derangement does
# (groups 0 <-> 1 and 2 <-> 3, each pair reversed). The delta-PPL derangements need not: regrouping is part
# of what they measure.
GROUPWISE = torch.tensor([3, 2, 0, 1, 7, 6, 5, 4])


@pytest.fixture
def model_and_batch(tiny_dirs):
    _, ours = reference_and_ours(tiny_dirs["deepseek_v3"])
    ours.eval()
    generator = torch.Generator().manual_seed(11)
    for bias in autoep.enable_expert_bias(ours):
        bias.copy_(torch.randn(bias.shape, generator=generator))  # selection changes with it
    layers = ours.moe_layers()
    assert all(len(layer.router_tensors()) == 3 for layer in layers)  # weight, correction bias, expert_bias
    return ours, layers, batch(ours.config.vocab_size, seed=4)


def test_identity_changes_nothing_and_everything_is_restored(model_and_batch):
    model, layers, (ids, labels) = model_and_batch
    before = [[t.clone() for t in layer.router_tensors()] for layer in layers]
    with torch.no_grad():
        base = model(ids, labels_BS=labels)
        with permuted_routers(layers, [torch.arange(model.num_experts)] * len(layers)):
            same = model(ids, labels_BS=labels)
        with permuted_routers(layers, [derangement(model.num_experts, torch.Generator().manual_seed(0))] * len(layers)):
            moved = model(ids, labels_BS=labels)
    assert torch.equal(same.token_nll_BS, base.token_nll_BS)
    assert not torch.equal(moved.token_nll_BS, base.token_nll_BS)
    for layer, saved in zip(layers, before):
        assert all(torch.equal(t, s) for t, s in zip(layer.router_tensors(), saved))


def test_permuted_router_selects_the_relabelled_experts(model_and_batch):
    """Row j (and bias j) now hold what perm[j] held: a token that chose expert e chooses inv[e]."""
    model, layers, (ids, labels) = model_and_batch
    perm = GROUPWISE
    inverse = torch.argsort(perm)
    with torch.no_grad():
        base = model(ids, labels_BS=labels)
        first = [perm] + [None] * (len(layers) - 1)
        with permuted_routers(layers, first):
            permuted = model(ids, labels_BS=labels)
    # Layer 0 sees the same input: its selections are the relabelled ones, with the same weights.
    want, got = base.routing[0], permuted.routing[0]
    assert torch.equal(got.indices_TK, inverse[want.indices_TK])
    torch.testing.assert_close(got.weights_TK, want.weights_TK, rtol=0, atol=0)


def test_permuting_router_biases_and_experts_together_is_the_same_model(model_and_batch):
    model, layers, (ids, labels) = model_and_batch
    perms = [GROUPWISE, GROUPWISE.roll(2)] * len(layers)
    perms = perms[:len(layers)]
    with torch.no_grad():
        base = model(ids, labels_BS=labels)
        with permuted_routers(layers, perms):
            for layer, perm in zip(layers, perms):
                for weight in (layer.experts.w1, layer.experts.w2, layer.experts.w3):
                    weight.copy_(weight[perm])
            same = model(ids, labels_BS=labels)
    torch.testing.assert_close(same.token_nll_BS, base.token_nll_BS, rtol=1e-5, atol=1e-6)
