"""Router-permutation delta-PPL (methods spec, section 7; paper 2, Fig. 3).

For one MoE layer at a time, the rows of its router ([E, M], one row per expert) are permuted together
with every per-expert selection bias the layer carries (Loss-Free Balancing's bias, DeepSeek-V3's
`e_score_correction_bias`: the layer's `router_tensors()`), and the experts left as they are: a token is now sent to other experts than it was trained
with. delta-PPL = PPL(permuted) - PPL, per domain and overall, averaged over seeds. Large = the layer's
experts are not interchangeable; ~0 = they are. The whole-model variant permutes every layer at once.

Permutations are derangements (no expert keeps its router row; a random permutation might leave most
rows in place and dilute the measurement), drawn from `torch.Generator().manual_seed(seed)`, one per
layer in depth order; the all-layers variant applies the same per-layer draws together. The weights
are restored bit-exactly afterwards (the original is kept and copied back).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from ds_moe_div.evaluation.heldout import LossSummary
from ds_moe_div.evaluation.report import mean_std


def derangement(num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of range(num_experts) with no fixed point (rejection sampling)."""
    if num_experts < 2:
        raise ValueError("a derangement needs at least 2 experts")
    while True:
        perm = torch.randperm(num_experts, generator=generator)
        if not (perm == torch.arange(num_experts)).any():
            return perm


def draw_permutations(num_layers: int, num_experts: int, seeds: Sequence[int]) -> list[list[torch.Tensor]]:
    """perms[s][l]: the derangement of layer l for seed s."""
    out = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        out.append([derangement(num_experts, gen) for _ in range(num_layers)])
    return out


@contextlib.contextmanager
def permuted_routers(layers: Sequence, perms: Sequence[torch.Tensor | None]):
    """Within the block, router row j of layers[i] (and entry j of each selection bias) holds what row
    perms[i][j] held (None: untouched)."""
    if len(layers) != len(perms):
        raise ValueError(f"{len(perms)} permutations for {len(layers)} layers")
    saved = []
    try:
        with torch.no_grad():
            for layer, perm in zip(layers, perms):
                if perm is None:
                    continue
                for tensor in layer.router_tensors():  # native gate (moe.py) or AutoEP router (hf/autoep.py)
                    original = tensor.detach().clone()
                    saved.append((tensor, original))
                    tensor.copy_(original[perm.to(tensor.device)])
        yield
    finally:
        with torch.no_grad():
            for tensor, original in saved:
                tensor.copy_(original)


def _spread(values) -> dict:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def summarize_deltas(base: LossSummary, permuted: Sequence[LossSummary]) -> dict:
    """{"mean", "std" (sample std over seeds), "per_seed", "per_domain": {name: {"mean", "std"}}}."""
    per_seed = [_delta(p.ppl, base.ppl) for p in permuted]
    per_domain = {name: _spread([_delta(p.per_domain[name].ppl, dom.ppl) for p in permuted])
                  for name, dom in base.per_domain.items()}
    return {**_spread(per_seed), "per_seed": per_seed, "per_domain": per_domain}


def router_permutation_delta(run_pass: Callable[[], LossSummary], layers: Sequence, layer_ids: Sequence[int],
                             base: LossSummary, perms: Sequence[Sequence[torch.Tensor]],
                             progress: Callable[[str], None] = lambda _: None) -> dict:
    """delta-PPL of each layer (`layer_<id>`) and of all layers at once (`all_layers`).

    run_pass() evaluates the held-out batches and returns their (reduced) LossSummary; it runs
    (num_layers + 1) * len(perms) times. perms[s][l] as from `draw_permutations`.
    """
    result = {}
    for i, lid in enumerate(layer_ids):
        permuted = []
        for seed_perms in perms:
            only = [seed_perms[i] if j == i else None for j in range(len(layers))]
            progress(f"layer {lid}")
            with permuted_routers(layers, only):
                permuted.append(run_pass())
        result[f"layer_{lid}"] = summarize_deltas(base, permuted)
    permuted = []
    for seed_perms in perms:
        progress("all layers")
        with permuted_routers(layers, list(seed_perms)):
            permuted.append(run_pass())
    result["all_layers"] = summarize_deltas(base, permuted)
    return result
