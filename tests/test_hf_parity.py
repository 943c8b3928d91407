"""Imported models through DeepSpeed's AutoEP layer vs plain transformers, per family (fp32, one process).

Logits within 1e-5 with identical top-k; loss and the gradients of all trainable parameters within 1e-5
relative; routing records (unweighted expert outputs vs a per-expert loop, balance losses vs DeepSpeed's
and transformers' own values, the token counter, the selection-only expert bias, activation
checkpointing without double counting) and state-dict names both ways.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from deepspeed.moe import sharded_moe

from ds_moe_div.hf import autoep
from ds_moe_div.hf.balance import deepspeed_l_aux, hf_aux_loss_from_records
from ds_moe_div.hf.families import FAMILIES, SUPPORTED
from tests import hf_fixtures
from tests.hf_fixtures import batch, reference_and_ours

tiny_dirs = hf_fixtures.tiny_dirs  # session fixture

pytestmark = pytest.mark.filterwarnings("ignore")


def _hf_topk(hf, ids) -> list[torch.Tensor]:
    """Indices transformers' routers chose, per MoE layer (a hook on mlp.gate sees (logits, weights, indices))."""
    seen = []
    hooks = [m.mlp.gate.register_forward_hook(lambda mod, a, out: seen.append(out[2]))
             for m in hf.model.layers if hasattr(m.mlp, "experts")]
    with torch.no_grad():
        logits = hf(ids).logits
    for h in hooks:
        h.remove()
    return logits, seen


def _assert_rel(ours: torch.Tensor, ref: torch.Tensor, name: str, tol: float = 1e-5) -> None:
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * max(scale, 1e-6), f"{name}: max error {err:.3g} vs max |ref| {scale:.3g}"


@pytest.mark.parametrize("family", SUPPORTED)
def test_logits_topk_loss_and_grads_equal_transformers(tiny_dirs, family):
    hf, ours = reference_and_ours(tiny_dirs[family])
    ids, labels = batch(hf.config.vocab_size)
    ref_logits, ref_topk = _hf_topk(hf, ids)
    out = ours(ids, labels_BS=labels)
    with torch.no_grad():
        assert (ours.logits(ids) - ref_logits).abs().max().item() <= 1e-5
    assert len(out.routing) == len(ref_topk) >= 2
    for record, ref in zip(out.routing, ref_topk):
        assert torch.equal(record.indices_TK.sort(-1).values, ref.long().sort(-1).values)
    # Non-trivial routing: several experts used, not all tokens on the same pair.
    assert out.routing[0].indices_TK.unique().numel() >= 4

    hf.train(), ours.train()
    ref_loss = F.cross_entropy(hf(ids).logits.float().flatten(0, 1), labels.flatten())
    ref_loss.backward()
    out = ours(ids, labels_BS=labels)
    out.lm_loss.backward()
    _assert_rel(out.lm_loss.detach(), ref_loss.detach(), "loss")
    grads = autoep.to_hf_state_dict({n: p.grad for n, p in ours.named_parameters()}, ours.family)
    ref_grads = {n: p.grad for n, p in hf.named_parameters() if p.requires_grad}
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        _assert_rel(grads[name], ref, name)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_unweighted_expert_outputs_equal_a_per_expert_loop(tiny_dirs, family):
    hf, ours = reference_and_ours(tiny_dirs[family])
    ids, labels = batch(hf.config.vocab_size, seed=1)
    inputs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: inputs.append(a[0])) for layer in ours.moe_layers()]
    out = ours(ids, labels_BS=labels, collect_expert_outputs=True)
    for h in hooks:
        h.remove()
    hf_layers = [m.mlp for m in hf.model.layers if hasattr(m.mlp, "experts")]
    for record, x_BSH, ref_block in zip(out.routing, inputs, hf_layers):
        x_TH = x_BSH.reshape(-1, x_BSH.shape[-1])
        gate_up, down = ref_block.experts.gate_up_proj, ref_block.experts.down_proj
        width = down.shape[-1]
        expected = torch.stack([
            torch.stack([down[e] @ (F.silu(gate_up[e, :width] @ x) * (gate_up[e, width:] @ x))
                         for e in record.indices_TK[t].tolist()])
            for t, x in enumerate(x_TH)])
        assert record.expert_outputs_TKM.shape == expected.shape
        assert (record.expert_outputs_TKM - expected).abs().max().item() < 1e-5
        # and the layer's output is their weighted sum (plus shared experts, checked by the logits test)
        assert record.kept_TK.all() and record.capacity is None


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen3_moe"])
def test_balance_losses_equal_deepspeed_and_transformers(tiny_dirs, family):
    hf, ours = reference_and_ours(tiny_dirs[family])
    ids, labels = batch(hf.config.vocab_size, seed=2)
    out = ours(ids, labels_BS=labels)
    k = FAMILIES[family].top_k(hf.config)
    with torch.no_grad():
        ref = hf(ids, labels=ids, output_router_logits=True)
    ours_hf = hf_aux_loss_from_records(out.routing, top_k=k)
    assert abs(ours_hf.item() - ref.aux_loss.item()) < 1e-5, (ours_hf.item(), ref.aux_loss.item())
    for record in out.routing:
        ds = sharded_moe.topkgating(record.logits_TE.detach(), k, 100.0, 4, drop_tokens=False)[0]
        assert abs(record.l_aux.item() - ds.item()) < 1e-6
        assert abs(deepspeed_l_aux(probs_TE=record.probs_TE, indices_TK=record.indices_TK,
                                   num_experts=record.num_experts).item() - record.l_aux.item()) < 1e-7
    # One layer alone: transformers' aux is k times DeepSpeed's l_aux (why coefficients do not transfer).
    single = hf_aux_loss_from_records(out.routing[:1], top_k=k)
    assert abs(single.item() - k * out.routing[0].l_aux.item()) < 1e-5


def test_token_counts_reset_and_expert_bias_selects_only(tiny_dirs):
    _, ours = reference_and_ours(tiny_dirs["olmoe"])
    ids, labels = batch(ours.config.vocab_size, seed=4)
    T, k = ids.numel(), ours.k
    ours.eval()
    ours(ids, labels_BS=labels)
    assert ours.end_of_step().sum() == 0  # evaluation forwards do not count as load
    ours.train()
    ours(ids, labels_BS=labels)
    ours(ids, labels_BS=labels)
    counts_LE = ours.end_of_step()
    assert counts_LE.shape == (2, ours.num_experts) and torch.all(counts_LE.sum(-1) == 2 * T * k)
    assert ours.end_of_step().sum() == 0
    biases = autoep.enable_expert_bias(ours)
    assert len(biases) == 2 and all(b.shape == (ours.num_experts,) for b in biases)
    assert "model.layers.0.mlp.expert_bias" in ours.state_dict()
    biases[0][3] = 10.0  # every token of layer 0 now selects expert 3 ...
    record = ours(ids, labels_BS=labels).routing[0]
    assert torch.all((record.indices_TK == 3).any(-1))
    # ... while its weight stays the unbiased router probability (olmoe: no renormalisation)
    torch.testing.assert_close(record.weights_TK, record.probs_TE.gather(1, record.indices_TK))


@pytest.mark.parametrize("family", ["deepseek_v3"])
def test_expert_bias_folds_into_correction_bias_on_export(tiny_dirs, family):
    _, ours = reference_and_ours(tiny_dirs[family])
    biases = autoep.enable_expert_bias(ours)
    biases[0].copy_(torch.linspace(-1, 1, biases[0].numel()))
    sd = ours.state_dict()
    hf_sd = autoep.to_hf_state_dict(sd, ours.family)
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    torch.testing.assert_close(hf_sd[key], sd["model.layers.1.mlp.router.e_score_correction_bias"] + biases[0])


def test_nonzero_expert_bias_refused_where_transformers_has_none(tiny_dirs):
    _, ours = reference_and_ours(tiny_dirs["mixtral"])
    autoep.enable_expert_bias(ours)[0][0] = 0.5
    with pytest.raises(ValueError, match="no selection bias"):
        autoep.to_hf_state_dict(ours.state_dict(), ours.family)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_state_dict_names_round_trip(tiny_dirs, family):
    hf, ours = reference_and_ours(tiny_dirs[family])
    sd = ours.state_dict()
    hf_sd = autoep.to_hf_state_dict(sd, ours.family)
    ref = hf.state_dict()
    assert set(hf_sd) == set(ref)
    assert all(torch.equal(hf_sd[k], ref[k]) for k in ref)
    back = autoep.from_hf_state_dict(hf_sd, sd, ours.family)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_activation_checkpointing_counts_each_layer_once(tiny_dirs):
    _, plain = reference_and_ours(tiny_dirs["qwen3_moe"])
    _, ckpt = reference_and_ours(tiny_dirs["qwen3_moe"])
    ckpt.enable_activation_checkpointing()
    ids, labels = batch(plain.config.vocab_size, seed=5)
    results = []
    for model in (plain, ckpt):
        model.train()
        out = model(ids, labels_BS=labels, collect_expert_outputs=True)
        loss = out.lm_loss + 0.1 * torch.stack([r.l_aux for r in out.routing]).mean()
        loss.backward()
        results.append((out, loss, {n: p.grad.clone() for n, p in model.named_parameters()},
                        model.end_of_step()))
    (out_a, loss_a, grads_a, counts_a), (out_b, loss_b, grads_b, counts_b) = results
    assert len(out_a.routing) == len(out_b.routing) == 2
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7)
    # The recomputation in backward neither records nor counts.
    assert torch.equal(counts_b, counts_a) and counts_a.sum() > 0
