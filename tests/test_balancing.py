"""Balancing baselines: the sequence-wise balance loss, the Loss-Free bias update and its selection-only
bias on DeepSpeed's gate, and the balancer's once-per-step all-reduce (2 gloo ranks = 1 process).

    .venv/bin/python -m pytest tests/test_balancing.py -q
"""
from __future__ import annotations

import pytest
import torch

from ds_moe_div.config import load_experiment
from ds_moe_div.config_loader import ConfigError
from ds_moe_div.loss_free import LossFreeBalancer
from ds_moe_div.model import SwiGLU
from ds_moe_div.moe import RoutedMoE, reinit_experts
from ds_moe_div.objectives.balancing import loss_free_bias_update, sequence_balance_loss
from ds_moe_div.routing import RoutingRecord
from ds_moe_div.selection_bias import BUFFER, enable_selection_bias
from tests.dist_utils import run_on_ranks

M, E = 16, 4


def _loop_sequence_loss(probs_BSE, indices_BSK, mask_BS):
    B, S, num_experts = probs_BSE.shape
    k = indices_BSK.shape[-1]
    values = []
    for b in range(B):
        tokens = [t for t in range(S) if mask_BS[b, t]]
        if not tokens:
            continue
        total = 0.0
        for j in range(num_experts):
            f = num_experts / (k * len(tokens)) * sum(int(j in indices_BSK[b, t].tolist()) for t in tokens)
            p = sum(float(probs_BSE[b, t, j]) for t in tokens) / len(tokens)
            total += f * p
        values.append(total)
    return sum(values) / len(values) if values else 0.0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sequence_balance_loss_matches_a_loop_and_ignores_padding_and_empty_sequences(k):
    g = torch.Generator().manual_seed(k)
    probs = torch.randn(4, 7, 6, generator=g).softmax(-1)
    indices = probs.topk(k, -1).indices
    mask = torch.rand(4, 7, generator=g) > 0.3
    mask[2] = False  # a sequence of pure padding does not count
    got = sequence_balance_loss(probs_BSE=probs, indices_BSK=indices, mask_BS=mask)
    assert float(got) == pytest.approx(_loop_sequence_loss(probs, indices, mask), rel=1e-6)
    # Balanced routing gives 1 (DeepSpeed's l_aux scale), a sequence on k experts E/k.
    uniform = torch.full((1, 6, 6), 1 / 6)
    spread = torch.arange(6).view(1, 6, 1).expand(1, 6, 1)
    assert float(sequence_balance_loss(probs_BSE=uniform, indices_BSK=spread)) == pytest.approx(1.0)
    # The gradient reaches the probabilities only (f is a count).
    p = probs.clone().requires_grad_()
    sequence_balance_loss(probs_BSE=p, indices_BSK=indices, mask_BS=mask).backward()
    assert p.grad.abs().sum() > 0 and p.grad[2].abs().sum() == 0


def test_sequence_scope_through_the_composer():
    from ds_moe_div.composer import ObjectiveComposer
    from ds_moe_div.model import ModelOutput

    cfg = load_experiment(None, ['objectives.balance.scope="sequence"']).objectives
    composer = ObjectiveComposer(cfg, num_domains=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 2, (3, 5), generator=g)
    probs = torch.randn(15, 4, generator=g).softmax(-1)
    idx = probs.topk(2, -1).indices
    rec = RoutingRecord(layer_id=0, logits_TE=probs.log(), probs_TE=probs, indices_TK=idx, weights_TK=probs.gather(1, idx),
                        kept_TK=torch.ones(15, 2, dtype=torch.bool), l_aux=torch.zeros(()))
    out = ModelOutput(lm_loss=torch.zeros(()), token_nll_BS=torch.zeros(3, 5), routing=(rec,))
    got = composer(out, domain_ids_BS=ids, step=0).unscaled["balance"]
    want = sequence_balance_loss(probs_BSE=probs.view(3, 5, 4), indices_BSK=idx.view(3, 5, 2), mask_BS=ids >= 0)
    assert float(got) == pytest.approx(float(want))


def test_bias_update_sign_and_magnitude_by_hand():
    bias = torch.tensor([[0.0, 0.5, -0.25, 1.0], [0.0, 0.0, 0.0, 0.0]])
    counts = torch.tensor([[10.0, 2.0, 6.0, 6.0], [3.0, 3.0, 3.0, 3.0]])  # means 6 and 3
    got = loss_free_bias_update(bias_E=bias, counts_E=counts, gamma=0.01)
    # overloaded expert 0 goes down by gamma, underloaded expert 1 up, experts at the mean keep their bias
    assert torch.equal(got, torch.tensor([[-0.01, 0.51, -0.25, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    assert got.dtype == torch.float32


def test_config_vocabulary_and_errors():
    cfg = load_experiment(None, ['objectives.balance.method="loss_free"', "objectives.balance.gamma=0.002"])
    assert cfg.objectives.balance.method == "loss_free" and cfg.objectives.balance.gamma == 0.002
    with pytest.raises(ConfigError, match="objectives.balance.coef=0"):
        load_experiment(None, ['objectives.balance.method="none"'])
    assert load_experiment(None, ['objectives.balance.method="none"', "objectives.balance.coef=0"])
    with pytest.raises(ConfigError, match="gamma"):
        load_experiment(None, ["objectives.balance.gamma=0"])


def make(k, *, capacity_factor=4.0):
    torch.manual_seed(0)
    moe = RoutedMoE(M, SwiGLU(M, 32), layer_id=0, num_experts=E, ep_size=1, k=k, capacity_factor=capacity_factor,
                    eval_capacity_factor=capacity_factor, min_capacity=0, use_residual=False, noisy_gate_policy=None,
                    drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
    reinit_experts(moe, seed=1, ep_rank=0, std=0.3, out_std=0.3)
    return moe


@pytest.mark.parametrize("k", [1, 2, 3])
def test_bias_changes_selection_but_not_the_combine_weights(k):
    moe = make(k)
    x = torch.randn(2, 15, M)
    _, plain = moe(x)
    (bias,) = enable_selection_bias([moe.gate])
    _, zero = moe(x)  # a zero bias routes exactly like no bias
    for name in ("indices_TK", "weights_TK", "kept_TK", "l_aux"):
        torch.testing.assert_close(getattr(zero, name), getattr(plain, name))
    bias.copy_(torch.tensor([0.3, -0.3, 0.0, 0.1]))
    out, rec = moe(x, collect_expert_outputs=True)
    probs = rec.probs_TE
    want_sel = (probs + bias).topk(k, -1).indices
    assert torch.equal(rec.indices_TK.sort(-1).values, want_sel.sort(-1).values)
    assert not torch.equal(rec.indices_TK.sort(-1).values, plain.indices_TK.sort(-1).values)
    # Weights: the UNBIASED probabilities of the chosen experts (renormalised over the k for k >= 2).
    picked = probs.gather(1, rec.indices_TK)
    want_w = picked if k == 1 else picked / picked.sum(-1, keepdim=True)
    torch.testing.assert_close(rec.weights_TK, want_w)
    torch.testing.assert_close(probs, plain.probs_TE)  # the router itself is untouched
    combined = (rec.expert_outputs_TKM * rec.weights_TK.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(out.reshape(-1, M), combined, atol=1e-5, rtol=1e-5)
    # No gradient reaches the bias; the router weight still gets one.
    out.sum().backward()
    assert not bias.requires_grad and moe.gate.wg.weight.grad is not None


def test_bias_buffer_stays_fp32_and_state_dict_round_trip_is_exact():
    moe = make(2)
    (bias,) = enable_selection_bias([moe.gate])
    bias.copy_(torch.tensor([1e-3, -2e-3, 3e-3, 0.123456789]))
    moe.bfloat16()
    kept = moe.gate._buffers[BUFFER]
    assert kept.dtype == torch.float32 and moe.gate.wg.weight.dtype == torch.bfloat16
    assert torch.equal(kept, torch.tensor([1e-3, -2e-3, 3e-3, 0.123456789]))
    state = moe.state_dict()
    key = next(k for k in state if k.endswith(BUFFER))
    assert "expert" not in key.replace("deepspeed_moe", "")  # DeepSpeed would shard it as an expert tensor
    fresh = make(2).bfloat16()
    enable_selection_bias([fresh.gate])
    fresh.load_state_dict(state)
    assert torch.equal(fresh.gate._buffers[BUFFER], kept)
    plain = make(2).bfloat16()
    plain.load_state_dict(state)  # a run without Loss-Free ignores the bias (init_from)
    assert BUFFER not in dict(plain.named_buffers())
    biased = make(2).bfloat16()
    enable_selection_bias([biased.gate])
    biased.load_state_dict(plain.state_dict())  # init_from a run without a bias: starts at zero
    assert torch.equal(biased.gate._buffers[BUFFER], torch.zeros(E))


def _record(indices_TK):
    n = indices_TK.shape[0]
    return RoutingRecord(layer_id=0, logits_TE=torch.zeros(n, E), probs_TE=torch.zeros(n, E), indices_TK=indices_TK,
                         weights_TK=torch.zeros(indices_TK.shape), kept_TK=torch.ones(indices_TK.shape, dtype=bool),
                         l_aux=torch.zeros(()))


def _micro_batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randint(0, E, (n, 2), generator=g), torch.rand(n, generator=g) > 0.2) for n in (9, 5 + 4 * rank)]


def _balancer_steps(rank, world_size, ranks_to_feed):
    import torch.distributed as dist
    biases = [torch.zeros(E), torch.zeros(E)]
    balancer = LossFreeBalancer(biases, gamma=0.01, group=dist.group.WORLD if dist.is_initialized() else None)
    calls = []
    if dist.is_initialized():
        original = dist.all_reduce
        dist.all_reduce = lambda t, *a, **kw: calls.append(t.numel()) or original(t, *a, **kw)
    history = []
    for step in range(3):
        for r in ranks_to_feed:
            for indices, mask in _micro_batches(r + 10 * step):
                balancer.add([_record(indices), _record((indices + 1) % E)], mask)
        history.append((balancer.step().clone(), [b.clone() for b in biases]))
    if dist.is_initialized():
        dist.all_reduce = original
    return {"history": history, "calls": calls, "scalars": balancer.scalars()}


@pytest.mark.slow
def test_two_ranks_update_like_one_process_on_the_concatenated_batch():
    one = _balancer_steps(0, 1, [0, 1])
    two = run_on_ranks(_feed_own, world_size=2, timeout=120)
    for rank in two:
        assert rank["calls"] == [2 * E] * 3  # one all-reduce per optimizer step, not per micro-step
        for (counts, biases), (want_counts, want_biases) in zip(rank["history"], one["history"]):
            assert torch.equal(counts, want_counts)
            for b, w in zip(biases, want_biases):
                assert torch.equal(b, w)
    assert set(one["scalars"]) == {f"balance/selection_bias/{s}/layer_{i}" for s in ("min", "max", "std")
                                   for i in (0, 1)}
    assert one["scalars"]["balance/selection_bias/max/layer_0"] > 0 > one["scalars"]["balance/selection_bias/min/layer_0"]


def _feed_own(rank, world_size):
    return _balancer_steps(rank, world_size, [rank])


def _train_save_resume(rank, world_size, tmp, backend):
    import json
    from pathlib import Path

    from ds_moe_div.evaluation.training_curves import read_scalars
    from ds_moe_div.session import build
    from ds_moe_div.train import maybe_log, train_step

    root = Path(__file__).resolve().parents[1]
    overrides = [f"train.run_dir={tmp}/run", "train.show_progress=false", 'objectives.balance.method="loss_free"',
                 "objectives.balance.gamma=0.01", "train.log_interval=3", f"model.backend={backend}"]
    ds = json.loads((root / "ds_configs" / "ds_zero2_cpu.json").read_text())
    cfg = load_experiment(root / "ds_configs" / "experiments" / "smoke.json", overrides)
    state = build(cfg, ds)
    counts = []
    for _ in range(3):
        train_step(state.engine, state.train_iter, state.composer, state.window, step=state.step,
                   balancer=state.balancer)
        counts.append(state.balancer.last_counts_LE.clone())
        state.step += 1
    maybe_log(state, _Bar())  # the trainer's own logging path: window flush + the balancer's bias scalars
    state.monitor.flush()
    scalars = read_scalars(f"{tmp}/run") if rank == 0 else {}
    state.save()
    trained = [b.clone() for b in state.balancer.biases]
    state.close()  # releases the run dir's lock for the resumed session
    resumed = build(load_experiment(root / "ds_configs" / "experiments" / "smoke.json", [*overrides, "train.resume=true"]), ds)
    from ds_moe_div.evaluation.loading import load_for_eval
    evaluated = load_for_eval(f"{tmp}/run", show_progress=False).model.moe_layers()  # eval routes with the bias
    return {"trained": trained, "resumed": [b.clone() for b in resumed.balancer.biases], "step": resumed.step,
            "counts": counts, "scalars": scalars, "evaluated": [(m.expert_bias if backend == "autoep" else m.gate._buffers[BUFFER]).clone() for m in evaluated]}


class _Bar:
    def set_postfix(self, **_):
        pass


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["autoep", "native"])
def test_bias_is_trained_checkpointed_and_resumed_bit_exactly(tmp_path, backend):
    """Three optimizer steps of the smoke model on 2 ranks with Loss-Free Balancing: each bias is the
    update replayed on each step's global counts, the same on both ranks, and resumes bit-exactly.
    (At gamma 0.01 the untrained router's near-uniform probabilities make the bias oscillate: 0.01
    outweighs their spread, so a bias may well be back at 0 after an even number of steps.)"""
    ranks = run_on_ranks(_train_save_resume, world_size=2, args=(str(tmp_path), backend), timeout=400)
    for rank in ranks:
        assert rank["step"] == 3
        assert any(trained.abs().max() > 0 for trained in rank["trained"])  # an odd number of +-gamma steps
        for layer, (trained, resumed, other) in enumerate(zip(rank["trained"], rank["resumed"], ranks[0]["trained"])):
            assert trained.dtype == torch.float32
            assert torch.equal(trained, resumed) and torch.equal(trained, other)
            assert torch.equal(trained, rank["evaluated"][layer])
            # Replaying the update on the step's global counts (identical on both ranks) gives the bias.
            want = torch.zeros(4)
            for step_counts, other_counts in zip(rank["counts"], ranks[0]["counts"]):
                assert torch.equal(step_counts, other_counts) and step_counts[layer].sum() > 0
                want = loss_free_bias_update(bias_E=want, counts_E=step_counts[layer], gamma=0.01)
            assert torch.equal(trained, want)
    logged = ranks[0]["scalars"]
    for tag in ("routing/max_violation_global/layer_0", "routing/routing_variance/mean", "routing/expert_overlap/layer_1",
                "balance/selection_bias/std/layer_1", "balance/selection_bias/max/layer_0"):
        assert 3 in logged.get(tag, {}), tag
    bias = ranks[0]["trained"][1].double()
    assert logged["balance/selection_bias/std/layer_1"][3] == pytest.approx(float(bias.std(correction=0)), abs=1e-7)
