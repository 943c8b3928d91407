"""Compose the training objective: `loss = lm + sum(coef * term)`, each term reduced over MoE layers.

The composer turns a `ModelOutput` and the batch's domain ids into a `LossBreakdown` (total, each term
unscaled and scaled, per-layer values). A coefficient of 0 skips its term's computation entirely; a
nonzero divergence coefficient without domain ids is an error. `auto` coefficients (Guo et al.'s
released code) are calibrated once, on the first batch, to the power of ten that puts the scaled term
near its target; the calibrated values are part of the composer's state (saved in checkpoints).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ds_moe_div import objectives as obj
from ds_moe_div.config import ObjectivesConfig
from ds_moe_div.model import ModelOutput

TERMS = ("l_aux", "z_loss", "divergence", "orthogonality", "variance")


@dataclass
class LossBreakdown:
    total: torch.Tensor
    lm: torch.Tensor
    unscaled: dict[str, torch.Tensor] = field(default_factory=dict)  # layer-reduced term values
    scaled: dict[str, torch.Tensor] = field(default_factory=dict)  # coef * unscaled
    per_layer: dict[str, torch.Tensor] = field(default_factory=dict)  # [L] unscaled values
    coefs: dict[str, float] = field(default_factory=dict)
    divergence_domains_present: torch.Tensor | None = None  # 0-d, read at logging time (no sync here)


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

    @property
    def needs_expert_outputs(self) -> bool:
        return self._base_coef("orthogonality") != 0.0

    def _term_cfg(self, name: str):
        return {"l_aux": self.cfg.balance, "z_loss": self.cfg.z_loss, "divergence": self.cfg.divergence,
                "orthogonality": self.cfg.orthogonality, "variance": self.cfg.variance}[name]

    def _base_coef(self, name: str) -> float:
        coef = self._term_cfg(name).coef
        if coef == "auto":
            return self.calibrated.get(name, math.nan)  # nan: not calibrated yet, but active
        return float(coef)

    def coefficient(self, name: str, step: int) -> float:
        """Coefficient at optimizer step `step` (0-based), with its linear warm-up."""
        warmup = self._term_cfg(name).warmup_steps
        ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        return self._base_coef(name) * ramp

    def __call__(self, out: ModelOutput, *, domain_ids_BS: torch.Tensor | None, step: int) -> LossBreakdown:
        mask_T = None if domain_ids_BS is None else (domain_ids_BS.flatten() >= 0)
        result = LossBreakdown(total=out.lm_loss, lm=out.lm_loss)
        for name in TERMS:
            if self._base_coef(name) == 0.0:
                continue
            per_layer = self._per_layer(name, out, domain_ids_BS, mask_T, result)
            value = per_layer.mean() if self.cfg.layer_reduction == "mean" else per_layer.sum()
            if math.isnan(self._base_coef(name)):
                self._calibrate(name, value)
            coef = self.coefficient(name, step)
            result.per_layer[name] = per_layer
            result.unscaled[name] = value
            result.scaled[name] = coef * value
            result.coefs[name] = coef
            result.total = result.total + coef * value
        return result

    def _per_layer(self, name, out, domain_ids_BS, mask_T, result) -> torch.Tensor:
        records = out.routing
        if name == "l_aux":
            if self.cfg.balance.scope == "micro_batch":
                return torch.stack([r.l_aux for r in records])
            return obj.global_load_balance_loss(probs_LTE=torch.stack([r.probs_TE for r in records]),
                                                indices_LTK=torch.stack([r.indices_TK for r in records]),
                                                mask_T=mask_T, group=self.world_group)
        if name == "z_loss":
            return torch.stack([obj.router_z_loss(logits_TE=r.logits_TE, mask_T=mask_T) for r in records])
        if name == "divergence":
            return self._divergence(records, domain_ids_BS, result)
        if name == "orthogonality":
            c = self.cfg.orthogonality
            return torch.stack([obj.orthogonality_loss(outputs_TKD=r.expert_outputs_TKM, kept_TK=r.kept_TK,
                                                       mask_T=mask_T, form=c.form, eps=c.eps, reduction=c.reduction)
                                for r in records])
        c = self.cfg.variance
        return torch.stack([
            obj.variance_loss(scores_TE=obj.topk_score_matrix(indices_TK=r.indices_TK, weights_TK=r.weights_TK,
                                                              kept_TK=r.kept_TK, num_experts=r.num_experts),
                              probs_TE=r.probs_TE, mask_T=mask_T, form=c.form, reduction=c.reduction)
            for r in records])

    def _divergence(self, records, domain_ids_BS, result) -> torch.Tensor:
        if domain_ids_BS is None:
            raise ValueError("objectives.divergence.coef is nonzero but the batch has no domain_ids: the divergence "
                             "loss needs a domain label per token (set data.domain_column) or set its coef to 0")
        c = self.cfg.divergence
        sums_LDE, counts_D = obj.domain_routing_sums(probs_LTE=torch.stack([r.probs_TE for r in records]),
                                                     domain_ids_BS=domain_ids_BS, num_domains=self.num_domains,
                                                     average=c.average)
        q_LDE, counts_D = obj.global_domain_means(sums_LDE=sums_LDE, counts_D=counts_D, group=self.divergence_group)
        loss_L, _, present = obj.expert_divergence_loss(q_LDE=q_LDE, counts_D=counts_D, form=c.form, eps=c.eps)
        result.divergence_domains_present = present
        return loss_L

    def _calibrate(self, name: str, value: torch.Tensor) -> None:
        """Pick the power of ten that brings |coef * value| near the term's target, agreed across ranks."""
        magnitude = value.detach().abs().reshape(1).double()
        if self.world_group is not None and dist.is_initialized():
            dist.all_reduce(magnitude, group=self.world_group)
            magnitude /= dist.get_world_size(self.world_group)
        target = self._term_cfg(name).auto_target
        m = float(magnitude)
        self.calibrated[name] = 0.0 if m == 0.0 else 10.0 ** round(math.log10(target / m))

    def state_dict(self) -> dict:
        return {"calibrated": dict(self.calibrated)}

    def load_state_dict(self, state: dict) -> None:
        self.calibrated = dict(state.get("calibrated", {}))
