"""Compose the training objective: `loss = lm + sum(coef * term)`, each term reduced over MoE layers.

The composer turns a `ModelOutput` and the batch's domain ids into a `LossBreakdown` (total, each term
unscaled and scaled, per-layer values, per-term extras). Terms are the rows of `OBJECTIVES`, one per
section of `ObjectivesConfig` and under the same name (`balance`, `z_loss`, `divergence`,
`orthogonality`, `variance`; TensorBoard tags `moe/<name>...`): the loss function, the inputs it reads,
the batch its statistics cover. A coefficient of 0 skips its term's computation entirely; a nonzero
coefficient whose inputs the batch lacks (domain ids) is an error. `auto` coefficients (Guo et al.'s
released code) are calibrated once, on the first batch whose term is non-zero (over all ranks), to the
power of ten that puts the scaled term near its target; until then (a term that is exactly 0, e.g.
orthogonality with k = 1 or variance under uniform routing) the coefficient is the target itself, with a
warning. The calibrated values are part of the composer's state (saved in checkpoints).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ds_moe_div import objectives as obj
from ds_moe_div.config import ObjectivesConfig
from ds_moe_div.model import ModelOutput
from ds_moe_div.routing import RoutingRecord


@dataclass
class LossBreakdown:
    total: torch.Tensor
    lm: torch.Tensor
    unscaled: dict[str, torch.Tensor] = field(default_factory=dict)  # layer-reduced term values
    scaled: dict[str, torch.Tensor] = field(default_factory=dict)  # coef * unscaled
    per_layer: dict[str, torch.Tensor] = field(default_factory=dict)  # [L] unscaled values
    coefs: dict[str, float] = field(default_factory=dict)
    # {term: {name: 0-d tensor}}: diagnostics a term reports besides its value, read at logging time
    # (no host sync here), logged as moe/<term>_<name>.
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class TermInputs:
    """What a term's loss may read: this micro-batch's routing records, labels and the process groups."""
    records: tuple[RoutingRecord, ...]
    domain_ids_BS: torch.Tensor | None
    mask_T: torch.Tensor | None  # True for labelled (non-padding) tokens; None: all
    num_domains: int
    divergence_group: object = None
    world_group: object = None

    def stacked(self, name: str) -> torch.Tensor:
        """Field `name` of every layer's record, stacked on a leading L dim."""
        return torch.stack([getattr(r, name) for r in self.records])


# A term's loss: (its config section, inputs) -> per-layer values [L] and its extras.
LossFn = Callable[[object, TermInputs], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class ObjectiveSpec:
    loss: LossFn
    inputs: tuple[str, ...]  # RoutingRecord fields and batch inputs ("domain_ids_BS") it reads
    scope: str  # the batch its statistics cover; "config: ..." when the section's `scope` chooses


def _balance(c, x: TermInputs):
    if c.scope == "micro_batch":  # DeepSpeed's own l_aux, as its gate returned it
        return x.stacked("l_aux"), {}
    if c.scope == "sequence":
        return _sequence_balance(x), {}
    return obj.global_load_balance_loss(probs_LTE=x.stacked("probs_TE"), indices_LTK=x.stacked("indices_TK"),
                                        mask_T=x.mask_T, group=x.world_group), {}


def _sequence_balance(x: TermInputs) -> torch.Tensor:
    if x.domain_ids_BS is None:
        raise ValueError("objectives.balance.scope='sequence' needs the batch's [B, S] layout (domain_ids); "
                         "pass domain_ids_BS or use scope micro_batch")
    shape = (*x.domain_ids_BS.shape, -1)
    mask_BS = x.mask_T.view(x.domain_ids_BS.shape)
    return torch.stack([obj.sequence_balance_loss(probs_BSE=r.probs_TE.view(shape), indices_BSK=r.indices_TK.view(shape),
                                                  mask_BS=mask_BS) for r in x.records])


def _z_loss(c, x: TermInputs):
    return torch.stack([obj.router_z_loss(logits_TE=r.logits_TE, mask_T=x.mask_T) for r in x.records]), {}


def _divergence(c, x: TermInputs):
    sums_LDE, counts_D = obj.domain_routing_sums(probs_LTE=x.stacked("probs_TE"), domain_ids_BS=x.domain_ids_BS,
                                                 num_domains=x.num_domains, average=c.average)
    weights_D = None
    if c.form == "generalized" and c.average == "sequence" and c.domain_weights == "tokens":
        tokens_D = obj.domain_token_counts(domain_ids_BS=x.domain_ids_BS, num_domains=x.num_domains,
                                           dtype=counts_D.dtype)
        q_LDE, counts_D, weights_D = obj.global_domain_means_and_weights(sums_LDE=sums_LDE, counts_D=counts_D,
                                                                         weights_D=tokens_D, group=x.divergence_group)
    else:
        q_LDE, counts_D = obj.global_domain_means(sums_LDE=sums_LDE, counts_D=counts_D, group=x.divergence_group)
    loss_L, _, present = obj.expert_divergence_loss(q_LDE=q_LDE, counts_D=counts_D, form=c.form, eps=c.eps,
                                                    weights_D=weights_D)
    return loss_L, {"domains_present": present}


def _orthogonality(c, x: TermInputs):
    return torch.stack([obj.orthogonality_loss(outputs_TKM=r.expert_outputs_TKM, kept_TK=r.kept_TK, mask_T=x.mask_T,
                                               form=c.form, eps=c.eps, reduction=c.reduction)
                        for r in x.records]), {}


def _variance(c, x: TermInputs):
    return torch.stack([
        obj.variance_loss(scores_TE=obj.topk_score_matrix(indices_TK=r.indices_TK, weights_TK=r.weights_TK,
                                                          kept_TK=r.kept_TK, num_experts=r.num_experts),
                          probs_TE=r.probs_TE, mask_T=x.mask_T, form=c.form, reduction=c.reduction)
        for r in x.records]), {}


# Name -> spec, in logging order. Each name is a section of ObjectivesConfig.
OBJECTIVES: dict[str, ObjectiveSpec] = {
    "balance": ObjectiveSpec(_balance, ("l_aux", "probs_TE", "indices_TK"),
                             "config: micro_batch (DeepSpeed's l_aux), global_batch (one all-reduce) or sequence"),
    "z_loss": ObjectiveSpec(_z_loss, ("logits_TE",), "micro_batch"),
    "divergence": ObjectiveSpec(_divergence, ("probs_TE", "domain_ids_BS"),
                                "config: global, expert_parallel or micro_batch domain means"),
    "orthogonality": ObjectiveSpec(_orthogonality, ("expert_outputs_TKM", "kept_TK"), "micro_batch"),
    "variance": ObjectiveSpec(_variance, ("indices_TK", "weights_TK", "kept_TK", "probs_TE"), "micro_batch"),
}
TERMS = tuple(OBJECTIVES)


class ObjectiveComposer:
    def __init__(self, cfg: ObjectivesConfig, *, num_domains: int, divergence_group=None, world_group=None):
        """`divergence_group`: where per-domain routing sums are all-reduced (None = this micro-batch only).
        `world_group`: the data-parallel group over which the router's gradient is averaged: `auto`
        coefficients are agreed over it once, and the global-batch load balance counts over it."""
        self.cfg = cfg
        self.num_domains = num_domains
        self.divergence_group = divergence_group
        self.world_group = world_group
        self.calibrated: dict[str, float] = {}
        self._warned: set[str] = set()

    def active(self) -> list[str]:
        """The terms whose coefficient is nonzero (their computation runs), in logging order."""
        return [name for name in TERMS if self._base_coef(name) != 0.0]

    @property
    def needs_expert_outputs(self) -> bool:
        return any("expert_outputs_TKM" in OBJECTIVES[name].inputs for name in self.active())

    def _base_coef(self, name: str) -> float:
        coef = getattr(self.cfg, name).coef
        if coef == "auto":  # until a batch with a non-zero term calibrates it: the target itself
            return self.calibrated.get(name, getattr(self.cfg, name).auto_target)
        return float(coef)

    def _pending(self, name: str) -> bool:
        """An `auto` coefficient that no batch has calibrated yet."""
        return getattr(self.cfg, name).coef == "auto" and name not in self.calibrated

    def coefficient(self, name: str, step: int) -> float:
        """Coefficient at optimizer step `step` (0-based), with its linear warm-up."""
        warmup = getattr(self.cfg, name).warmup_steps
        ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        return self._base_coef(name) * ramp

    def __call__(self, out: ModelOutput, *, domain_ids_BS: torch.Tensor | None, step: int) -> LossBreakdown:
        mask_T = None if domain_ids_BS is None else (domain_ids_BS.flatten() >= 0)
        inputs = TermInputs(records=tuple(out.routing), domain_ids_BS=domain_ids_BS, mask_T=mask_T,
                            num_domains=self.num_domains, divergence_group=self.divergence_group,
                            world_group=self.world_group)
        result = LossBreakdown(total=out.lm_loss, lm=out.lm_loss)
        for name in self.active():
            spec = OBJECTIVES[name]
            if "domain_ids_BS" in spec.inputs and domain_ids_BS is None:
                raise ValueError(f"objectives.{name}.coef is nonzero but the batch has no domain_ids: the {name} "
                                 f"loss needs a domain label per token (set data.domain_column) or set its coef to 0")
            per_layer, extras = spec.loss(getattr(self.cfg, name), inputs)
            value = per_layer.mean() if self.cfg.layer_reduction == "mean" else per_layer.sum()
            if self._pending(name):
                self._calibrate(name, value)
            coef = self.coefficient(name, step)
            result.per_layer[name] = per_layer
            result.unscaled[name] = value
            result.scaled[name] = coef * value
            result.coefs[name] = coef
            if extras:
                result.extras[name] = extras
            result.total = result.total + coef * value
        return result

    def _calibrate(self, name: str, value: torch.Tensor) -> None:
        """Pick the power of ten that brings |coef * value| near the term's target, agreed across ranks."""
        magnitude = value.detach().abs().reshape(1).double()
        if self.world_group is not None and dist.is_initialized():
            dist.all_reduce(magnitude, group=self.world_group)
            magnitude /= dist.get_world_size(self.world_group)
        target = getattr(self.cfg, name).auto_target
        m = float(magnitude)
        if m > 0.0 and math.isfinite(m):
            self.calibrated[name] = 10.0 ** round(math.log10(target / m))
        elif name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"objectives.{name}.coef=auto: the term is {m} on this batch, so it cannot be calibrated "
                          f"yet; its coefficient is the target {target} until a batch with a non-zero term "
                          f"calibrates it", stacklevel=3)

    def state_dict(self) -> dict:
        return {"calibrated": dict(self.calibrated)}

    def load_state_dict(self, state: dict) -> None:
        self.calibrated = dict(state.get("calibrated", {}))
