"""Loss-Free Balancing's step: count the global batch's expert loads, update every layer's bias once.

    balancer = LossFreeBalancer(biases, gamma=1e-3, layer_ids=(0, 1), group=dist.group.WORLD)
    for micro_batch in step:                    # after each forward
        balancer.add(out.routing, mask_T)       # local counts, device ops only
    engine.step() ...
    balancer.step()                             # after the optimizer step: ONE all-reduce, then the update

`biases` are any fp32 tensors [E] updated in place: the `selection_bias` buffers of DeepSpeed gates
(`ds_moe_div.selection_bias`), or an imported model's own bias (e.g. deepseek_v3's
`e_score_correction_bias`): the update is `objectives.balancing.loss_free_bias_update(bias, counts,
gamma)`. Counts are the top-k selections (before the capacity limit) of valid tokens over every
micro-step of the step and every rank of `group` (the data- and expert-parallel ranks: every rank of
the world sees its own tokens), so all ranks apply the same update and the biases stay identical.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ds_moe_div.distributed import all_reduce_sum
from ds_moe_div.objectives.balancing import loss_free_bias_update
from ds_moe_div.routing import RoutingRecord


class LossFreeBalancer:
    def __init__(self, biases: Sequence[Tensor], *, gamma: float, layer_ids: Sequence[int] | None = None,
                 group=None) -> None:
        if not biases:
            raise ValueError("LossFreeBalancer needs at least one bias tensor (one per MoE layer)")
        self.biases = list(biases)
        self.gamma = gamma
        self.layer_ids = tuple(range(len(biases))) if layer_ids is None else tuple(layer_ids)
        self.group = group
        self.counts_LE = torch.zeros(len(biases), biases[0].shape[-1], dtype=torch.float64,
                                     device=biases[0].device)
        self.last_counts_LE: Tensor | None = None

    def add(self, records: Sequence[RoutingRecord], mask_T: Tensor | None = None) -> None:
        """Count one micro-batch's selections per layer (records in layer order; mask_T: valid tokens)."""
        if len(records) != len(self.biases):
            raise ValueError(f"{len(records)} routing records for {len(self.biases)} Loss-Free biases")
        with torch.no_grad():
            for layer, record in enumerate(records):
                indices_TK = record.indices_TK.to(self.counts_LE.device)
                weight_TK = torch.ones_like(indices_TK, dtype=torch.float64)
                if mask_T is not None:
                    weight_TK = weight_TK * mask_T.reshape(-1, 1).to(weight_TK)
                self.counts_LE[layer].index_add_(0, indices_TK.reshape(-1), weight_TK.reshape(-1))

    def step(self) -> Tensor:
        """After the optimizer step: all-reduce the step's counts once over `group`, update each bias in
        place, reset the counts. Collective. Returns the global counts [L, E] (on the host)."""
        counts = all_reduce_sum(self.counts_LE.clone(), self.group)
        with torch.no_grad():
            for layer, bias in enumerate(self.biases):
                bias.copy_(loss_free_bias_update(bias_E=bias, counts_E=counts[layer].to(bias.device),
                                                 gamma=self.gamma))
        self.counts_LE.zero_()
        self.last_counts_LE = counts.cpu()
        return self.last_counts_LE

    def scalars(self) -> dict[str, float]:
        """`balance/selection_bias/{min,max,std}/layer_<id>` (std: population) of the current biases."""
        out = {}
        for lid, bias in zip(self.layer_ids, self.biases):
            b = bias.detach().double().cpu()
            out[f"balance/selection_bias/min/layer_{lid}"] = float(b.min())
            out[f"balance/selection_bias/max/layer_{lid}"] = float(b.max())
            out[f"balance/selection_bias/std/layer_{lid}"] = float(b.std(correction=0))
        return out
