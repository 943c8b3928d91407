"""The masked LM loss (lm_loss.py): each micro-batch's share, averaged the way DeepSpeed averages (over
accumulation steps and data-parallel ranks), is the token-weighted mean over the scored targets of the
global batch: against a naive loop, on 2 gloo ranks whose masks hold very different numbers of scored tokens
(one micro-batch none) against 1 process on the concatenated batch, and through DeepSpeed's engine and
train.train_step (gradient accumulation 2)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_moe_div.data.loader import IGNORE_INDEX
from ds_moe_div.lm_loss import GlobalTokenMean, global_token_mean_share, scored_targets
from ds_moe_div.model import ModelOutput
from tests.dist_utils import run_on_ranks

VOCAB, WORLD, ACCUM, B, S = 13, 2, 2, 2, 6


class TinyLM(nn.Module):
    """Embedding + linear head with the trainer's call and typed output (no MoE layer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids_BS, *, labels_BS, collect_expert_outputs=False) -> ModelOutput:
        logits = self.head(self.embed(input_ids_BS))
        nll = F.cross_entropy(logits.flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="none").view_as(labels_BS)
        return ModelOutput(lm_loss=nll.sum() / (labels_BS != IGNORE_INDEX).sum().clamp(min=1), token_nll_BS=nll,
                           routing=())


def _batches() -> list[list[list[dict]]]:
    """[rank][micro-batch] batches; rank 0 scores most targets, rank 1 few, its second micro-batch none."""
    gen = torch.Generator().manual_seed(1)
    keep = [[0.9, 0.7], [0.2, 0.0]]
    out = []
    for rank in range(WORLD):
        micro = []
        for m in range(ACCUM):
            ids = torch.randint(0, VOCAB, (B, S + 1), generator=gen)
            labels = ids[:, 1:].clone()
            labels[torch.rand(B, S, generator=gen) >= keep[rank][m]] = IGNORE_INDEX
            micro.append({"input_ids": ids[:, :-1].contiguous(), "labels": labels,
                          "domain_ids": torch.zeros(B, S, dtype=torch.long)})
        out.append(micro)
    return out


def _reference(batches) -> tuple[float, dict[str, torch.Tensor]]:
    """One process, the concatenated batch: sum of scored NLLs over their count, and its gradient."""
    model = TinyLM()
    ids = torch.cat([b["input_ids"] for rank in batches for b in rank])
    labels = torch.cat([b["labels"] for rank in batches for b in rank])
    out = model(ids, labels_BS=labels)
    loss = out.token_nll_BS.sum() / (labels != IGNORE_INDEX).sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_mean_of_shares_is_the_naive_token_mean():
    gen = torch.Generator().manual_seed(0)
    nll = [torch.rand(B, S, generator=gen) for _ in range(3)]
    labels = [torch.where(torch.rand(B, S, generator=gen) < p, 1, IGNORE_INDEX) for p in (0.9, 0.25, 0.5)]
    num = scored_targets(labels=labels)
    shares = [global_token_mean_share(token_nll_BS=x, labels_BS=y, num_scored=num, num_shares=3)
              for x, y in zip(nll, labels, strict=True)]
    naive_sum, naive_count = 0.0, 0
    for x, y in zip(nll, labels, strict=True):
        for value, label in zip(x.flatten().tolist(), y.flatten().tolist(), strict=True):
            if label != IGNORE_INDEX:
                naive_sum, naive_count = naive_sum + value, naive_count + 1
    assert torch.stack(shares).mean().item() == pytest.approx(naive_sum / naive_count, rel=1e-6)
    micro_means = [x[y != IGNORE_INDEX].mean() for x, y in zip(nll, labels, strict=True)]
    assert abs(torch.stack(micro_means).mean().item() - naive_sum / naive_count) > 1e-3  # what it replaces differs
    empty = torch.full((B, S), IGNORE_INDEX)
    assert global_token_mean_share(token_nll_BS=nll[0], labels_BS=empty, num_scored=scored_targets(labels=[empty]),
                                   num_shares=1).item() == 0.0


def _manual_rank(rank, world_size, batches):
    """DeepSpeed's averaging by hand: backward(share / ACCUM) per micro-batch, gradients all-reduced / W."""
    import torch.distributed as dist

    model = TinyLM()
    lm_mean = GlobalTokenMean(world_size=world_size)
    lm_mean.start_step(batches[rank])
    shares = []
    for batch in batches[rank]:
        out = lm_mean(model(batch["input_ids"], labels_BS=batch["labels"]), labels_BS=batch["labels"])
        (out.lm_loss / ACCUM).backward()
        shares.append(out.lm_loss.detach())
    loss = torch.stack(shares).sum().reshape(1)
    dist.all_reduce(loss)
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)
        grads[name] = p.grad / world_size
    return {"loss": loss.item() / (world_size * ACCUM), "grads": grads,
            "scored": (torch.cat([b["labels"] for b in batches[rank]]) != IGNORE_INDEX).sum().item()}


def _check(ranks, batches):
    loss, grads = _reference(batches)
    assert ranks[0]["scored"] > 3 * ranks[1]["scored"]  # ranks hold very different numbers of scored tokens
    for r in ranks:
        assert r["loss"] == pytest.approx(loss, rel=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_two_ranks_match_one_process_on_the_concatenated_batch():
    batches = _batches()
    _check(run_on_ranks(_manual_rank, world_size=WORLD, args=(batches,)), batches)


def _deepspeed_rank(rank, world_size, batches):
    import deepspeed

    from ds_moe_div.composer import ObjectiveComposer
    from ds_moe_div.config import load_experiment
    from ds_moe_div.log_window import LogWindow
    from ds_moe_div.train import train_step

    model = TinyLM()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": ACCUM, "zero_optimization": {"stage": 0},
          "train_batch_size": B * ACCUM * world_size, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                           config=ds)
    composer = ObjectiveComposer(load_experiment(None, ["objectives.balance.coef=0"]).objectives, num_domains=1)
    window = LogWindow()
    train_step(engine, iter(batches[rank]), composer, window, step=0, lm_mean=GlobalTokenMean(world_size=world_size))
    logged = window.flush(world_size=world_size, lr=1.0)["train/lm_loss"]
    grads = {n: before[n] - p.detach() for n, p in engine.module.named_parameters()}  # SGD, lr 1: the gradient
    return {"loss": logged, "grads": grads,
            "scored": (torch.cat([b["labels"] for b in batches[rank]]) != IGNORE_INDEX).sum().item()}


@pytest.mark.slow
def test_deepspeed_train_step_with_accumulation_matches_one_process():
    """Through the engine: DeepSpeed's 1/G loss scaling and gradient averaging over ranks, the trainer's
    train_step and the logged train/lm_loss."""
    batches = _batches()
    _check(run_on_ranks(_deepspeed_rank, world_size=WORLD, args=(batches,), timeout=300), batches)
