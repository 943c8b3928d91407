"""The composer adds exactly `lm + sum(coef * term)`, skips zero-coefficient terms, and fails loudly."""
import math
from unittest import mock

import pytest
import torch

from ds_moe_div import objectives
from ds_moe_div.composer import ObjectiveComposer
from ds_moe_div.config import ObjectivesConfig, load_experiment
from ds_moe_div.model import ModelOutput
from ds_moe_div.routing import RoutingRecord

T, E, K, M = 12, 4, 2, 8


def record(layer_id, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    probs = logits.softmax(-1)
    weights, idx = probs.topk(K, -1)
    return RoutingRecord(layer_id=layer_id, logits_TE=logits, probs_TE=probs, indices_TK=idx,
                         weights_TK=weights / weights.sum(-1, keepdim=True), kept_TK=torch.ones(T, K, dtype=torch.bool),
                         l_aux=probs.mean() * E, capacity=T, expert_outputs_TKM=torch.randn(T, K, M, generator=g))


def output():
    return ModelOutput(lm_loss=torch.tensor(2.0), token_nll_BS=torch.zeros(2, 6), routing=(record(0, 1), record(2, 2)))


def objectives_cfg(**overrides):
    return load_experiment(None, [f"objectives.{k}={v}" for k, v in overrides.items()]).objectives


DOMAINS = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, 1, 1]])


def test_total_is_lm_plus_sum_of_scaled_terms_averaged_over_layers():
    cfg = objectives_cfg(**{"balance.coef": 0.01, "z_loss.coef": 0.001, "divergence.coef": 0.1,
                            "orthogonality.coef": 0.5, "variance.coef": 0.2})
    out = output()
    res = ObjectiveComposer(cfg, num_domains=3)(out, domain_ids_BS=DOMAINS, step=0)
    expected = out.lm_loss + sum(res.coefs[n] * res.per_layer[n].mean() for n in res.per_layer)
    torch.testing.assert_close(res.total, expected)
    assert set(res.unscaled) == {"balance", "z_loss", "divergence", "orthogonality", "variance"}
    torch.testing.assert_close(res.per_layer["balance"], torch.stack([r.l_aux for r in out.routing]))
    assert res.extras == {"divergence": {"domains_present": 3}}


def test_global_batch_balance_counts_valid_tokens_of_all_slots():
    cfg = objectives_cfg(**{"balance.coef": 0.01, "balance.scope": '"global_batch"'})
    out = output()
    res = ObjectiveComposer(cfg, num_domains=3)(out, domain_ids_BS=DOMAINS, step=0)
    expected = objectives.global_load_balance_loss(probs_LTE=torch.stack([r.probs_TE for r in out.routing]),
                                                   indices_LTK=torch.stack([r.indices_TK for r in out.routing]),
                                                   mask_T=DOMAINS.flatten() >= 0)
    torch.testing.assert_close(res.per_layer["balance"], expected)
    assert not torch.allclose(res.per_layer["balance"], torch.stack([r.l_aux for r in out.routing]))


def test_layer_reduction_sum():
    cfg = objectives_cfg(layer_reduction="sum")
    res = ObjectiveComposer(cfg, num_domains=3)(output(), domain_ids_BS=DOMAINS, step=0)
    torch.testing.assert_close(res.unscaled["balance"], res.per_layer["balance"].sum())


def test_zero_coefficient_skips_the_computation():
    cfg = objectives_cfg(**{"balance.coef": 0.0})
    with mock.patch.object(objectives, "expert_divergence_loss") as ed, \
            mock.patch.object(objectives, "orthogonality_loss") as orth:
        res = ObjectiveComposer(cfg, num_domains=3)(output(), domain_ids_BS=DOMAINS, step=0)
    ed.assert_not_called()
    orth.assert_not_called()
    assert res.unscaled == {} and res.total.item() == 2.0
    assert not ObjectiveComposer(cfg, num_domains=3).needs_expert_outputs


def test_divergence_without_domain_ids_is_an_error():
    cfg = objectives_cfg(**{"divergence.coef": 0.01})
    with pytest.raises(ValueError, match="no domain_ids"):
        ObjectiveComposer(cfg, num_domains=3)(output(), domain_ids_BS=None, step=0)


def test_warmup_ramps_linearly():
    cfg = objectives_cfg(**{"divergence.coef": 0.1, "divergence.warmup_steps": 10})
    composer = ObjectiveComposer(cfg, num_domains=3)
    assert composer.coefficient("divergence", 0) == pytest.approx(0.01)
    assert composer.coefficient("divergence", 4) == pytest.approx(0.05)
    assert composer.coefficient("divergence", 50) == pytest.approx(0.1)


def test_auto_coefficient_calibrates_once_to_a_power_of_ten():
    cfg = objectives_cfg(**{"orthogonality.coef": '"auto"', "variance.coef": '"auto"'})
    composer = ObjectiveComposer(cfg, num_domains=3)
    assert composer.needs_expert_outputs
    res = composer(output(), domain_ids_BS=DOMAINS, step=0)
    for name, target in (("orthogonality", 1e-4), ("variance", 1e-3)):
        coef = composer.calibrated[name]
        assert math.log10(coef) == round(math.log10(coef))
        ratio = abs(coef * res.unscaled[name].item()) / target
        assert 10 ** -0.5 <= ratio <= 10 ** 0.5
    state = composer.state_dict()
    fresh = ObjectiveComposer(cfg, num_domains=3)
    fresh.load_state_dict(state)
    assert fresh.calibrated == composer.calibrated


def test_config_default_is_lm_plus_balance_only():
    cfg = ObjectivesConfig()
    res = ObjectiveComposer(cfg, num_domains=1)(output(), domain_ids_BS=DOMAINS, step=0)
    assert list(res.unscaled) == ["balance"]


def test_every_term_is_a_config_section_and_reads_record_fields():
    import dataclasses

    from ds_moe_div.composer import OBJECTIVES, TERMS

    sections = {f.name for f in dataclasses.fields(ObjectivesConfig)} - {"layer_reduction"}
    assert set(TERMS) == sections and TERMS[0] == "balance"
    record_fields = {f.name for f in dataclasses.fields(RoutingRecord)}
    for name, spec in OBJECTIVES.items():
        assert set(spec.inputs) <= record_fields | {"domain_ids_BS"}, name

