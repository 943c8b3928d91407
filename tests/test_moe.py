"""The gate/MoE subclasses keep DeepSpeed's math and expose the routing faithfully (1 process, EP=1)."""
import pytest
import torch
from deepspeed.moe.layer import MoE

from ds_moe_div.model import SwiGLU
from ds_moe_div.moe import RoutedMoE, reinit_experts

M, E = 16, 4


def make(k, *, capacity_factor=1.0, drop_tokens=True, layer_id=0, ep_size=1, num_experts=E):
    torch.manual_seed(0)
    return RoutedMoE(M, SwiGLU(M, 32), layer_id=layer_id, num_experts=num_experts, ep_size=ep_size, k=k,
                     capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor, min_capacity=0,
                     use_residual=False, noisy_gate_policy=None, drop_tokens=drop_tokens, use_rts=False,
                     top2_2nd_expert_sampling=False)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("capacity_factor", [0.5, 4.0])
def test_record_matches_direct_computation(k, capacity_factor):
    moe = make(k, capacity_factor=capacity_factor)
    reinit_experts(moe, seed=1, ep_rank=0, std=0.3, out_std=0.3)
    x = torch.randn(3, 10, M)
    out, rec = moe(x, collect_expert_outputs=True)
    T = 30
    logits = x.reshape(T, M) @ moe.gate.wg.weight.t()
    torch.testing.assert_close(rec.logits_TE, logits)
    torch.testing.assert_close(rec.probs_TE, logits.softmax(-1))
    assert rec.indices_TK.shape == (T, k) and rec.kept_TK.shape == (T, k)
    # Chosen experts are the top-k of the router, in DeepSpeed's slot order (dropped slots restored).
    torch.testing.assert_close(rec.indices_TK.sort(-1).values, logits.topk(k, -1).indices.sort(-1).values)
    if capacity_factor < 1:
        assert not rec.kept_TK.all()
    # Token-major outputs: slot j of token t is expert indices[t,j] applied to x_t, unweighted; 0 if dropped.
    experts = moe.local_experts
    xs = x.reshape(T, M)
    for t in range(T):
        for j in range(k):
            want = experts[int(rec.indices_TK[t, j])](xs[t]) if rec.kept_TK[t, j] else torch.zeros(M)
            torch.testing.assert_close(rec.expert_outputs_TKM[t, j], want, atol=1e-5, rtol=1e-5)
    combined = (rec.expert_outputs_TKM * rec.weights_TK.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(out.reshape(T, M), combined, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_same_output_as_stock_deepspeed_moe(k):
    ours = make(k, capacity_factor=1.0)
    torch.manual_seed(0)
    stock = MoE(M, SwiGLU(M, 32), num_experts=E, ep_size=1, k=k, capacity_factor=1.0, eval_capacity_factor=1.0,
                min_capacity=0, drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(2, 12, M)
    out, rec = ours(x)
    want, l_aux, _ = stock(x)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(rec.l_aux, l_aux)
    assert rec.expert_outputs_TKM is None  # not collected unless asked


def test_router_gradient_reaches_gate_through_probs():
    moe = make(2)
    _, rec = moe(torch.randn(2, 8, M))
    rec.probs_TE.var().backward()
    assert moe.gate.wg.weight.grad is not None and moe.gate.wg.weight.grad.abs().sum() > 0


def test_experts_start_distinct_and_independent_of_ep_size():
    full = make(2, num_experts=4, layer_id=3)
    reinit_experts(full, seed=7, ep_rank=0, std=0.02, out_std=0.01)
    w = [e.w_up.weight for e in full.local_experts]
    assert not torch.equal(w[0], w[1])
    # Rank 1 of an EP=2 layout holds global experts 2 and 3: same weights as in the EP=1 layout.
    half = make(2, num_experts=4, layer_id=3, ep_size=2)
    reinit_experts(half, seed=7, ep_rank=1, std=0.02, out_std=0.01)
    for local, global_id in enumerate((2, 3)):
        for a, b in zip(half.local_experts[local].parameters(), full.local_experts[global_id].parameters()):
            torch.testing.assert_close(a, b)


def test_dropless_routing_keeps_every_slot():
    moe = make(2, capacity_factor=0.1, drop_tokens=False)
    _, rec = moe(torch.randn(2, 16, M), collect_expert_outputs=True)
    assert rec.kept_TK.all()


def test_residual_moe_mixes_a_dense_expert():
    torch.manual_seed(0)
    moe = RoutedMoE(M, SwiGLU(M, 32), layer_id=0, num_experts=E, ep_size=1, k=2, capacity_factor=2.0,
                    eval_capacity_factor=2.0, min_capacity=0, use_residual=True, noisy_gate_policy=None,
                    drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
    names = [n for n, _ in moe.named_parameters()]
    assert any(n.startswith("mlp.") for n in names) and not any("expert" in n for n in names if n.startswith("mlp."))
    x = torch.randn(2, 8, M)
    out, _ = moe(x)
    routed, _ = moe.deepspeed_moe(x)
    coef = torch.softmax(moe.coefficient(x), -1)
    torch.testing.assert_close(out, routed * coef[..., :1] + moe.mlp(x) * coef[..., 1:])


@pytest.mark.parametrize("k, capacity_factor, noisy", [(2, 1.0, None), (1, 0.5, "Jitter")])
def test_activation_checkpointing_changes_no_loss_statistic_or_gradient(k, capacity_factor, noisy):
    """With model.activation_checkpointing each block's forward runs twice (the gate is called twice),
    yet the records, every loss and the routing statistics come from the first forward only, and the
    gradients equal those without recomputation. Random routing (RTS, jitter) replays the same draws."""
    from ds_moe_div.composer import ObjectiveComposer
    from ds_moe_div.config import ModelConfig, MoEConfig, load_experiment
    from ds_moe_div.metrics.accumulator import RoutingAccumulator
    from ds_moe_div.model import MoELanguageModel

    objectives = load_experiment(None, ["objectives.z_loss.coef=0.001", "objectives.divergence.coef=0.1",
                                        "objectives.orthogonality.coef=0.5", "objectives.variance.coef=0.2"]).objectives
    g = torch.Generator().manual_seed(3)
    ids_BS = torch.randint(0, 64, (2, 16), generator=g)
    domains_BS = torch.randint(-1, 3, (2, 16), generator=g)
    runs = {}
    for recompute in (False, True):
        moe = MoEConfig(num_experts=4, k=k, capacity_factor=capacity_factor, min_capacity=1, noisy_gate_policy=noisy)
        cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, activation_checkpointing=recompute, moe=moe,
                          backend="native")
        model = MoELanguageModel(cfg, vocab_size=64, seq_len=16, seed=0).train()
        calls = []
        for layer in model.moe_layers():
            layer.gate.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        composer = ObjectiveComposer(objectives, num_domains=3)
        accumulator = RoutingAccumulator(num_layers=2, num_domains=3, num_experts=4, k=k, layer_ids=(0, 1))
        torch.manual_seed(11)  # RTS and jitter draw from the global generator
        out = model(ids_BS, labels_BS=ids_BS, collect_expert_outputs=composer.needs_expert_outputs)
        losses = composer(out, domain_ids_BS=domains_BS, step=0)
        losses.total.backward()
        accumulator.add(out.routing, domains_BS)
        runs[recompute] = (len(calls), losses, out.routing, accumulator.local_stats().per_layer(),
                           {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (calls_off, losses_off, records_off, stats_off, grads_off), (calls_on, losses_on, records_on, stats_on, grads_on) = \
        runs[False], runs[True]
    assert (calls_off, calls_on) == (2, 4)  # the recomputation really ran
    torch.testing.assert_close(losses_on.total, losses_off.total, rtol=0, atol=0)
    assert losses_on.unscaled.keys() == losses_off.unscaled.keys() and len(losses_on.unscaled) == 5
    for name in losses_off.unscaled:
        torch.testing.assert_close(losses_on.per_layer[name], losses_off.per_layer[name], rtol=0, atol=0)
    for a, b in zip(records_on, records_off):
        assert torch.equal(a.indices_TK, b.indices_TK) and torch.equal(a.kept_TK, b.kept_TK)
        torch.testing.assert_close(a.probs_TE, b.probs_TE, rtol=0, atol=0)
    assert stats_on.keys() == stats_off.keys()
    for name in stats_off:
        torch.testing.assert_close(stats_on[name], stats_off[name], rtol=0, atol=0, equal_nan=True)
    assert grads_on.keys() == grads_off.keys() and any("gate" in n for n in grads_off)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-6, atol=1e-8, msg=name)


def _checkpointing_on_ep2_ranks(rank, world_size, run_dir):
    """One micro-batch forward/backward on an EP=2 engine, without and then with activation checkpointing
    (same weights, same batch, same RNG): losses, records, reduced routing statistics and local gradients."""
    import dataclasses
    import json
    from pathlib import Path

    from ds_moe_div.config import load_experiment
    from ds_moe_div.metrics.accumulator import RoutingAccumulator
    from ds_moe_div.session import build

    root = Path(__file__).resolve().parents[1]
    cfg = load_experiment(root / "ds_configs/experiments/smoke.json",
                          [f"train.run_dir={run_dir}", "train.show_progress=false", "model.moe.ep_size=2",
                           "model.moe.capacity_factor=1.0", "model.backend=native"])
    ds = json.loads((root / "ds_configs/ds_zero2_cpu.json").read_text())
    ds["zero_optimization"] = {"stage": 0}  # ZeRO-2's gradient hooks would move .grad into its buffers
    state = build(cfg, ds)
    model, composer = state.engine.module, state.composer
    batch = next(state.train_iter)
    moe = cfg.model.moe
    runs = []
    for recompute in (False, True):
        model.cfg = dataclasses.replace(model.cfg, activation_checkpointing=recompute)
        calls = []
        hooks = [layer.gate.register_forward_hook(lambda *_, calls=calls: calls.append(1))
                 for layer in model.moe_layers()]
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        out = state.engine(batch["input_ids"], labels_BS=batch["labels"],
                           collect_expert_outputs=composer.needs_expert_outputs)
        losses = composer(out, domain_ids_BS=batch["domain_ids"], step=0)
        losses.total.backward()  # plain autograd: the expert all-to-all's backward crosses the ranks
        acc = RoutingAccumulator(num_layers=len(out.routing), num_domains=len(state.data.domain_names),
                                 num_experts=moe.num_experts, k=moe.k, layer_ids=[r.layer_id for r in out.routing])
        acc.add(out.routing, batch["domain_ids"])
        for hook in hooks:
            hook.remove()
        runs.append({
            "calls": len(calls), "total": float(losses.total),
            "per_layer": {n: v.detach().clone() for n, v in losses.per_layer.items()},
            "indices": [r.indices_TK.clone() for r in out.routing],
            "probs": [r.probs_TE.detach().clone() for r in out.routing],
            "stats": acc.reduce().per_layer(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}})
    return runs


@pytest.mark.slow
def test_activation_checkpointing_with_expert_parallel_ranks(tmp_path):
    """EP=2 on 2 gloo ranks: the recomputation reruns the expert all-to-all in backward, yet losses,
    routing records, the reduced routing statistics and every gradient equal the run without it."""
    from tests.dist_utils import run_on_ranks

    results = run_on_ranks(_checkpointing_on_ep2_ranks, world_size=2, args=(str(tmp_path / "run"),), timeout=300)
    for off, on in results:
        assert (off["calls"], on["calls"]) == (2, 4)  # 2 MoE layers; recomputed once each
        assert on["total"] == off["total"]
        assert off["per_layer"].keys() == on["per_layer"].keys() and len(off["per_layer"]) == 5
        for name in off["per_layer"]:
            torch.testing.assert_close(on["per_layer"][name], off["per_layer"][name], rtol=0, atol=0)
        for a, b in zip(on["indices"], off["indices"]):
            assert torch.equal(a, b)
        for a, b in zip(on["probs"], off["probs"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for name in off["stats"]:
            torch.testing.assert_close(on["stats"][name], off["stats"][name], rtol=0, atol=0, equal_nan=True)
        assert on["grads"].keys() == off["grads"].keys()
        assert any("deepspeed_experts" in n for n in off["grads"]) and any("gate" in n for n in off["grads"])
        for name in off["grads"]:
            torch.testing.assert_close(on["grads"][name], off["grads"][name], rtol=1e-6, atol=1e-8, msg=name)
    # The two ranks hold different experts (EP=2) but reduce to the same statistics.
    for name in results[0][0]["stats"]:
        torch.testing.assert_close(results[0][0]["stats"][name], results[1][0]["stats"][name], equal_nan=True)
