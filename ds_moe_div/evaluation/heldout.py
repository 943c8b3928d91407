"""Held-out LM loss overall and per domain: one forward pass, sums reduced with ONE all-reduce.

    sums = heldout_sums(engine, batches, num_domains=D, accumulator=acc)   # collective
    summary = summarize(sums, domain_names)                                # LossSummary, on the host
    summary.lm_loss, summary.ppl, summary.per_domain["code"].ppl

Targets count where the label is not ignored; a target belongs to the domain of its input token
(domain id of position t, target t+1), the convention of the training-time evaluation. Tokens of
unlabelled inputs (domain -1) count overall but in no domain. PPL = exp(mean NLL) in nats.
Shape suffixes (docs/SHAPES.md): B sequences, S positions, D domains.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ds_moe_div.data.loader import IGNORE_INDEX
from ds_moe_div.distributed import all_reduce_sum


@dataclass(frozen=True)
class DomainLoss:
    lm_loss: float | None  # None where the domain has no target
    ppl: float | None
    tokens: int

    def to_dict(self) -> dict:
        return {"lm_loss": self.lm_loss, "ppl": self.ppl, "tokens": self.tokens}


@dataclass(frozen=True)
class LossSummary:
    lm_loss: float | None
    ppl: float | None
    tokens: int
    per_domain: dict[str, DomainLoss]


def nll_sums(nll_BS: torch.Tensor, labels_BS: torch.Tensor, domain_ids_BS: torch.Tensor,
             num_domains: int) -> torch.Tensor:
    """Local float64 [(D+1) * 2] = [nll, targets] overall, then per domain, for one micro-batch."""
    valid = labels_BS != IGNORE_INDEX
    dom = torch.where(valid, domain_ids_BS, -1).flatten()
    nll = torch.where(valid, nll_BS, 0.0).flatten().double()
    per_nll = nll.new_zeros(num_domains + 1).index_add_(0, dom + 1, nll)
    per_cnt = nll.new_zeros(num_domains + 1).index_add_(0, dom + 1, valid.flatten().double())
    out = torch.stack([per_nll, per_cnt], dim=-1)  # row 0 collects unlabelled targets: replaced by the total
    out[0] = torch.stack([nll.sum(), valid.sum().double()])
    return out.flatten()


def _device(engine) -> torch.device:
    device = getattr(engine, "device", None)
    return torch.device(device) if device is not None else next(engine.parameters()).device


def heldout_sums(engine, batches: Iterable[dict], *, num_domains: int, accumulator=None, group=None) -> torch.Tensor:
    """Sum nll and targets over `batches` (this rank's micro-batches), then all-reduce once over `group`.

    Collective: every rank must call it with the same number of batches. `accumulator` (a
    RoutingAccumulator) also counts the routing of micro-batches holding labelled tokens (micro-batches
    of pure padding, which only sharding creates, are skipped so that N ranks count what 1 rank does).
    The caller sets eval mode; gradients are off here. Returns the reduced sums on the host.
    """
    device = _device(engine)
    sums = torch.zeros(2 * (num_domains + 1), dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = engine(batch["input_ids"], labels_BS=batch["labels"])
            sums += nll_sums(out.token_nll_BS, batch["labels"], batch["domain_ids"], num_domains)
            if accumulator is not None and bool((batch["domain_ids"] >= 0).any()):
                accumulator.add(out.routing, batch["domain_ids"])
    return all_reduce_sum(sums, group).cpu()


def _loss(nll: float, count: float) -> tuple[float | None, float | None]:
    if count <= 0:
        return None, None
    mean = nll / count
    return mean, math.exp(mean)


def summarize(sums: torch.Tensor, domain_names: Sequence[str]) -> LossSummary:
    """LossSummary of reduced `heldout_sums` (None where there is no target)."""
    pairs = sums.view(-1, 2).tolist()
    if len(pairs) != len(domain_names) + 1:
        raise ValueError(f"{len(pairs) - 1} domains in the sums, {len(domain_names)} names")
    per_domain = {name: DomainLoss(*_loss(nll, count), tokens=int(count))
                  for name, (nll, count) in zip(domain_names, pairs[1:])}
    return LossSummary(*_loss(*pairs[0]), tokens=int(pairs[0][1]), per_domain=per_domain)
