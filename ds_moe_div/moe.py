"""DeepSpeed-MoE, subclassed to expose the router: `RoutingGate`, `RoutingMOELayer`, `RoutedMoE`.

DeepSpeed's `MoE` returns only (output, l_aux, exp_counts). Specialisation objectives need the dense
router probabilities, the chosen experts, the capacity drops and, for the orthogonality loss, the
unweighted outputs of each token's selected experts. The subclasses here keep DeepSpeed's routing,
dispatch and all-to-all (its own functions are called) and hand those tensors back as return values,
ending in a `RoutingRecord`: no per-step state is kept on the modules, so a forward that activation
checkpointing recomputes produces a second record that is simply discarded (nothing is counted twice).
They never reduce, log or scale anything; the process groups they belong to are DeepSpeed's `ep_size_N`
groups, looked up by name (`expert_parallel_group` / `expert_data_parallel_group`) once
`deepspeed.initialize` has created them.

Shape legend (docs/SHAPES.md): T tokens, E experts, K top-k slots, M model dim, C capacity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.moe import sharded_moe as ds_moe
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups

from ds_moe_div import selection_bias
from ds_moe_div.routing import RoutingRecord


class RoutingGate(ds_moe.TopKGate):
    """DeepSpeed's top-k gate that computes fp32 logits once and returns them with DeepSpeed's outputs.

    DeepSpeed calls `F.linear` on `wg.weight` itself (a hook on `wg` never fires), so the logits are
    computed here and handed to DeepSpeed's own `top1gating` / `top2gating` / `topkgating`.

    `routing_override` (evaluation only, set by `evaluation/ablation.py` within a context manager): a
    callable (logits_TE, k) -> (logits_TE, k') applied before the top-k; masked experts get -inf logits,
    and k' != k routes each token to its top-k' experts with DeepSpeed's `topkgating` (weights renormalised).
    """

    routing_override = None

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):
        if not sparse_routes or use_tutel:
            raise ValueError("RoutingGate supports DeepSpeed's sparse-route dispatch only (use_tutel=False)")
        x = input.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            x = ds_moe.multiplicative_jitter(x, device=input.device)
        logits = F.linear(x, self.wg.weight.float())
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        k = self.k
        if self.routing_override is not None:
            logits, k = self.routing_override(logits, k)
        bias = self._buffers.get(selection_bias.BUFFER)
        if bias is not None:  # Loss-Free Balancing: the bias picks the experts, the weights stay unbiased
            if self.routing_override is not None:  # a masked expert (-inf logits) stays unselectable
                bias = bias.masked_fill(torch.isinf(logits).all(0), float("-inf"))
            return selection_bias.biased_gating(self, logits, bias, capacity_factor, k=k), logits
        if k != self.k:
            out = ds_moe.topkgating(logits, k, capacity_factor, self.min_capacity, self.drop_tokens, self.ep_group,
                                    sparse_routes=True)
        elif self.k == 1:
            noisy = self.noisy_gate_policy if self.training else None
            out = ds_moe.top1gating(logits, capacity_factor, self.min_capacity, used_token, noisy, self.drop_tokens,
                                    self.use_rts, self.ep_group, True, False)
        elif self.k == 2:
            # top2gating adds Gumbel noise to its logits in place when sampling the second expert.
            gate_logits = logits.clone() if self.top2_2nd_expert_sampling else logits
            out = ds_moe.top2gating(gate_logits, capacity_factor, self.min_capacity, self.drop_tokens, self.ep_group,
                                    self.top2_2nd_expert_sampling, True)
        else:
            out = ds_moe.topkgating(logits, self.k, capacity_factor, self.min_capacity, self.drop_tokens,
                                    self.ep_group, sparse_routes=True)
        # DeepSpeed's (l_aux, capacity, num_experts, indices [K,T] (-1 dropped), locations [K,T],
        # weights [K,T], exp_counts), and logits_TE.
        return out, logits

    def _apply(self, fn, recurse=True):
        """Keep the selection bias fp32 when the module is cast (DeepSpeed's bf16/fp16 engines call
        `module.bfloat16()`): a 1e-3 update must not round away. Device moves still apply."""
        bias = self._buffers.get(selection_bias.BUFFER)
        super()._apply(fn, recurse)
        if bias is not None:
            moved = self._buffers[selection_bias.BUFFER]
            self._buffers[selection_bias.BUFFER] = bias.to(device=moved.device) if moved.dtype != bias.dtype else moved
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint's selection bias only means something to a Loss-Free run: a gate without one
        ignores it (init_from a Loss-Free run), a gate with one keeps its zeros when the checkpoint has
        none (init_from any other run)."""
        key = prefix + selection_bias.BUFFER
        if self._buffers.get(selection_bias.BUFFER) is None:
            state_dict.pop(key, None)
        elif key not in state_dict:
            state_dict[key] = self._buffers[selection_bias.BUFFER].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RoutingMOELayer(ds_moe.MOELayer):
    """DeepSpeed's MOELayer forward (sparse dispatch, no tutel, no tensor parallelism) that returns
    (output, RoutingRecord) and can also give the unweighted expert outputs in token-major [T, K, M]
    order at no extra cost."""

    def forward(self, hidden, used_token=None, *, layer_id: int = 0, collect_expert_outputs: bool = False):
        if groups.mpu is not None:
            raise ValueError("ds_moe_div's MoE layer does not support tensor parallelism (groups.mpu is set)")
        d_model = hidden.shape[-1]
        tokens_TM = hidden.reshape(-1, d_model)
        gated, logits_TE = self.gate(tokens_TM, used_token, True, False)
        l_aux, capacity, num_experts, indices_KT, locations_KT, gates_KT, _ = gated
        capacity = int(capacity)
        slots_KT = ds_moe._route_slots(indices_KT, locations_KT, num_experts, capacity)
        dispatched_ECM = ds_moe._sparse_encode(tokens_TM, slots_KT, num_experts, capacity)
        dispatched_ECM = self._exchange(dispatched_ECM)
        dispatched = dispatched_ECM.reshape(self.ep_size, self.num_local_experts, -1, d_model)
        expert_out = self.experts(dispatched).reshape(self.ep_size * self.num_local_experts, -1, d_model)
        expert_out_EC_M = self._exchange(expert_out).view(num_experts * capacity, d_model)
        routed_TKM = None
        if collect_expert_outputs:
            # Gather straight into token-major order (dropped slots read the zero row), so the
            # orthogonality loss gets contiguous [T, K, M] outputs and the combine reuses them.
            padded = torch.cat([expert_out_EC_M, expert_out_EC_M.new_zeros(1, d_model)])
            routed_TKM = padded.index_select(0, slots_KT.t().reshape(-1)).view(-1, slots_KT.shape[0], d_model)
            combined = (routed_TKM * gates_KT.t().unsqueeze(-1)).sum(1).to(expert_out_EC_M.dtype)
        else:
            combined = ds_moe._sparse_decode(expert_out_EC_M, slots_KT, gates_KT, tokens_TM.shape[0])
        record = routing_record(layer_id=layer_id, logits_TE=logits_TE, indices_KT=indices_KT, weights_KT=gates_KT,
                                l_aux=l_aux, capacity=capacity, expert_outputs_TKM=routed_TKM,
                                selection_bias_E=self.gate._buffers.get(selection_bias.BUFFER))
        return combined.reshape(hidden.shape), record

    def _exchange(self, buffer: torch.Tensor) -> torch.Tensor:
        if self.ep_size > 1:
            return ds_moe._AllToAll.apply(self.ep_group, buffer)
        return buffer.contiguous()


class RoutedMoE(MoE):
    """`deepspeed.moe.layer.MoE` whose forward returns (output, RoutingRecord).

    Arguments are DeepSpeed's; `layer_id` names the layer in records and logs.
    """

    def __init__(self, hidden_size: int, expert: torch.nn.Module, *, layer_id: int, num_experts: int, ep_size: int,
                 k: int, capacity_factor: float, eval_capacity_factor: float, min_capacity: int,
                 use_residual: bool, noisy_gate_policy: str | None, drop_tokens: bool, use_rts: bool,
                 top2_2nd_expert_sampling: bool) -> None:
        super().__init__(hidden_size, expert, num_experts=num_experts, ep_size=ep_size, k=k,
                         capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                         min_capacity=min_capacity, use_residual=use_residual, noisy_gate_policy=noisy_gate_policy,
                         drop_tokens=drop_tokens, use_rts=use_rts, top2_2nd_expert_sampling=top2_2nd_expert_sampling)
        self.layer_id = layer_id
        stock = self.deepspeed_moe
        gate = RoutingGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                           noisy_gate_policy, drop_tokens, use_rts, None, top2_2nd_expert_sampling)
        self.deepspeed_moe = RoutingMOELayer(gate, stock.experts, stock.ep_group_name, ep_size,
                                             stock.num_local_experts)

    @property
    def gate(self) -> RoutingGate:
        return self.deepspeed_moe.gate

    @property
    def local_experts(self) -> torch.nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def router_weight(self) -> torch.nn.Parameter:
        """The router's [E, M] weight (row e scores expert e)."""
        return self.gate.wg.weight

    def router_tensors(self) -> list[torch.Tensor]:
        """Every per-expert routing tensor (expert on dim 0): the router's weight and the Loss-Free
        `selection_bias` when there is one; a router permutation moves them together."""
        bias = self.gate._buffers.get("selection_bias")  # selection_bias.BUFFER (that module imports this one)
        return [self.gate.wg.weight] + ([bias] if bias is not None else [])

    def expert_parallel_group(self):
        """DeepSpeed's expert-parallel group of this layer (ranks that hold different experts)."""
        return groups._get_expert_parallel_group(self.expert_group_name)

    def expert_data_parallel_group(self):
        """DeepSpeed's expert-data-parallel group (ranks that hold replicas of the same experts)."""
        return groups._get_expert_data_parallel_group(self.expert_group_name)

    def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None, *,
                collect_expert_outputs: bool = False) -> tuple[torch.Tensor, RoutingRecord]:
        """DeepSpeed's `MoE.forward` (residual MoE included), returning (output, RoutingRecord) instead of
        reading l_aux and exp_counts back from module attributes."""
        output, record = self.deepspeed_moe(hidden_states, used_token, layer_id=self.layer_id,
                                            collect_expert_outputs=collect_expert_outputs)
        if self.use_residual:
            output_mlp = self.mlp(hidden_states)
            if isinstance(output_mlp, tuple):
                output_mlp = output_mlp[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + output_mlp * coef[..., 1:]
        return output, record


def routing_record(*, layer_id: int, logits_TE: torch.Tensor, indices_KT: torch.Tensor, weights_KT: torch.Tensor,
                   l_aux: torch.Tensor, capacity: int | None, expert_outputs_TKM: torch.Tensor | None,
                   selection_bias_E: torch.Tensor | None = None) -> RoutingRecord:
    """The record of DeepSpeed's gate outputs: slot-major [K, T] indices (-1 = dropped) and weights.
    `selection_bias_E`: the Loss-Free bias the selection used (None: selection on p alone)."""
    probs_TE = torch.softmax(logits_TE, dim=-1)
    kept_TK = (indices_KT >= 0).t()
    chosen_TK = indices_KT.t().long()
    # Dropped slots carry -1: restore the expert the router chose (exact for deterministic routing;
    # with Gumbel-sampled second experts a dropped slot shows the second-highest probability).
    scores_TE = probs_TE.detach() if selection_bias_E is None else probs_TE.detach() + selection_bias_E
    ranked_TK = torch.topk(scores_TE, k=chosen_TK.shape[1], dim=-1).indices
    chosen_TK = torch.where(kept_TK, chosen_TK, ranked_TK)
    return RoutingRecord(layer_id=layer_id, logits_TE=logits_TE, probs_TE=probs_TE, indices_TK=chosen_TK,
                         weights_TK=weights_KT.t(), kept_TK=kept_TK, l_aux=l_aux, capacity=capacity,
                         expert_outputs_TKM=expert_outputs_TKM)


def reinit_experts(moe: RoutedMoE, *, seed: int, ep_rank: int, std: float, out_std: float) -> None:
    """Give every expert its own initial weights, drawn from a generator seeded by its global id.

    DeepSpeed deep-copies one expert module, so without this all experts start identical. Seeding by
    (seed, layer, global expert id) makes the result independent of ep_size: expert 5 gets the same
    weights whether it lives on rank 0 of EP=1 or rank 1 of EP=2.
    """
    num_local = len(moe.local_experts)
    for local_id, expert in enumerate(moe.local_experts):
        global_id = ep_rank * num_local + local_id
        gen = torch.Generator().manual_seed(seed * 1_000_003 + moe.layer_id * 10_007 + global_id)
        for name, param in expert.named_parameters():
            scale = out_std if name.startswith("w_down") else std
            values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, scale, generator=gen)
            with torch.no_grad():
                param.copy_(values)
