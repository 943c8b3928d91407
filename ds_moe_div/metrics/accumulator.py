"""Accumulate routing counts over a window on the device; reduce them once; turn them into scalars.

    .venv/bin/python -m pytest tests/test_metrics_accumulator.py tests/test_metrics_distributed.py -q

Usage (the trainer's logging window or an evaluation pass)::

    acc = RoutingAccumulator(num_layers=L, num_domains=D, num_experts=E, k=k)
    acc.add(out.routing, batch["domain_ids"])       # every micro-step: local, no host sync, no comms
    stats = acc.reduce(group)                       # ONE all-reduce of one float64 buffer
    monitor.scalars(stats.scalars(domain_names), step); acc.reset()

Padding tokens (domain -1) are excluded from every counter. They are routed and do take capacity
(which shows up as drops of labelled tokens), but the LM loss ignores them and their routing says
nothing about specialisation; `padding_tokens` counts them so the padding fraction stays visible.
Every counter lives in one contiguous float64 buffer (exact integer counts up to 2**53), so the
reduce needs no packing.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ds_moe_div.distributed import all_reduce_sum
from ds_moe_div.metrics import paper
from ds_moe_div.metrics import routing as rm
from ds_moe_div.metrics.output_norm import output_norm_sums
from ds_moe_div.routing import RoutingRecord

DT = torch.float64


@dataclass(frozen=True)
class RoutingStats:
    """Global (reduced) routing counters of one window, on the CPU; see `ds_moe_div.metrics.routing`."""

    select_LDE: Tensor
    kept_LDE: Tensor
    prob_sum_LDE: Tensor
    unit_entropy_sum_LD: Tensor
    tokens_D: Tensor
    padding_tokens: float
    micro_batches: float
    layer_ids: tuple[int, ...]
    k: int
    # The paper metrics' counters (metrics/paper.py): sum over tokens of var_j p[t, j]; sum and count of
    # the per-token Expert Overlap (only where expert outputs were collected); co-selection counts; and
    # the load [L, E] of each optimizer step that ended in the window (`end_step`), [G, L, E].
    route_var_sum_L: Tensor | None = None
    overlap_sum_L: Tensor | None = None
    overlap_tokens_L: Tensor | None = None
    coselect_LEE: Tensor | None = None
    step_load_GLE: Tensor | None = None
    # Sum of the selected experts' output norms ||y[t, k]|| and count of (token, kept slot) pairs, per
    # layer (metrics/output_norm.py; zero counts where expert outputs were not collected).
    output_norm_sum_L: Tensor | None = None
    output_norm_slots_L: Tensor | None = None

    def paper_per_layer(self) -> dict[str, Tensor]:
        """The orthogonality paper's metrics per layer [L] (docs/METRICS.md): `max_violation_global` =
        mean over the window's optimizer steps of MaxVio over each step's global batch (over the whole
        window when no step ended in it, e.g. an evaluation); `routing_variance`; `expert_overlap`
        (NaN unless expert outputs were collected); `coselection_jaccard`."""
        if self.step_load_GLE is not None and self.step_load_GLE.shape[0] > 0:
            maxvio = paper.max_violation(load_E=self.step_load_GLE).mean(0)
        else:
            maxvio = paper.max_violation(load_E=self.select_LDE.sum(-2))
        tokens = self.tokens_D.sum()
        return {"max_violation_global": maxvio,
                "routing_variance": paper._ratio(self.route_var_sum_L, tokens),
                "expert_overlap": paper._ratio(self.overlap_sum_L, self.overlap_tokens_L),
                "coselection_jaccard": paper.coselection_jaccard(coselect_EE=self.coselect_LEE)}

    def per_layer(self) -> dict[str, Tensor]:
        """Every per-layer scalar metric as a [L] tensor (NaN where undefined on this window)."""
        s, t = self.select_LDE, self.tokens_D
        mi, mi_norm, mi_norm_min = rm.routing_mutual_information(select_DE=s)
        d_total, d_inter, d_intra = rm.window_divergence_decomposition(
            prob_sum_DE=self.prob_sum_LDE, tokens_D=t, unit_entropy_sum_D=self.unit_entropy_sum_LD)
        norm = {} if self.output_norm_sum_L is None else {
            "expert_output_norm": paper._ratio(self.output_norm_sum_L, self.output_norm_slots_L)}
        return {**(self.paper_per_layer() if self.route_var_sum_L is not None else {}), **norm,
            "mi": mi, "mi_normalized": mi_norm, "mi_normalized_min": mi_norm_min,
            "purity": rm.mean_expert_domain_purity(select_DE=s),
            "max_violation": rm.max_violation(select_DE=s, tokens_D=t, k=self.k),
            "load_cv": rm.load_cv(select_DE=s),
            "dead_experts": rm.dead_experts(select_DE=s),
            "dropped_fraction": rm.dropped_fraction(select_DE=s, kept_DE=self.kept_LDE),
            "d_total": d_total, "d_inter": d_inter, "d_intra": d_intra,
        }

    def scalars(self, domain_names: Sequence[str]) -> dict[str, float]:
        """Tags `routing/<metric>/layer_<id>` and `routing/<metric>/mean` (mean over layers), per-domain
        entropy as `routing/entropy/<domain>/layer_<id>` and `.../mean`, plus `routing/tokens`
        (labelled tokens in the window) and `routing/padding_fraction`. Undefined values (NaN) are left
        out rather than logged: e.g. the entropy of a domain absent from the window."""
        if len(domain_names) != self.tokens_D.shape[0]:
            raise ValueError(f"{len(domain_names)} domain names for {self.tokens_D.shape[0]} domains")
        out: dict[str, float] = {}
        for name, values_L in self.per_layer().items():
            _put_layers(out, f"routing/{name}", values_L, self.layer_ids)
        entropy_LD = rm.domain_routing_entropy_D(select_DE=self.select_LDE)
        for d, domain in enumerate(domain_names):
            _put_layers(out, f"routing/entropy/{domain}", entropy_LD[:, d], self.layer_ids)
        tokens = float(self.tokens_D.sum())
        out["routing/tokens"] = tokens
        if tokens + self.padding_tokens > 0:
            out["routing/padding_fraction"] = self.padding_tokens / (tokens + self.padding_tokens)
        return out

    def matrices(self) -> dict[str, Tensor]:
        """Per layer: `routing/frequency/layer_<id>` [D, E] (row-normalised selection frequency, the
        heatmap), `routing/mean_prob/layer_<id>` [D, E], `routing/load/layer_<id>` and
        `routing/kept_load/layer_<id>` [E] (tokens per expert before / after capacity, for histograms)."""
        freq_LDE = rm.domain_expert_frequency(select_DE=self.select_LDE)
        prob_LDE = rm.mean_router_prob_DE(prob_sum_DE=self.prob_sum_LDE, tokens_D=self.tokens_D)
        load_LE, kept_LE = rm.tokens_per_expert(select_DE=self.select_LDE, kept_DE=self.kept_LDE)
        out = {}
        for i, lid in enumerate(self.layer_ids):
            out[f"routing/frequency/layer_{lid}"] = freq_LDE[i]
            out[f"routing/mean_prob/layer_{lid}"] = prob_LDE[i]
            out[f"routing/load/layer_{lid}"] = load_LE[i]
            out[f"routing/kept_load/layer_{lid}"] = kept_LE[i]
        return out


def _put_layers(out: dict[str, float], prefix: str, values_L: Tensor, layer_ids: Sequence[int]) -> None:
    values = [float(v) for v in values_L]
    for lid, v in zip(layer_ids, values):
        if not math.isnan(v):
            out[f"{prefix}/layer_{lid}"] = v
    defined = [v for v in values if not math.isnan(v)]
    if defined:
        out[f"{prefix}/mean"] = sum(defined) / len(defined)


class RoutingAccumulator:
    """Local routing counters of `num_layers` MoE layers over a window of micro-batches."""

    def __init__(self, *, num_layers: int, num_domains: int, num_experts: int, k: int,
                 layer_ids: Sequence[int] | None = None, device: torch.device | str | None = None,
                 window_steps: int = 0, paper_metrics: bool = True) -> None:
        """layer_ids: the records' `layer_id`s, for the tags (default: taken from the first `add`, or
        0..L-1 on a rank that never adds). device: where the counters live (default: the device of
        the first records; give it when a rank may reduce before adding, e.g. under NCCL).
        window_steps: the most optimizer steps one window may end (`end_step`), for MaxVio_global per
        step (0: no per-step loads; MaxVio_global is then taken over the whole window).
        paper_metrics: False skips the paper metrics' counters (routing variance, Expert Overlap,
        co-selection, per-step loads), e.g. to measure what they cost; their scalars are then absent."""
        self.num_layers, self.num_domains, self.num_experts, self.k = num_layers, num_domains, num_experts, k
        self.layer_ids = None if layer_ids is None else tuple(layer_ids)
        self.window_steps, self.steps_ended, self.paper_metrics = window_steps, 0, paper_metrics
        L, D, E = num_layers, num_domains, num_experts
        self._shapes = {"select_LDE": (L, D, E), "kept_LDE": (L, D, E), "prob_sum_LDE": (L, D, E),
                        "unit_entropy_sum_LD": (L, D), "tokens_D": (D,), "padding_tokens": (),
                        "micro_batches": (), "output_norm_sum_L": (L,), "output_norm_slots_L": (L,)}
        if paper_metrics:  # in the same buffer: the same single all-reduce
            self._shapes.update({"route_var_sum_L": (L,), "overlap_sum_L": (L,), "overlap_tokens_L": (L,),
                                 "coselect_LEE": (L, E, E), "step_load_GLE": (window_steps, L, E)})
        self._flat = None if device is None else torch.zeros(self._numel(), dtype=DT, device=device)

    def _numel(self) -> int:
        return sum(math.prod(shape) for shape in self._shapes.values())

    def _views(self, flat: Tensor) -> dict[str, Tensor]:
        views, start = {}, 0
        for name, shape in self._shapes.items():
            n = math.prod(shape)
            views[name] = flat[start:start + n].view(shape)
            start += n
        return views

    def reset(self) -> None:
        self.steps_ended = 0
        if self._flat is not None:
            self._flat.zero_()

    def end_step(self) -> None:
        """Mark the end of an optimizer step: remember the expert loads counted so far (a device copy, no
        sync), so the reduce gives each step's global-batch load. A no-op with window_steps=0."""
        if self.window_steps == 0 or self._flat is None or not self.paper_metrics:
            return
        if self.steps_ended >= self.window_steps:
            raise ValueError(f"more than window_steps={self.window_steps} optimizer steps in one routing window: "
                             "reset (or reduce and reset) the accumulator every window, or raise window_steps")
        v = self._views(self._flat)
        v["step_load_GLE"][self.steps_ended].copy_(v["select_LDE"].sum(1))
        self.steps_ended += 1

    def add(self, records: Sequence[RoutingRecord], domain_ids_BS: Tensor) -> None:
        """Count one micro-batch: records of every MoE layer (in layer order) and its [B, S] domain ids
        (-1 = padding), tokens in the records' row-major order. Device ops only (no host sync);
        domain ids must lie in [-1, num_domains) (not checked: the check would sync)."""
        if len(records) != self.num_layers:
            raise ValueError(f"{len(records)} routing records for {self.num_layers} MoE layers")
        ids = tuple(r.layer_id for r in records)
        if self.layer_ids is None:
            self.layer_ids = ids
        elif ids != self.layer_ids:
            raise ValueError(f"records of layers {ids}, expected {self.layer_ids}")
        if self._flat is None:
            self._flat = torch.zeros(self._numel(), dtype=DT, device=records[0].probs_TE.device)
        v = self._views(self._flat)
        domain_T = domain_ids_BS.reshape(-1).to(self._flat.device)
        valid_T = domain_T >= 0
        d_T = domain_T.clamp(min=0)
        weight_T = valid_T.to(DT)
        v["tokens_D"].index_add_(0, d_T, weight_T)
        v["padding_tokens"].add_((~valid_T).sum())
        v["micro_batches"].add_(1.0)
        unit_T = torch.arange(domain_ids_BS.shape[0], device=d_T.device).repeat_interleave(
            domain_ids_BS.shape[1]) * self.num_domains + d_T
        with torch.no_grad():
            for layer, record in enumerate(records):
                self._add_layer(v, layer, record, d_T, weight_T, unit_T, domain_ids_BS.shape[0])

    def _add_layer(self, v: dict[str, Tensor], layer: int, r: RoutingRecord, d_T: Tensor,
                   weight_T: Tensor, unit_T: Tensor, num_seqs: int) -> None:
        D, E = self.num_domains, self.num_experts
        cell_TK = d_T[:, None] * E + r.indices_TK
        weight_TK = weight_T[:, None].expand_as(cell_TK)
        v["select_LDE"][layer].view(-1).index_add_(0, cell_TK.reshape(-1), weight_TK.reshape(-1))
        kept_TK = torch.where(r.kept_TK, weight_TK, torch.zeros_like(weight_TK))
        v["kept_LDE"][layer].view(-1).index_add_(0, cell_TK.reshape(-1), kept_TK.reshape(-1))
        probs_TE = r.probs_TE.detach().to(DT) * weight_T[:, None]
        v["prob_sum_LDE"][layer].index_add_(0, d_T, probs_TE)
        # Proposition 1 needs sum_s n_s H(pbar_s) over (sequence, domain) units s.
        sums_UE = probs_TE.new_zeros(num_seqs * D, E).index_add_(0, unit_T, probs_TE)
        counts_U = weight_T.new_zeros(num_seqs * D).index_add_(0, unit_T, weight_T)
        pbar_UE = sums_UE / counts_U.clamp(min=1.0)[:, None]
        weighted_U = counts_U * torch.special.entr(pbar_UE).sum(-1)
        v["unit_entropy_sum_LD"][layer].add_(weighted_U.view(num_seqs, D).sum(0))
        if r.expert_outputs_TKM is not None:
            norm_sum, slots = output_norm_sums(outputs_TKM=r.expert_outputs_TKM.detach(), kept_TK=r.kept_TK,
                                               weight_T=weight_T)
            v["output_norm_sum_L"][layer].add_(norm_sum)
            v["output_norm_slots_L"][layer].add_(slots)
        if self.paper_metrics:
            self._add_paper_counters(v, layer, r, weight_T)

    def _add_paper_counters(self, v: dict[str, Tensor], layer: int, r: RoutingRecord, weight_T: Tensor) -> None:
        var_T = paper.token_routing_variance_T(probs_TE=r.probs_TE.detach())
        v["route_var_sum_L"][layer].add_((var_T * weight_T).sum())
        if r.expert_outputs_TKM is not None:
            overlap_T, pair_T = paper.token_expert_overlap_T(outputs_TKM=r.expert_outputs_TKM.detach(),
                                                             kept_TK=r.kept_TK)
            pair_weight_T = weight_T * pair_T
            v["overlap_sum_L"][layer].add_((overlap_T.to(DT) * pair_weight_T).sum())
            v["overlap_tokens_L"][layer].add_(pair_weight_T.sum())
        v["coselect_LEE"][layer].add_(paper.coselection_counts_EE(indices_TK=r.indices_TK,
                                                                  num_experts=self.num_experts, weight_T=weight_T))

    def _stats(self, flat: Tensor) -> RoutingStats:
        v = {name: t.cpu() for name, t in self._views(flat).items()}
        layer_ids = self.layer_ids if self.layer_ids is not None else tuple(range(self.num_layers))
        return RoutingStats(select_LDE=v["select_LDE"], kept_LDE=v["kept_LDE"], prob_sum_LDE=v["prob_sum_LDE"],
                            unit_entropy_sum_LD=v["unit_entropy_sum_LD"], tokens_D=v["tokens_D"],
                            padding_tokens=float(v["padding_tokens"]), micro_batches=float(v["micro_batches"]),
                            layer_ids=tuple(layer_ids), k=self.k, output_norm_sum_L=v["output_norm_sum_L"],
                            output_norm_slots_L=v["output_norm_slots_L"],
                            **(self._paper_fields(v) if self.paper_metrics else {}))

    def _paper_fields(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"route_var_sum_L": v["route_var_sum_L"], "overlap_sum_L": v["overlap_sum_L"],
                "overlap_tokens_L": v["overlap_tokens_L"], "coselect_LEE": v["coselect_LEE"],
                "step_load_GLE": paper.step_loads(cumulative_load_GLE=v["step_load_GLE"][:self.steps_ended])}

    def _buffer(self) -> Tensor:
        if self._flat is None:
            self._flat = torch.zeros(self._numel(), dtype=DT)
        return self._flat

    def local_stats(self) -> RoutingStats:
        """This rank's window, no communication (e.g. a single-process evaluation)."""
        return self._stats(self._buffer().clone())

    def reduce(self, group=None) -> RoutingStats:
        """Sum every counter over `group` with ONE all-reduce of one float64 buffer (torch's convention:
        None = the default world group; a no-op without torch.distributed or with one rank) and return
        the global window. Collective: every rank of the group must call it. Local counters are kept
        (call `reset` to start the next window)."""
        flat = self._buffer().clone()
        all_reduce_sum(flat, group)
        return self._stats(flat)
