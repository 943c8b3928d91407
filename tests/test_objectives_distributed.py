"""Expert-divergence loss and global-batch load balance on 2 real gloo ranks == the single-process
loss on the concatenated batch.

    .venv/bin/python -m pytest tests/test_objectives_distributed.py -q

Each rank routes its own micro-batch (different batch sizes and sequence lengths) through a shared
router weight, all-reduces the domain sums in `global_domain_means`, and returns its loss and its
router gradient. Every rank's loss must equal the single-process loss, and the MEAN of the ranks'
gradients (what DeepSpeed's data-parallel averaging produces) must equal the single-process gradient.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from ds_moe_div import objectives as obj
from tests.dist_utils import run_on_ranks

pytestmark = pytest.mark.slow  # spawns 2 processes (one spawn for the whole module, ~5 s)

DT = torch.float64
NUM_LAYERS, MODEL_DIM, NUM_EXPERTS, NUM_DOMAINS = 2, 4, 6, 5
COMBOS = list(itertools.product(["sequence", "token"], ["pairwise_neglog", "generalized"]))

_UNEVEN_RANK0 = [[0, 0, 0, 1, 1, -1],
                 [2, 2, 2, 2, 2, 2],
                 [0, 1, 0, 1, -1, -1]]
_NO_DOMAIN2_RANK1 = [[1, 1, 1, 1, 1, 1, 0, 0],
                     [3, 3, -1, 0, 0, 0, 0, -1]]
CASES = {  # name: (rank 0 domain ids, rank 1 domain ids); domain 4 is absent everywhere
    "rank1_lacks_a_domain": (_UNEVEN_RANK0, _NO_DOMAIN2_RANK1),
    "rank1_unlabelled": (_UNEVEN_RANK0, [[-1] * 5]),
    "one_domain_per_rank": ([[0, 0, 0, -1], [0, 0, -1, -1]], [[3, 3, 3], [3, 3, 3], [3, -1, -1]]),
}


def _loss_and_grad(x_BSM, ids_BS, weight_LME, *, average, form, group):
    weight = weight_LME.clone().requires_grad_(True)
    logits_LTE = torch.einsum("tm,lme->lte", x_BSM.reshape(-1, MODEL_DIM), weight)
    sums_LDE, counts_D = obj.domain_routing_sums(probs_LTE=logits_LTE.softmax(-1), domain_ids_BS=ids_BS,
                                                 num_domains=NUM_DOMAINS, average=average)
    q_LDE, counts_D = obj.global_domain_means(sums_LDE=sums_LDE, counts_D=counts_D, group=group)
    loss_L, jsd_L, present = obj.expert_divergence_loss(q_LDE=q_LDE, counts_D=counts_D, form=form)
    loss = loss_L.mean()
    (grad,) = torch.autograd.grad(loss, weight, allow_unused=True)
    grad = torch.zeros_like(weight) if grad is None else grad
    return {"loss": loss.detach(), "jsd": jsd_L.detach(), "present": int(present), "grad": grad}


def _token_weighted_loss_and_grad(x_BSM, ids_BS, weight_LME, *, group):
    """Generalized divergence over sequence means with token-share domain weights (the default)."""
    weight = weight_LME.clone().requires_grad_(True)
    probs_LTE = torch.einsum("tm,lme->lte", x_BSM.reshape(-1, MODEL_DIM), weight).softmax(-1)
    sums_LDE, counts_D = obj.domain_routing_sums(probs_LTE=probs_LTE, domain_ids_BS=ids_BS,
                                                 num_domains=NUM_DOMAINS, average="sequence")
    tokens_D = obj.domain_token_counts(domain_ids_BS=ids_BS, num_domains=NUM_DOMAINS, dtype=DT)
    q_LDE, counts_D, tokens_D = obj.global_domain_means_and_weights(sums_LDE=sums_LDE, counts_D=counts_D,
                                                                    weights_D=tokens_D, group=group)
    loss_L, _, _ = obj.expert_divergence_loss(q_LDE=q_LDE, counts_D=counts_D, form="generalized", weights_D=tokens_D)
    (grad,) = torch.autograd.grad(loss_L.mean(), weight)
    return {"loss": loss_L.detach(), "grad": grad}


def _balance_loss_and_grad(x_BSM, ids_BS, weight_LME, *, group, k=2):
    weight = weight_LME.clone().requires_grad_(True)
    probs_LTE = torch.einsum("tm,lme->lte", x_BSM.reshape(-1, MODEL_DIM), weight).softmax(-1)
    indices_LTK = probs_LTE.detach().topk(k, dim=-1).indices
    loss_L = obj.global_load_balance_loss(probs_LTE=probs_LTE, indices_LTK=indices_LTK,
                                          mask_T=ids_BS.flatten() >= 0, group=group)
    (grad,) = torch.autograd.grad(loss_L.mean(), weight)
    return {"loss": loss_L.detach(), "grad": grad}


def _rank_main(rank, world_size, weight, batches):
    own_groups = [dist.new_group([r]) for r in range(world_size)]  # every rank must create every group
    results = {}
    for name, per_rank in batches.items():
        x, ids = per_rank[rank]
        for average, form in COMBOS:
            kw = {"average": average, "form": form}
            results[name, average, form] = _loss_and_grad(x, ids, weight, group=dist.group.WORLD, **kw)
            results[name, average, form, "size1"] = _loss_and_grad(x, ids, weight, group=own_groups[rank], **kw)
            results[name, average, form, "local"] = _loss_and_grad(x, ids, weight, group=None, **kw)
        results[name, "balance"] = _balance_loss_and_grad(x, ids, weight, group=dist.group.WORLD)
        results[name, "token_weights"] = _token_weighted_loss_and_grad(x, ids, weight, group=dist.group.WORLD)
    return results


def _concatenate(per_rank):
    """Pad every micro-batch to the longest sequence (id -1) and stack the sequences."""
    seq_len = max(ids.shape[1] for _, ids in per_rank)
    xs, idss = [], []
    for x, ids in per_rank:
        pad = seq_len - ids.shape[1]
        xs.append(torch.cat([x, torch.full((x.shape[0], pad, MODEL_DIM), 3.0, dtype=DT)], dim=1))
        idss.append(torch.cat([ids, torch.full((ids.shape[0], pad), -1, dtype=torch.int64)], dim=1))
    return torch.cat(xs), torch.cat(idss)


@pytest.fixture(scope="module")
def spawned():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(NUM_LAYERS, MODEL_DIM, NUM_EXPERTS, generator=gen, dtype=DT)
    batches = {}
    for name, rank_ids in CASES.items():
        batches[name] = [(torch.randn(len(ids), len(ids[0]), MODEL_DIM, generator=gen, dtype=DT),
                          torch.tensor(ids, dtype=torch.int64)) for ids in rank_ids]
    return weight, batches, run_on_ranks(_rank_main, world_size=2, args=(weight, batches), timeout=180)


@pytest.mark.parametrize("average,form", COMBOS)
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_concatenated_batch(spawned, case, average, form):
    weight, batches, results = spawned
    x, ids = _concatenate(batches[case])
    single = _loss_and_grad(x, ids, weight, average=average, form=form, group=None)
    per_rank = [r[case, average, form] for r in results]
    assert single["present"] >= 2 and single["loss"] != 0
    for got in per_rank:
        torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(got["jsd"], single["jsd"], rtol=1e-10, atol=1e-13)
        assert got["present"] == single["present"]
    mean_grad = torch.stack([got["grad"] for got in per_rank]).mean(0)
    torch.testing.assert_close(mean_grad, single["grad"], rtol=1e-10, atol=1e-13)
    assert not torch.allclose(per_rank[0]["grad"], single["grad"])  # the ranks' own gradients differ


@pytest.mark.parametrize("average,form", COMBOS)
@pytest.mark.parametrize("case", list(CASES))
def test_group_of_size_one_is_local(spawned, case, average, form):
    _, _, results = spawned
    for r in results:
        size1, local = r[case, average, form, "size1"], r[case, average, form, "local"]
        assert torch.equal(size1["loss"], local["loss"]) and torch.equal(size1["grad"], local["grad"])


@pytest.mark.parametrize("case", list(CASES))
def test_global_batch_load_balance_on_two_ranks_matches_concatenated_batch(spawned, case):
    """balance.scope=global_batch: every rank's L_aux is the concatenated batch's; mean gradient likewise."""
    weight, batches, results = spawned
    x, ids = _concatenate(batches[case])
    single = _balance_loss_and_grad(x, ids, weight, group=None)
    per_rank = [r[case, "balance"] for r in results]
    for got in per_rank:
        torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-10, atol=1e-13)
    mean_grad = torch.stack([got["grad"] for got in per_rank]).mean(0)
    torch.testing.assert_close(mean_grad, single["grad"], rtol=1e-10, atol=1e-13)
    assert not torch.allclose(per_rank[0]["grad"], single["grad"])  # the ranks' own gradients differ
    local = _balance_loss_and_grad(*batches[case][0], weight, group=None)
    if all(bool((ids >= 0).any()) for _, ids in batches[case]):  # else the global batch is rank 0's
        assert not torch.allclose(local["loss"], single["loss"])  # the micro-batch value is another number


@pytest.mark.parametrize("case", list(CASES))
def test_token_share_weights_on_two_ranks_match_concatenated_batch(spawned, case):
    """divergence.domain_weights=tokens with average=sequence: the token counts ride in the same all-reduce."""
    weight, batches, results = spawned
    x, ids = _concatenate(batches[case])
    single = _token_weighted_loss_and_grad(x, ids, weight, group=None)
    per_rank = [r[case, "token_weights"] for r in results]
    for got in per_rank:
        torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-10, atol=1e-13)
    mean_grad = torch.stack([got["grad"] for got in per_rank]).mean(0)
    torch.testing.assert_close(mean_grad, single["grad"], rtol=1e-10, atol=1e-13)
