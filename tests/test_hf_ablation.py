"""Expert ablation and keep-k on imported models: the AutoEP layer's routing override (one process)."""
from __future__ import annotations

import pytest
import torch

from ds_moe_div.evaluation.ablation import keep_k, masked_experts
from ds_moe_div.hf import autoep
from tests import hf_fixtures
from tests.hf_fixtures import batch, reference_and_ours

tiny_dirs = hf_fixtures.tiny_dirs  # session fixture

pytestmark = pytest.mark.filterwarnings("ignore")


# qwen3_moe: an AutoEP preset that aliases its router as `gate` (no override there).
@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "deepseek_v3"])
def test_masked_experts_are_never_selected_and_the_override_is_undone(tiny_dirs, family):
    _, ours = reference_and_ours(tiny_dirs[family])
    ours.eval()
    ids, labels = batch(ours.config.vocab_size, seed=5)
    with torch.no_grad():
        base = ours(ids, labels_BS=labels)
        layers = ours.moe_layers()
        # The experts layer i selects most: masked, they must vanish even against a large selection bias.
        top = [torch.bincount(r.indices_TK.reshape(-1), minlength=ours.num_experts).topk(2).indices.tolist()
               for r in base.routing]
        if family == "deepseek_v3":
            for bias, experts in zip(autoep.enable_expert_bias(ours), top):
                bias[experts] = 10.0
        with masked_experts(layers, top):
            masked = ours(ids, labels_BS=labels)
        for record, experts in zip(masked.routing, top):
            assert not torch.isin(record.indices_TK, torch.tensor(experts)).any()
            assert torch.all(record.probs_TE[:, experts] == 0)
        assert masked.lm_loss != base.lm_loss
        if family == "deepseek_v3":
            for bias in autoep.enable_expert_bias(ours):
                bias.zero_()
        again = ours(ids, labels_BS=labels)
    assert torch.equal(again.lm_loss, base.lm_loss)  # the override is gone after the block


def test_keep_k_routes_to_the_top_k_prime_and_k_equal_is_the_model(tiny_dirs):
    _, ours = reference_and_ours(tiny_dirs["olmoe"])
    ours.eval()
    ids, labels = batch(ours.config.vocab_size, seed=6)
    layers = ours.moe_layers()
    with torch.no_grad():
        base = ours(ids, labels_BS=labels)
        with keep_k(layers, ours.k):
            same = ours(ids, labels_BS=labels)
        with keep_k(layers, 1):
            one = ours(ids, labels_BS=labels)
    assert torch.equal(same.lm_loss, base.lm_loss)
    for record, full in zip(one.routing, base.routing):
        assert record.indices_TK.shape[1] == 1
        assert torch.equal(record.indices_TK[:, 0], full.probs_TE.argmax(-1))
    assert all(layer.router.top_k == ours.k for layer in layers)
