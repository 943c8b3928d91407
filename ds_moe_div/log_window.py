"""Accumulate training scalars over one logging window; reduce them across ranks once, at flush.

Values stay on the device as detached tensors between logging steps (no host sync per micro-step);
`flush` stacks the window means into one tensor and all-reduces it once, so logged losses are the
means over every rank's micro-batches, and tokens/s counts every rank's non-padding tokens.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ds_moe_div.distributed import all_reduce_sum
from ds_moe_div.metrics.accumulator import RoutingAccumulator, RoutingStats


class LogWindow:
    def __init__(self, routing: RoutingAccumulator | None = None, domain_names: Sequence[str] = (), *,
                 expert_overlap: bool = False) -> None:
        """`routing`: accumulates domain x expert statistics over the window (None: losses only).
        `expert_overlap`: ask the model for its selected experts' outputs every micro-step so that the
        window also measures Expert Overlap and the experts' mean output norm (they are collected anyway when
        the orthogonality loss is on)."""
        self.routing = routing
        self.domain_names = tuple(domain_names)
        self.needs_expert_outputs = expert_overlap and routing is not None
        self.reset()

    def end_step(self) -> None:
        """An optimizer step ended: the routing window records its global-batch load (MaxVio_global)."""
        if self.routing is not None:
            self.routing.end_step()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_steps = 0
        self.started = time.perf_counter()
        self.last = None
        self.routing_stats: RoutingStats | None = None
        if self.routing is not None:
            self.routing.reset()

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
        if self.routing is not None:
            with torch.no_grad():
                self.routing.add(out.routing, batch["domain_ids"])
        self.micro_steps += 1
        self.last = losses

    def flush(self, *, world_size: int, lr: float, grad_norm: float | None = None) -> dict[str, float]:
        """Window means over all `world_size` ranks (one all-reduce for losses, one for routing counts),
        with the optimizer's current `lr` and last `grad_norm` (None: not logged)."""
        keys = sorted(self.sums)
        # reduced where the values live (NCCL reduces no CPU tensor), then read once
        stacked = all_reduce_sum(torch.stack([self.sums[k] for k in keys])).cpu()
        world = world_size
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        scalars = {k: float(v) / (self.micro_steps * world) for k, v in zip(keys, stacked)}
        scalars["train/tokens_per_s"] = scalars.pop("train/tokens") * self.micro_steps * world / elapsed
        scalars["train/lr"] = lr
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        for name, coef in self.last.coefs.items():
            scalars[f"moe/{name}_coef"] = coef
        for name, extras in self.last.extras.items():
            scalars.update({f"moe/{name}_{key}": float(value) for key, value in extras.items()})
        routing_stats = self.routing.reduce() if self.routing is not None else None
        if routing_stats is not None:
            scalars.update(routing_stats.scalars(self.domain_names))
        self.reset()
        self.routing_stats = routing_stats
        return scalars
