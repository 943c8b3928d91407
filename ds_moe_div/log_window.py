"""Accumulate training scalars over one logging window; reduce them across ranks once, at flush.

Values stay on the device as detached tensors between logging steps (no host sync per micro-step);
`flush` stacks the window means into one tensor and all-reduces it once, so logged losses are the
means over every rank's micro-batches, and tokens/s counts every rank's non-padding tokens.
"""
from __future__ import annotations

import time

import torch

from ds_moe_div import objectives as obj
from ds_moe_div.distributed import all_reduce_sum


class LogWindow:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_steps = 0
        self.started = time.perf_counter()
        self.last = None

    def add(self, losses, out, batch) -> None:
        values = {"train/lm_loss": losses.lm, "train/loss": losses.total, "train/tokens": (batch["domain_ids"] >= 0).sum()}
        layer_ids = [r.layer_id for r in out.routing]
        for name, value in losses.unscaled.items():
            values[f"moe/{name}_unscaled"] = value
            values[f"moe/{name}"] = losses.scaled[name]
            for lid, v in zip(layer_ids, losses.per_layer[name]):
                values[f"moe/{name}/layer_{lid}"] = v
        for key, value in values.items():
            value = value.detach().double()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.micro_steps += 1
        self.last = (losses, out, batch)

    def flush(self, state) -> dict[str, float]:
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in keys]).cpu()
        all_reduce_sum(stacked)
        world = state.info.world_size
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        scalars = {k: float(v) / (self.micro_steps * world) for k, v in zip(keys, stacked)}
        scalars["train/tokens_per_s"] = scalars.pop("train/tokens") * self.micro_steps * world / elapsed
        scalars["train/lr"] = state.engine.get_lr()[0]
        grad_norm = state.engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        losses, out, batch = self.last
        for name, coef in losses.coefs.items():
            scalars[f"moe/{name}_coef"] = coef
        if losses.divergence_domains_present is not None:
            scalars["moe/divergence_domains_present"] = losses.divergence_domains_present
        scalars.update(routing_snapshot(out, batch["domain_ids"], state.cfg.objectives.log_decomposition))
        self.reset()
        return scalars


def routing_snapshot(out, domain_ids_BS, decomposition: bool) -> dict[str, float]:
    """Routing facts of this rank's last micro-batch: capacity drops, load imbalance, and the
    Proposition-1 split of routing divergence into inter- and intra-domain parts."""
    scalars = {}
    mask_T = domain_ids_BS.flatten() >= 0
    for r in out.routing:
        tag = f"layer_{r.layer_id}"
        slots = r.kept_TK[mask_T]
        scalars[f"routing/dropped_fraction/{tag}"] = float(1.0 - slots.float().mean()) if slots.numel() else 0.0
        load = r.expert_counts(mask_T)
        scalars[f"routing/max_load_over_mean/{tag}"] = float(load.max() / load.mean().clamp(min=1e-9))
        if decomposition:
            with torch.no_grad():
                means, domains, weights = obj.domain_sequence_means(probs_TE=r.probs_TE.detach(),
                                                                    domain_ids_BS=domain_ids_BS)
                total, inter, intra = obj.divergence_decomposition(seq_means_NE=means, seq_domains_N=domains,
                                                                   seq_weights_N=weights)
            scalars[f"routing/d_total/{tag}"] = float(total)
            scalars[f"routing/d_inter/{tag}"] = float(inter)
            scalars[f"routing/d_intra/{tag}"] = float(intra)
    return scalars
