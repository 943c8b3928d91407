"""Expert ablation and keep-k through the gate's routing override, on a tiny random model (one process)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ds_moe_div.config import ModelConfig, MoEConfig
from ds_moe_div.evaluation.ablation import (
    default_top_m,
    expert_ablation,
    keep_k,
    keep_k_evaluation,
    masked_experts,
    top_experts,
)
from ds_moe_div.evaluation.heldout import nll_sums, summarize
from ds_moe_div.model import MoELanguageModel

V, S = 64, 12


def tiny(k=2, num_experts=4, drop_tokens=True):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64,
                      moe=MoEConfig(num_experts=num_experts, k=k, drop_tokens=drop_tokens))
    return MoELanguageModel(cfg, vocab_size=V, seq_len=S, seed=5).eval()


def forward(model, ids):
    labels = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        return model(ids, labels_BS=labels)


def test_masking_experts_that_are_never_selected_changes_nothing():
    model = tiny()
    ids = torch.full((2, S), 7)  # one token repeated: every position routes alike, 2 of 4 experts idle
    base = forward(model, ids)
    unused = []
    for record in base.routing:
        chosen = set(record.indices_TK.flatten().tolist())
        assert len(chosen) == 2
        unused.append(sorted(set(range(4)) - chosen))
    layers = model.moe_layers()
    with masked_experts(layers, unused):
        masked = forward(model, ids)
    torch.testing.assert_close(masked.token_nll_BS, base.token_nll_BS, rtol=1e-6, atol=1e-6)
    for before, after in zip(base.routing, masked.routing):
        assert torch.equal(before.indices_TK, after.indices_TK)
        assert (after.probs_TE[:, sorted(set(range(4)) - set(before.indices_TK.flatten().tolist()))] == 0).all()
    assert all(layer.gate.routing_override is None for layer in layers)  # restored


def test_masking_all_but_k_experts_routes_every_token_to_those_with_renormalised_weights():
    model = tiny()
    ids = torch.randint(2, V, (3, S), generator=torch.Generator().manual_seed(0))
    base = forward(model, ids)
    keep = [1, 3]
    with masked_experts(model.moe_layers(), [[0, 2], [0, 2]]):
        masked = forward(model, ids)
    for record in masked.routing:
        assert set(record.indices_TK.flatten().tolist()) <= set(keep)
        assert (record.indices_TK.sort(-1).values == torch.tensor(keep)).all()  # both, for every token
    # Layer 0 sees the same input either way: its weights are the router softmax over the kept experts.
    logits = base.routing[0].logits_TE[:, keep]
    want_TK = torch.softmax(logits, -1).gather(1, (masked.routing[0].indices_TK == keep[1]).long())
    assert masked.routing[0].kept_TK.all()
    torch.testing.assert_close(masked.routing[0].weights_TK, want_TK)
    assert not torch.allclose(masked.token_nll_BS, base.token_nll_BS)


def test_keep_k_with_the_models_k_equals_the_model_and_keep_1_uses_the_top_expert():
    model = tiny(k=2)
    ids = torch.randint(2, V, (3, S), generator=torch.Generator().manual_seed(1))
    base = forward(model, ids)
    layers = model.moe_layers()
    with keep_k(layers, 2):
        same = forward(model, ids)
    assert torch.equal(same.token_nll_BS, base.token_nll_BS)
    with keep_k(layers, 1):
        one = forward(model, ids)
    record = one.routing[0]
    assert record.indices_TK.shape[1] == 1
    assert torch.equal(record.indices_TK[:, 0], base.routing[0].probs_TE.argmax(-1))
    assert torch.equal(record.weights_TK[record.kept_TK], torch.ones(int(record.kept_TK.sum())))
    assert not torch.equal(one.token_nll_BS, base.token_nll_BS)
    with pytest.raises(ValueError, match="keep-k"):
        keep_k(layers, 3)
    with pytest.raises(ValueError, match="fewer than k"):
        masked_experts(layers, [[0, 1, 2], []])
    with pytest.raises(RuntimeError), keep_k(layers, 1):
        raise RuntimeError("a failing pass")
    assert all(layer.gate.routing_override is None for layer in layers)


def test_top_experts_and_default_m():
    assert top_experts(torch.tensor([0.1, 0.4, 0.4, 0.1]), 2) == [1, 2]
    assert top_experts(torch.tensor([0.3, 0.2, 0.3, 0.2]), 1) == [0]  # tie: lower id
    assert top_experts(torch.tensor([float("nan")] * 4), 2) == []
    assert default_top_m(4, 2) == 2 and default_top_m(8, 2) == 2 and default_top_m(3, 2) == 1 and default_top_m(2, 2) == 0


def _summary(nll_by_domain):
    """A LossSummary with 1 target per domain of the given nll (PPL = exp(nll))."""
    flat = [sum(nll_by_domain), float(len(nll_by_domain))]
    for v in nll_by_domain:
        flat += [v, 1.0]
    return summarize(torch.tensor(flat, dtype=torch.float64), ("a", "b", "c"))


def test_expert_ablation_reports_own_others_and_specificity():
    layers = [SimpleNamespace(gate=SimpleNamespace(routing_override=None, k=1, wg=torch.nn.Linear(3, 3)))]
    freq = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [float("nan")] * 3])  # domain c: no token
    base = _summary([0.0, 0.0, 0.0])

    def run_pass():
        masked = layers[0].gate.routing_override.masked
        return _summary([0.5 if 0 in masked else 0.1, 0.2 if 1 in masked else 0.0, 0.0])

    result = expert_ablation(run_pass, layers, [4], [freq], base, top_m=1)
    assert set(result["masked"]) == {"a", "b"}  # c has no frequency row to mask by
    a = result["masked"]["a"]
    assert a["experts"] == {"layer_4": [0]}
    assert a["own"] == pytest.approx(torch.e ** 0.5 - 1) and a["others"] == pytest.approx(0.0)
    b = result["masked"]["b"]
    assert b["own"] == pytest.approx(torch.e ** 0.2 - 1) and b["others"] == pytest.approx((torch.e ** 0.1 - 1) / 2)
    assert result["specificity_mean"] == pytest.approx((a["specificity"] + b["specificity"]) / 2)
    assert layers[0].gate.routing_override is None


def test_keep_k_evaluation_on_a_model():
    model = tiny(k=2, drop_tokens=False)
    ids = torch.randint(2, V, (2, S), generator=torch.Generator().manual_seed(2))
    domains = torch.zeros_like(ids)

    def run_pass():
        out = forward(model, ids)
        labels = torch.roll(ids, -1, dims=1)
        return summarize(nll_sums(out.token_nll_BS, labels, domains, 1), ("x",))

    base = run_pass()
    result = keep_k_evaluation(run_pass, model.moe_layers(), base)
    assert list(result) == ["k=1"]
    assert result["k=1"]["ppl"] != base.ppl and result["k=1"]["rel"] == pytest.approx(result["k=1"]["ppl"] / base.ppl - 1)


def test_masking_and_keep_k_apply_to_loss_free_selection():
    """With Loss-Free Balancing the bias picks the experts: a masked expert must still never be chosen,
    and keep-k must still route to the top-k' of p + b (selection_bias.biased_gating takes both)."""
    import ds_moe_div

    # (an editable install elsewhere can resolve the module from another tree: look in this one)
    if not (Path(ds_moe_div.__file__).parent / "selection_bias.py").is_file():
        pytest.skip("no Loss-Free Balancing (ds_moe_div/selection_bias.py) in this tree")
    from ds_moe_div import selection_bias

    model = tiny()
    gates = [layer.gate for layer in model.moe_layers()]
    for bias in selection_bias.enable_selection_bias(gates):
        bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # expert 0 always wins the selection
    ids = torch.randint(2, V, (2, S), generator=torch.Generator().manual_seed(3))
    assert all((r.indices_TK == 0).any(-1).all() for r in forward(model, ids).routing)
    with masked_experts(model.moe_layers(), [[0], [0]]):
        masked = forward(model, ids)
    assert all(not (r.indices_TK == 0).any() for r in masked.routing)
    with keep_k(model.moe_layers(), 1):
        one = forward(model, ids)
    for record in one.routing:
        assert (record.indices_TK == 0).all() and torch.equal(record.weights_TK, record.kept_TK.float())
