"""The one place ds_moe_div touches DeepSpeed's AutoEP (DeepSpeed 0.19.8, `deepspeed.module_inject.auto_ep*`).

AutoEP replaces each Hugging Face MoE block (`model.layers.N.mlp`) by an `AutoEPMoELayer`: a torchtitan
`TokenChoiceTopKRouter` (`router.gate` an `nn.Linear`; returns top scores [T, K], selected experts
[T, K] and counts [E]), `GroupedExperts` (`w1`, `w3` [E_local, I, H], `w2` [E_local, H, I]) and the
family's shared experts, dropless, all-to-all with split sizes under EP. What this module adds:

    block = autoep_block(family, config, ep_size=2)   # ds_config["expert_parallel"]: the engine replaces
    convert(model, family, ep_size=1)                 # or: replace without an engine (one process, EP=1)
    attach_routing(model)                             # after either: layers report RoutingRecords
    with routing_capture(model, collect_expert_outputs=True) as records:
        model(input_ids)                              # records: one RoutingRecord per MoE layer, in depth order
    counts_LE = take_tokens_per_expert(model)         # AutoEP never resets its counter: read and zero per step
                                                      # (training forwards inside routing_capture only)
    biases = enable_expert_bias(model)                # Loss-Free Balancing: selection-only bias, one [E] per layer
    hf_sd = to_hf_state_dict(model.state_dict(), family)   # our names <-> transformers' in-memory names

`RoutingAutoEPLayer` is AutoEPMoELayer with its forward written out for the path ds_moe_div runs (the
"comm" backend, no folded tensor parallelism, scores applied after the experts, weighted-sum combine),
calling DeepSpeed's own routing, permutation and all-to-all functions. It sees each selected expert's
output before the gate weighting, back on the token's rank, in token-major [T, K, H] order, and hands
the record to the sink `routing_capture` installs (no sink: nothing is recorded, e.g. when activation
checkpointing recomputes the forward in backward, so nothing is counted twice).
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from deepspeed.module_inject import auto_ep_layer as ael
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer, RouterOutput

from ds_moe_div.hf.balance import deepspeed_l_aux
from ds_moe_div.hf.families import Family
from ds_moe_div.routing import RoutingRecord

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")


def autoep_block(family: Family, config, *, ep_size: int) -> dict:
    """The ds_config `expert_parallel` block for `family` (see Family.autoep_block)."""
    return family.autoep_block(ep_size=ep_size, config=config)


def convert(model, family: Family, *, ep_size: int = 1, ep_rank: int = 0) -> int:
    """Replace the MoE blocks of a transformers model by AutoEP layers without a DeepSpeed engine (what
    `deepspeed.initialize` does with the `expert_parallel` block). Returns the number of layers replaced."""
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config, validate_autoep_post_detection

    config = parse_autoep_config(autoep_block(family, model.config, ep_size=ep_size))
    auto_ep = AutoEP(model, config)
    specs = auto_ep.ep_parser()
    validate_autoep_post_detection(config, specs)
    auto_ep.replace_moe_layers(specs, ep_size=ep_size, ep_rank=ep_rank)
    return len(specs)


def moe_optimizer(factory):
    """An optimizer callable for `deepspeed.initialize(optimizer=...)`: `factory(param_groups)` on groups
    split by DeepSpeed's `configure_moe_param_groups` (an optimizer built before initialize cannot work:
    AutoEP creates the expert parameters inside it, and ZeRO-2 needs the MoE groups marked)."""
    from deepspeed.moe.utils import configure_moe_param_groups

    def build(params):
        return factory(configure_moe_param_groups(list(params)))
    return build


class RoutingAutoEPLayer(AutoEPMoELayer):
    """AutoEPMoELayer whose forward also builds a RoutingRecord (see the module docstring)."""

    def _forward(self, hidden_states: torch.Tensor):
        bsz, seqlen, hdim = hidden_states.shape
        x_TH = hidden_states.reshape(-1, hdim)
        seen = []
        ro = self._route(x_TH, seen)
        sink = self._routing_sink
        # Only captured training forwards count: not a recomputation in backward, not an evaluation.
        if sink is not None and self.training:
            with torch.no_grad():
                self.tokens_per_expert.add_(ro.num_tokens_per_expert)
        order = torch.argsort(ro.selected_experts.view(-1), stable=True)
        routed = x_TH[order // ro.selected_experts.shape[1]]
        if self.ep_size == 1:
            routed, perm, counts, n = ael.permute_by_local_expert(routed, ro.num_tokens_per_expert)
            out = ael.unpermute_by_local_expert(self.experts(routed, counts), perm, n)
        else:
            plan = ael.compute_split_plan(selected_experts=ro.selected_experts, num_experts=self.num_experts,
                                          ep_size=self.ep_size, num_local_experts=self.num_local_experts,
                                          ep_group=self.ep_group, num_tokens_per_expert=ro.num_tokens_per_expert)
            routed = ael._AllToAllV.apply(self.ep_group, routed, plan.input_splits, plan.output_splits)
            routed, perm, counts, n = ael.permute_by_local_expert(routed, plan.local_counts_by_source)
            out = ael.unpermute_by_local_expert(self.experts(routed, counts), perm, n)
            out = ael._AllToAllV.apply(self.ep_group, out, plan.output_splits, plan.input_splits)
        T, K = ro.selected_experts.shape
        unweighted = out.new_zeros(T * K, hdim)
        unweighted[order] = out
        unweighted_TKH = unweighted.view(T, K, hdim)
        # combine_from_routed's weighted sum, operation for operation (bitwise the same output).
        output = (unweighted_TKH * ro.top_scores.reshape(T, K, 1).float()).sum(dim=1).to(out.dtype)
        # Built on every forward, so that a recomputation under activation checkpointing saves the same
        # tensors as the original forward; only a captured forward hands it on.
        record = self._record(seen[0], ro, unweighted_TKH if self._collect_expert_outputs else None)
        if sink is not None:
            sink.append(record)
        return self._finalize_output(output.reshape(bsz, seqlen, hdim), x_TH, hidden_states, hdim)

    # Evaluation only (evaluation/ablation.py, within a context manager): an object with `masked` (experts
    # this layer may not select) and `k` (top-k' instead of the router's top_k, or None).
    routing_override = None

    def _route(self, x_TH: torch.Tensor, seen: list) -> RouterOutput:
        """The router's output; the gate's logits are appended to `seen`. Under a routing override, masked
        experts get -inf logits (scores 0, softmax over the rest) and a -inf selection bias (never chosen,
        whatever the correction bias), and the router takes its top-k'."""
        override, bias, hooks, top_k = self.routing_override, self.expert_bias, [], self.router.top_k
        if override is not None and override.masked:
            masked = list(override.masked)

            def mask(module, args, out):
                out = out.clone()
                out[..., masked] = float("-inf")
                return out
            hooks.append(self.router.gate.register_forward_hook(mask))
            block_E = torch.zeros(self.num_experts, device=x_TH.device)
            block_E[masked] = float("-inf")
            bias = block_E if bias is None else bias + block_E
        hooks.append(self.router.gate.register_forward_hook(lambda module, args, out: seen.append(out)))
        if override is not None and override.k is not None:
            self.router.top_k = override.k
        try:
            return RouterOutput(*self.router(x_TH, bias))
        finally:
            self.router.top_k = top_k
            for hook in hooks:
                hook.remove()

    @property
    def router_weight(self) -> torch.nn.Parameter:
        """The router's [E, H] weight (row e scores expert e)."""
        return self.router.gate.weight

    def router_tensors(self) -> list[torch.Tensor]:
        """Every per-expert routing tensor (expert on dim 0): the router's weight (and bias), DeepSeek-V3's
        selection-only `e_score_correction_bias` and the Loss-Free `expert_bias`, when present; a router
        permutation moves them together, or the permuted router would select with another expert's bias."""
        tensors = (self.router.gate.weight, getattr(self.router.gate, "bias", None),
                   getattr(self.router, "e_score_correction_bias", None), getattr(self, "expert_bias", None))
        return [t for t in tensors if torch.is_tensor(t)]

    def expert_parallel_group(self):
        """DeepSpeed's expert-parallel group of this layer (ranks holding different experts)."""
        from deepspeed.utils import groups
        return groups._get_expert_parallel_group(self.ep_group_name)

    def expert_data_parallel_group(self):
        """DeepSpeed's expert-data-parallel group (ranks holding replicas of the same experts)."""
        from deepspeed.utils import groups
        return groups._get_expert_data_parallel_group(self.ep_group_name)

    def _record(self, logits_TE, ro: RouterOutput, outputs_TKH) -> RoutingRecord:
        logits_TE = logits_TE.float()
        if self.router.score_func == "softmax":
            probs_TE = torch.softmax(logits_TE, dim=-1)
        else:  # sigmoid scores as a distribution over experts (DeepSeek-V3's sequence-wise balance does the same)
            scores = torch.sigmoid(logits_TE)
            probs_TE = scores / scores.sum(dim=-1, keepdim=True)
        indices_TK = ro.selected_experts.long()
        return RoutingRecord(layer_id=self.layer_id, logits_TE=logits_TE, probs_TE=probs_TE, indices_TK=indices_TK,
                             weights_TK=ro.top_scores.float(), kept_TK=torch.ones_like(indices_TK, dtype=torch.bool),
                             l_aux=deepspeed_l_aux(probs_TE=probs_TE, indices_TK=indices_TK,
                                                   num_experts=self.num_experts),
                             capacity=None, expert_outputs_TKM=outputs_TKH)


def moe_layers(model) -> list[AutoEPMoELayer]:
    return [m for m in model.modules() if isinstance(m, AutoEPMoELayer)]


def attach_routing(model) -> list[RoutingAutoEPLayer]:
    """Turn every AutoEP layer of `model` into a RoutingAutoEPLayer (same parameters, same groups)."""
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, AutoEPMoELayer):
            continue
        unsupported = [what for what, bad in (
            ("comm_backend other than 'comm'", module.comm_backend != ael.COMM_BACKEND),
            ("score_apply other than 'post'", module.score_apply != "post"),
            ("combine_impl other than 'weighted_sum'", module.combine_impl != "weighted_sum"),
            ("async_split_plan", bool(module.async_split_plan)),
            ("folded tensor parallelism", module.folding_group_handles is not None
             and module.folding_group_handles.spec.tp_size > 1)) if bad]
        if unsupported:
            raise ValueError(f"{name}: ds_moe_div's routing adapter does not support AutoEP with "
                             f"{', '.join(unsupported)}; remove these keys from the ds_config expert_parallel block")
        match = _LAYER.search(name)
        module.__class__ = RoutingAutoEPLayer
        module.layer_id = int(match.group(1)) if match else len(layers)
        module._routing_sink = None
        module._collect_expert_outputs = False
        layers.append(module)
    if not layers:
        raise ValueError("no AutoEP MoE layer found: enable the ds_config expert_parallel block (autoep_block) or "
                         "call convert() first")
    return layers


@contextmanager
def routing_capture(model, *, collect_expert_outputs: bool = False):
    """Collect one RoutingRecord per MoE layer of the forwards run inside the block, in call order."""
    records: list[RoutingRecord] = []
    layers = moe_layers(model)
    for layer in layers:
        layer._routing_sink = records
        layer._collect_expert_outputs = collect_expert_outputs
    try:
        yield records
    finally:
        for layer in layers:
            layer._routing_sink = None
            layer._collect_expert_outputs = False


def take_tokens_per_expert(model) -> torch.Tensor:
    """[L, E] routed-token counts accumulated since the last call (AutoEP's `tokens_per_expert`), then zeroed."""
    layers = moe_layers(model)
    counts = torch.stack([layer.tokens_per_expert.detach().clone() for layer in layers])
    for layer in layers:
        layer.tokens_per_expert.zero_()
    return counts


def enable_expert_bias(model) -> list[torch.Tensor]:
    """Give every AutoEP layer a zero `expert_bias` buffer [E] (fp32, persistent) and return them in depth
    order. The router adds it to the scores used to *select* experts only (weights stay unbiased): the
    Loss-Free Balancing bias, updated outside the model (b += gamma * sign(mean_load - load))."""
    biases = []
    for layer in moe_layers(model):
        if getattr(layer, "expert_bias", None) is None:
            if "expert_bias" in layer.__dict__:
                del layer.__dict__["expert_bias"]
            device = layer.router.gate.weight.device
            layer.register_buffer("expert_bias", torch.zeros(layer.num_experts, dtype=torch.float32, device=device),
                                  persistent=True)
        biases.append(layer.expert_bias)
    return biases


# ---------------------------------------------------------------------------------------------------------
# State dict names: ours (AutoEP) <-> transformers' in-memory names (fused experts; per-expert on disk is
# transformers' own conversion at save/load time).
# ---------------------------------------------------------------------------------------------------------
_SHARED_RENAMES = {"qwen2_moe": (("shared_experts_gate.", "shared_expert_gate."), ("shared_experts.", "shared_expert."))}


def _hf_name(key: str, family: Family) -> str:
    for ours, theirs in _SHARED_RENAMES.get(family.model_type, ()):
        key = key.replace(f".mlp.{ours}", f".mlp.{theirs}")
    return key.replace(".mlp.router.gate.", ".mlp.gate.").replace(".mlp.router.", ".mlp.gate.")


def to_hf_state_dict(state: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """Our full (all experts, EP=1 layout) state dict in transformers' in-memory names.

    `w1`/`w3` [E, I, H] become `gate_up_proj` [E, 2I, H] (gate rows first), `w2` becomes `down_proj`.
    A Loss-Free Balancing `expert_bias` is folded into DeepSeek-V3's `e_score_correction_bias` (both are
    added to the selection scores only, so routing is unchanged); other families have no such tensor,
    and a nonzero bias is refused rather than silently dropped."""
    prefixes = {k[: -len("router.gate.weight")] for k in state if k.endswith(".mlp.router.gate.weight")}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            out[key] = value
            continue
        rest = key[len(prefix):]
        if rest.startswith("gate.") or rest in ("tokens_per_expert", "experts.w3"):
            continue  # AutoEP's alias of the router / a counter / consumed with w1
        if rest == "experts.w1":
            out[prefix + "experts.gate_up_proj"] = torch.cat([value, state[prefix + "experts.w3"]], dim=1)
        elif rest == "experts.w2":
            out[prefix + "experts.down_proj"] = value
        elif rest in ("expert_bias", "router.e_score_correction_bias"):
            _fold_expert_bias(out, state, prefix, family)
        else:
            out[_hf_name(key, family)] = value
    return out


def _fold_expert_bias(out: dict, state: dict, prefix: str, family: Family) -> None:
    ecb, bias = state.get(prefix + "router.e_score_correction_bias"), state.get(prefix + "expert_bias")
    if ecb is not None:
        out[prefix + "gate.e_score_correction_bias"] = ecb if bias is None else ecb + bias.to(ecb.dtype)
    elif torch.count_nonzero(bias):
        raise ValueError(f"{prefix}expert_bias (Loss-Free Balancing) is nonzero but {family.model_type} has no "
                         f"selection bias in transformers: the exported model would route differently. Export a "
                         f"deepseek_v3 model, or train without the bias")


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor], family: Family,
                       *, ep_rank: int = 0) -> dict[str, torch.Tensor]:
    """Values for every key of `model_state` (an AutoEP model's state dict, any EP rank) from transformers'
    names; experts are sliced to this rank's [ep_rank * E_local, (ep_rank + 1) * E_local)."""
    out = {}
    for key, current in model_state.items():
        if key.endswith((".tokens_per_expert", ".expert_bias")):
            out[key] = torch.zeros_like(current)
            continue
        base, _, leaf = key.rpartition(".")
        if leaf in ("w1", "w2", "w3") and base.endswith(".experts"):
            e_local = current.shape[0]
            lo = ep_rank * e_local
            if leaf == "w2":
                full = hf_state[base + ".down_proj"]
            else:
                gate_up = hf_state[base + ".gate_up_proj"]
                half = gate_up.shape[1] // 2
                full = gate_up[:, :half] if leaf == "w1" else gate_up[:, half:]
            out[key] = full[lo: lo + e_local].clone()
            continue
        name = _hf_name(key, family)
        name = re.sub(r"\.mlp\.gate\.gate\.", ".mlp.gate.", name)  # AutoEP's router alias
        out[key] = hf_state[name]
    return out


class _DenseView(torch.nn.Module):
    """What DeepSpeed's engine sees of an AutoEP layer while no parameter of it is expert-parallel and
    trainable: not an MoE layer (ZeRO-1/2 would assert "None of the param groups are marked as MoE"), but
    still bound to its expert-parallel group (the engine calls this method on every module that has it)."""

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False,
                                  folding_group_handles=None) -> None:
        AutoEPMoELayer.set_deepspeed_parallelism(self, use_data_before_expert_parallel_, folding_group_handles)


@contextmanager
def engine_view(model):
    """Around `deepspeed.initialize` of a LoRA model: with no trainable expert-parallel parameter (no expert
    adapters), the AutoEP layers are shown to the engine as plain modules (see _DenseView)."""
    expert_trainable = any(p.requires_grad and getattr(p, "allreduce", True) is False for p in model.parameters())
    layers = [] if expert_trainable else [(layer, layer.__class__) for layer in moe_layers(model)]
    for layer, _ in layers:
        layer.__class__ = _DenseView
    try:
        yield
    finally:
        for layer, cls in layers:
            layer.__class__ = cls


# ---------------------------------------------------------------------------------------------------------
# Loading each rank's experts straight into AutoEP's layers (hf/shard_load.py): the transformers model keeps
# its routed experts on the meta device; AutoEP slices them to the rank's experts without reading a value,
# and `fill(block_name, layer)` reads that slice from disk as each layer is built, inside
# `AutoEP.replace_moe_layers` (its `on_moe_layer_replaced` callback): before the engine moves the module,
# broadcasts it or builds the optimizer, so none of them ever sees a meta tensor.
# ---------------------------------------------------------------------------------------------------------
_EXPERT_FILL = "_autoep_expert_fill"


def fill_experts_when_replaced(model, fill) -> None:
    """Have every AutoEP replacement of `model`'s MoE blocks (by `deepspeed.initialize` or `convert`) call
    `fill(block_name, layer)` right after the layer is built. DeepSpeed's `AutoEP.replace_moe_layers` is
    wrapped once per process; the wrapper only acts on models that carry a fill (others pass through)."""
    from deepspeed.module_inject.auto_ep import AutoEP

    object.__setattr__(model, _EXPERT_FILL, fill)
    if getattr(AutoEP.replace_moe_layers, "_ds_moe_div_fill", False):
        return
    original = AutoEP.replace_moe_layers

    def replace_moe_layers(self, specs, ep_size, ep_rank, collect_sources=False, on_moe_layer_replaced=None):
        fill_fn = getattr(self.model, _EXPERT_FILL, None)
        if fill_fn is None:
            return original(self, specs, ep_size, ep_rank, collect_sources, on_moe_layer_replaced)

        def replaced(layer):
            name = next(n for n, m in self.model.named_modules() if m is layer)
            fill_fn(name, layer)
            if on_moe_layer_replaced is not None:
                on_moe_layer_replaced(layer)
        # AutoEP copies each (meta) source expert slice into its GroupedExperts' parameters, which works only
        # when those are on the meta device too: built there, they allocate nothing until `fill` runs.
        grouped = ael.GroupedExperts

        def grouped_on_meta(*args, **kwargs):
            with torch.device("meta"):
                return grouped(*args, **kwargs)
        ael.GroupedExperts = grouped_on_meta
        try:
            return original(self, specs, ep_size, ep_rank, collect_sources, replaced)
        finally:
            ael.GroupedExperts = grouped

    replace_moe_layers._ds_moe_div_fill = True
    AutoEP.replace_moe_layers = replace_moe_layers
