"""The evaluation pass for the metrics that need more than routing counts: Expert Overlap and the mean
output norm (the selected experts' outputs) and the Silhouette coefficient (the MoE layers' input
hidden states).

    scalars, info = specialisation_pass(engine, layers, batches, sample_size=2000, seed=0)   # collective

One extra forward pass over the held-out batches, with the experts' outputs collected and a forward hook
on each MoE layer. Expert Overlap (metrics.paper.expert_overlap) covers every labelled token with two
kept experts, and the mean output norm (metrics.output_norm) every kept slot of a labelled token, both
summed over ranks with one all-reduce. Silhouette (metrics.paper.silhouette): tokens
labelled by their top-1 selected expert (slot 0 of the routing record), features = the MoE layer's
input hidden state (after the pre-FFN norm), cosine distance, on a fixed random sample of at most
`sample_size` labelled tokens: each token gets a pseudo-random key from its sequence's token ids, its
position and `seed` (`token_keys`), every rank keeps its `sample_size` smallest keys, and the gathered
samples are cut to the smallest overall, so 1 and N ranks score the same sample.
Tags: routing/expert_overlap/layer_<id>, routing/expert_output_norm/layer_<id>,
routing/silhouette/layer_<id>, and .../mean.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from ds_moe_div.distributed import all_reduce_sum
from ds_moe_div.metrics import paper
from ds_moe_div.metrics.output_norm import output_norm_sums

FEATURE_SPACE = "MoE layer input hidden states (after the pre-FFN RMSNorm)"


def token_keys(input_ids_BS: torch.Tensor, seed: int) -> torch.Tensor:
    """A pseudo-random key in [0, 1) per token, a function of (its sequence's token ids, its position,
    seed) only: the sample does not depend on how the batches are sharded over ranks."""
    ids = input_ids_BS.long().cpu()
    positions = torch.arange(ids.shape[1], dtype=torch.long)
    seq_hash_B = (ids * (positions * 2654435761 + 97)).sum(1) + seed * 1000000007
    x = seq_hash_B[:, None] * 6364136223846793005 + positions * 1442695040888963407  # int64, wraps
    for shift, mult in ((30, -4658895280553007687), (27, -7723592293110705685)):  # splitmix64 finaliser
        x = (x ^ ((x >> shift) & ((1 << (64 - shift)) - 1))) * mult
    return (x & ((1 << 52) - 1)).double().reshape(-1) / float(1 << 52)


class _Sample:
    """The `size` tokens with the smallest keys seen so far: a uniform sample without replacement."""

    def __init__(self, size: int, num_layers: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.keys = torch.empty(0, dtype=torch.float64)
        self.features = [None] * num_layers
        self.labels = [None] * num_layers

    def offer(self, input_ids_BS: torch.Tensor, valid_T: torch.Tensor, hidden: list, top1: list) -> None:
        keys = token_keys(input_ids_BS, self.seed)[valid_T]
        merged = torch.cat([self.keys, keys])
        order = torch.argsort(merged)[:self.size]
        self.keys = merged[order]
        for layer, (h_TM, e_T) in enumerate(zip(hidden, top1)):
            new_h, new_e = h_TM[valid_T].float().cpu(), e_T[valid_T].cpu()
            old_h = new_h[:0] if self.features[layer] is None else self.features[layer]
            old_e = new_e[:0] if self.labels[layer] is None else self.labels[layer]
            self.features[layer] = torch.cat([old_h, new_h])[order]
            self.labels[layer] = torch.cat([old_e, new_e])[order]


def specialisation_pass(engine, layers: Sequence, batches: Iterable[dict], *, sample_size: int = 2000,
                        seed: int = 0) -> tuple[dict[str, float], dict]:
    """Collective. Returns (scalars by tag, silhouette settings incl. the sample size actually scored)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(_capture(inputs, i)) for i, layer in enumerate(layers)]
    sample = _Sample(sample_size, len(layers), seed)
    sums = None
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                out = engine(batch["input_ids"], labels_BS=batch["labels"], collect_expert_outputs=True)
                valid_T = batch["domain_ids"].reshape(-1) >= 0
                sums = _overlap_sums(out.routing, valid_T, sums)
                sample.offer(batch["input_ids"], valid_T.cpu(), [inputs[i] for i in range(len(layers))],
                             [r.indices_TK[:, 0] for r in out.routing])
    finally:
        for hook in hooks:
            hook.remove()
    sums = all_reduce_sum(sums if sums is not None else torch.zeros(4 * len(layers), dtype=torch.float64,
                                                                    device=engine.device)).cpu()
    overlap_sum_L, overlap_tokens_L, norm_sum_L, norm_slots_L = sums.view(4, len(layers))
    overlap_L, norm_L = paper._ratio(overlap_sum_L, overlap_tokens_L), paper._ratio(norm_sum_L, norm_slots_L)
    features, labels = _gather(sample, world)
    scalars: dict[str, float] = {}
    layer_ids = [layer.layer_id for layer in layers]
    silhouette_L = [float(paper.silhouette(features_NM=f, labels_N=e)) for f, e in zip(features, labels)]
    for name, values in (("expert_overlap", [float(v) for v in overlap_L]),
                         ("expert_output_norm", [float(v) for v in norm_L]), ("silhouette", silhouette_L)):
        defined = [v for v in values if not math.isnan(v)]
        scalars.update({f"routing/{name}/layer_{lid}": v for lid, v in zip(layer_ids, values) if not math.isnan(v)})
        if defined:
            scalars[f"routing/{name}/mean"] = sum(defined) / len(defined)
    info = {"sample_size": int(labels[0].numel()) if labels else 0, "max_sample_size": sample_size, "seed": seed,
            "labels": "top-1 selected expert", "features": FEATURE_SPACE, "distance": "cosine"}
    return scalars, info


def _capture(store: dict, index: int):
    def hook(module, args, output):
        hidden = args[0]
        store[index] = hidden.detach().reshape(-1, hidden.shape[-1])
    return hook


def _overlap_sums(records, valid_T: torch.Tensor, sums: torch.Tensor | None) -> torch.Tensor:
    """[overlap sum, token count, output norm sum, kept slot count] per layer (float64, [4 * L]): overlap over
    labelled tokens with >= 2 kept experts, norms over the kept slots of labelled tokens."""
    values = []
    for r in records:
        overlap_T, pair_T = paper.token_expert_overlap_T(outputs_TKM=r.expert_outputs_TKM, kept_TK=r.kept_TK)
        weight_T = (pair_T & valid_T).double()
        norm_sum, slots = output_norm_sums(outputs_TKM=r.expert_outputs_TKM, kept_TK=r.kept_TK, weight_T=valid_T)
        values.append(torch.stack([(overlap_T.double() * weight_T).sum(), weight_T.sum(), norm_sum, slots]))
    stacked = torch.stack(values).t().reshape(-1)  # [overlap sum_0 .. sum_L-1, count_0 .. count_L-1, ...]
    return stacked if sums is None else sums + stacked


def _gather(sample: _Sample, world: int) -> tuple[list, list]:
    """Every rank's sample on every rank, cut to the `size` smallest keys overall (= one process's sample)."""
    parts = [(sample.keys, sample.features, sample.labels)]
    if world > 1:  # collective: every rank takes part, also one without a sampled token
        parts = [None] * world
        dist.all_gather_object(parts, (sample.keys, sample.features, sample.labels))
    parts = [p for p in parts if p[1][0] is not None]
    if not parts:
        return [torch.empty(0, 0)] * len(sample.features), [torch.empty(0, dtype=torch.long)] * len(sample.features)
    order = torch.argsort(torch.cat([p[0] for p in parts]))[:sample.size]
    features = [torch.cat([p[1][layer] for p in parts])[order] for layer in range(len(sample.features))]
    labels = [torch.cat([p[2][layer] for p in parts])[order] for layer in range(len(sample.labels))]
    return features, labels
