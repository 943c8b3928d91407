"""Routing objectives (losses) as pure, keyword-only functions of tensors (methods spec, sections 1-5),
one module per family: balance, zloss, divergence, orthogonality, variance. Measurements (the
Proposition-1 decomposition, specialisation metrics) live in `ds_moe_div.metrics`.

    .venv/bin/python -m pytest tests/test_objectives.py tests/test_objectives_distributed.py -q

Shape suffixes: docs/SHAPES.md (T tokens of a micro-batch's [B, S] positions flattened row-major, E routed
experts, L MoE layers, D domains, K top-k slots, M model dim, N (sequence, domain) units, P domain pairs).

Batch levels: *micro-batch* = what this rank's forward pass saw; *global batch* = the concatenation
of the micro-batches of all data-parallel ranks at the same micro-step. Every loss is computed on
the micro-batch except the expert-divergence loss, whose domain means are those of the global batch,
and the global-batch load balance. Only `global_domain_means` and `global_load_balance_loss`
communicate, over the `group` they are given, both with the same straight-through construction
(`straight_through.straight_through_sums`).

Half-precision inputs are promoted to float32; float32/float64 inputs keep their dtype.
"""
from ds_moe_div.objectives.balance import global_load_balance_loss
from ds_moe_div.objectives.balancing import loss_free_bias_update, sequence_balance_loss
from ds_moe_div.objectives.divergence import (
    domain_routing_sums,
    domain_token_counts,
    expert_divergence_loss,
    global_domain_means,
    global_domain_means_and_weights,
    jensen_shannon,
)
from ds_moe_div.objectives.orthogonality import orthogonality_loss
from ds_moe_div.objectives.variance import topk_score_matrix, variance_loss
from ds_moe_div.objectives.zloss import router_z_loss

__all__ = [
    "domain_routing_sums",
    "domain_token_counts",
    "expert_divergence_loss",
    "global_domain_means",
    "global_domain_means_and_weights",
    "global_load_balance_loss",
    "jensen_shannon",
    "loss_free_bias_update",
    "orthogonality_loss",
    "router_z_loss",
    "sequence_balance_loss",
    "topk_score_matrix",
    "variance_loss",
]
