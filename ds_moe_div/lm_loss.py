"""The LM loss of masked (instruction) data: the token-weighted mean over the scored targets of the global batch.

    lm_mean = GlobalTokenMean(world_size=W)            # data.format "instruction" (session.py)
    lm_mean.start_step(micro_batches)                  # once per optimizer step: one all-reduce of a scalar
    out = lm_mean(out, labels_BS=batch["labels"])      # each micro-batch: out.lm_loss becomes its share

How the loss is normalised without it: the model's `lm_loss` is each micro-batch's mean NLL over its
targets, and DeepSpeed averages over the G accumulation steps (engine.backward scales by 1/G) and the W
data-parallel ranks (the gradient all-reduce divides by W): the step's loss is the mean of micro-batch
means. For packed text every micro-batch holds the same number of targets, up to the padded last row of a
stream, so that is the token-weighted mean and text data keeps it. Instruction rows hold very different
numbers of response tokens; the mean of means would weight a token by 1 / (its micro-batch's count).
So with a loss mask each micro-batch contributes its share

    share = W·G · Σ_{t in the micro-batch} m_t·nll_t / N,     N = Σ_{t in all G micro-batches of all W ranks} m_t

(m_t = 1 for a scored target: label != -100), and the mean of the W·G shares that DeepSpeed takes is
Σ m_t·nll_t / N over the whole global batch, the loss of one process on the concatenated batch. The logged
train/lm_loss (the log window's mean of the shares) is that value too. A global batch without a scored
target contributes 0 (N is clamped to 1).
Shape suffixes: B sequences, S positions.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ds_moe_div.data.loader import IGNORE_INDEX
from ds_moe_div.distributed import all_reduce_sum


def scored_targets(*, labels: Sequence[torch.Tensor], group=None) -> torch.Tensor:
    """N: targets with a label (!= IGNORE_INDEX) in these micro-batches, summed over `group`'s ranks (0-d
    float64; collective when torch.distributed is initialised with more than one rank)."""
    local = torch.stack([(labels_BS != IGNORE_INDEX).sum() for labels_BS in labels]).sum().double().reshape(1)
    return all_reduce_sum(local, group=group)[0]


def global_token_mean_share(*, token_nll_BS: torch.Tensor, labels_BS: torch.Tensor, num_scored: torch.Tensor,
                            num_shares: int) -> torch.Tensor:
    """num_shares · Σ_{b,s} m_bs · nll_bs / max(N, 1), m_bs = labels_BS != IGNORE_INDEX (see the module
    docstring); `num_scored` N counts the global batch, `num_shares` = data-parallel ranks × accumulation steps."""
    scored = labels_BS != IGNORE_INDEX
    total = torch.where(scored, token_nll_BS, torch.zeros((), dtype=token_nll_BS.dtype, device=token_nll_BS.device))
    return total.sum() * (num_shares / num_scored.clamp(min=1).to(token_nll_BS.dtype))


class GlobalTokenMean:
    """Replaces each micro-batch's `lm_loss` by its share of the global batch's token-weighted mean."""

    def __init__(self, *, world_size: int, group=None) -> None:
        """`world_size`: data-parallel ranks (DeepSpeed averages gradients over them); `group`: theirs."""
        self.world_size, self.group = world_size, group
        self.num_scored: torch.Tensor | None = None
        self.num_shares = 0

    def start_step(self, micro_batches: Sequence[dict]) -> None:
        """Count the scored targets of one optimizer step's micro-batches on every rank."""
        self.num_scored = scored_targets(labels=[b["labels"] for b in micro_batches], group=self.group)
        self.num_shares = self.world_size * len(micro_batches)

    def __call__(self, out, *, labels_BS: torch.Tensor):
        if self.num_scored is None:
            raise RuntimeError("GlobalTokenMean: call start_step(micro_batches) at the start of each optimizer step")
        share = global_token_mean_share(token_nll_BS=out.token_nll_BS, labels_BS=labels_BS,
                                        num_scored=self.num_scored.to(labels_BS.device), num_shares=self.num_shares)
        return dataclasses.replace(out, lm_loss=share)
