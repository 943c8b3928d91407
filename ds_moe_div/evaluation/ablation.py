"""Expert ablation (a causal test of specialisation) and keep-k evaluation, through a routing hook.

    with masked_experts(layers, [[1, 3], [0, 2]]):   # layer i never selects these experts
        summary = run_pass()
    with keep_k(layers, 1):                          # every token goes to its top-1 expert only
        summary = run_pass()
    result = expert_ablation(run_pass, layers, layer_ids, frequencies, base, top_m=2)
    result = keep_k_evaluation(run_pass, layers, base)

Masking sets the logits of the masked experts to -inf in our gate (`RoutingGate.routing_override`; on
imported models the AutoEP layer's, which also blocks them with a -inf selection bias) before
DeepSpeed's top-k: the model behaves as if those experts did not exist (router probabilities are the
softmax over the remaining experts, each token takes its top-k among them); no weight is edited, and the
previous override is restored on exit. Ablation: for each domain d, mask in every MoE layer the top_m
experts that d's tokens selected most often (held-out top-k selection frequency of the unmasked pass),
all layers at once, and measure the PPL of every domain. Reported per masked domain: the PPL of each
domain, its change, the relative change rel = PPL_masked / PPL - 1, `own` (rel of d), `others` (mean rel
over the other domains) and `specificity` = own - others (> 0: d's experts matter more to d than to the
rest: specialisation). Keep-k: the same held-out pass with top-k' for k' = 1 .. k-1 (DeepSpeed's
topkgating: the k' highest-probability experts, weights renormalised over them); k' = k is the model.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from ds_moe_div.evaluation.heldout import LossSummary


class RoutingOverride:
    """(logits_TE, k) -> (logits with masked experts at -inf, k' or k); installed on RoutingGate."""

    def __init__(self, masked: Sequence[int] = (), k: int | None = None, num_experts: int | None = None) -> None:
        self.masked, self.k = sorted({int(e) for e in masked}), k
        if num_experts is not None and any(not 0 <= e < num_experts for e in self.masked):
            raise ValueError(f"masked experts {self.masked} outside 0..{num_experts - 1}")

    def __call__(self, logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
        if self.masked:
            logits_TE = logits_TE.clone()
            logits_TE[:, self.masked] = float("-inf")
        return logits_TE, k if self.k is None else self.k


@contextlib.contextmanager
def routing_overrides(layers: Sequence, overrides: Sequence[RoutingOverride | None]):
    """Install one override per layer (None: none) for the block; the previous ones come back after."""
    if len(layers) != len(overrides):
        raise ValueError(f"{len(overrides)} overrides for {len(layers)} layers")
    saved = [_router(layer).routing_override for layer in layers]
    try:
        for layer, override in zip(layers, overrides):
            _router(layer).routing_override = override
        yield
    finally:
        for layer, previous in zip(layers, saved):
            _router(layer).routing_override = previous


def _router(layer):
    """Where a layer's routing override lives: the native layer's RoutingGate, or the AutoEP layer itself
    (ds_moe_div/hf/autoep.py; AutoEP's presets alias its router as `gate`, which has no override)."""
    gate = getattr(layer, "gate", None)
    return gate if hasattr(gate, "routing_override") else layer


def _num_experts_k(layer) -> tuple[int, int]:
    gate = getattr(layer, "gate", None)
    if hasattr(gate, "wg"):  # the native RoutingGate
        return gate.wg.weight.shape[0], gate.k
    return layer.num_experts, layer.router.top_k


def masked_experts(layers: Sequence, masked: Sequence[Sequence[int]]):
    """masked[i]: experts layer i may not select (at least its k experts must remain)."""
    for layer, experts in zip(layers, masked):
        num_experts, k = _num_experts_k(layer)
        if num_experts - len(set(experts)) < k:
            raise ValueError(f"masking {len(set(experts))} of {num_experts} experts leaves fewer than k={k}")
    return routing_overrides(layers, [RoutingOverride(m, num_experts=_num_experts_k(layer)[0])
                                      for layer, m in zip(layers, masked)])


def keep_k(layers: Sequence, k: int):
    """Every layer routes each token to its top-k experts (1 <= k <= the layer's own k)."""
    for layer in layers:
        if not 1 <= k <= _num_experts_k(layer)[1]:
            raise ValueError(f"keep-k needs 1 <= k' <= k = {_num_experts_k(layer)[1]}; got {k}")
    return routing_overrides(layers, [RoutingOverride(k=k) for _ in layers])


def top_experts(frequency_E: torch.Tensor, m: int) -> list[int]:
    """The m experts with the highest selection frequency (ties: lower id first); [] for a NaN row."""
    freq = torch.as_tensor(frequency_E, dtype=torch.float64)
    if torch.isnan(freq).any():
        return []
    order = sorted(range(len(freq)), key=lambda e: (-float(freq[e]), e))
    return sorted(order[:m])


def _changes(summary: LossSummary, base: LossSummary) -> dict:
    per_domain = {}
    for name, dom in base.per_domain.items():
        after = summary.per_domain[name].ppl
        ok = after is not None and dom.ppl is not None
        per_domain[name] = {"ppl": after, "delta_ppl": after - dom.ppl if ok else None,
                            "rel": after / dom.ppl - 1 if ok else None}
    ok = summary.ppl is not None and base.ppl is not None
    return {"ppl": summary.ppl, "delta_ppl": summary.ppl - base.ppl if ok else None,
            "rel": summary.ppl / base.ppl - 1 if ok else None, "per_domain": per_domain}


def default_top_m(num_experts: int, k: int) -> int:
    """k experts (what one token uses), fewer when masking k would leave under k experts; 0 = impossible."""
    return max(0, min(k, num_experts - k))


def expert_ablation(run_pass: Callable[[], LossSummary], layers: Sequence, layer_ids: Sequence[int],
                    frequencies: Sequence[torch.Tensor], base: LossSummary, *, top_m: int,
                    progress: Callable[[str], None] = lambda _: None) -> dict:
    """{"top_m", "masked": {domain: {"experts": {layer_<id>: [...]}, ppl, delta_ppl, rel, per_domain,
    own, others, specificity}}, "specificity_mean"}. frequencies[i]: [D, E] selection shares of layer i
    (rows in base.per_domain order). One held-out pass per domain with tokens."""
    names = list(base.per_domain)
    result = {}
    for d, name in enumerate(names):
        experts = [top_experts(freq[d], top_m) for freq in frequencies]
        if not all(experts):
            continue  # no held-out token of this domain: nothing to mask by
        progress(f"mask {name}")
        with masked_experts(layers, experts):
            entry = _changes(run_pass(), base)
        rels = {n: entry["per_domain"][n]["rel"] for n in names}
        others = [r for n, r in rels.items() if n != name and r is not None]
        own = rels[name]
        entry.update(experts={f"layer_{lid}": e for lid, e in zip(layer_ids, experts)}, own=own,
                     others=sum(others) / len(others) if others else None)
        entry["specificity"] = None if own is None or entry["others"] is None else own - entry["others"]
        result[name] = entry
    defined = [e["specificity"] for e in result.values() if e["specificity"] is not None]
    return {"top_m": top_m, "masked": result,
            "specificity_mean": sum(defined) / len(defined) if defined else None}


def keep_k_evaluation(run_pass: Callable[[], LossSummary], layers: Sequence, base: LossSummary,
                      progress: Callable[[str], None] = lambda _: None) -> dict:
    """{"k=<k'>": changes against the model} for k' = 1 .. k-1 ({} when k = 1)."""
    k = min(_num_experts_k(layer)[1] for layer in layers)
    out = {}
    for kept in range(1, k):
        progress(f"keep k={kept}")
        with keep_k(layers, kept):
            out[f"k={kept}"] = _changes(run_pass(), base)
    return out
