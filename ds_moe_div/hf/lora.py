"""LoRA through peft on an imported model's attention and AutoEP expert projections.

    model.convert(ep_size=1)                                   # AutoEP layers first (GroupedExperts)
    peft_model, adapted = apply_lora(model, r=8, alpha=16)     # prints the adapted-parameter list
    peft_model.base_model.model(input_ids_BS, labels_BS=labels)   # PretrainedMoELM's call and output

Attention: `nn.Linear` children of each layer's `self_attn` (all of them by default; the names differ by
family: DeepSeek's MLA has q_a_proj / kv_b_proj ...), through peft's `target_modules`. Routed experts:
peft's `target_parameters` on the 3-D `GroupedExperts.w1/w2/w3` [E_local, out, in], which peft adapts with
one rank-r pair per local expert (`lora_A` [r * E_local, in], `lora_B` [out, r * E_local]). These belong
to the experts of this rank, like the weights they adapt: they are tagged expert-parallel the way AutoEP
tags `w1/w2/w3` (`allreduce=False`, the layer's `ep_size_N` group), so DeepSpeed reduces their gradients
over the expert-data-parallel group only. The router stays frozen, or trains in full (`router="full"`);
everything else is frozen. A target that matches nothing, or a MoE layer left without its expert
adapters, is refused (peft can skip modules silently).

Not wired into the trainer yet: AutoEP replaces the MoE blocks inside `deepspeed.initialize`, after which
peft can no longer be applied before the optimizer is built, and DeepSpeed's AutoEP checkpoints save only
`w1/w2/w3` per expert. Use it in one process (EP=1) or with a model converted before initialize.
"""
from __future__ import annotations

import re
from typing import Literal

from torch import nn

from ds_moe_div.hf.autoep import moe_layers

EXPERT_PARAMETERS = ("experts.w1", "experts.w2", "experts.w3")
_ATTN_CHILD = re.compile(r"\.self_attn\.([^.]+)$")


class LoraTargetError(ValueError):
    pass


def attention_linear_names(model) -> list[str]:
    """Names of the nn.Linear children of the layers' `self_attn` modules (q_proj, o_proj, kv_a_proj...)."""
    return sorted({match.group(1) for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and (match := _ATTN_CHILD.search(name))})


def apply_lora(model, *, r: int, alpha: float, attention: tuple[str, ...] | None = None, experts: bool = True,
               router: Literal["frozen", "full"] = "frozen", verbose: bool = True):
    """Wrap `model` (a converted PretrainedMoELM) with peft LoRA; returns (peft model, adapted parameter names)."""
    from peft import LoraConfig, get_peft_model

    layers = moe_layers(model)
    if not layers:
        raise LoraTargetError("apply_lora needs AutoEP layers: call model.convert() (or deepspeed.initialize) first")
    available = attention_linear_names(model)
    attention = tuple(available) if attention is None else tuple(attention)
    missing = [name for name in attention if name not in available]
    if missing:
        raise LoraTargetError(f"LoRA attention target(s) {missing} match no module of this "
                              f"{model.config.model_type} model; its attention projections are {available}")
    if not attention and not experts:
        raise LoraTargetError("LoRA with no attention target and experts=False adapts nothing")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(attention) or None,
                        target_parameters=list(EXPERT_PARAMETERS) if experts else None)
    peft_model = get_peft_model(model, config)
    for layer in layers:
        layer.router.gate.weight.requires_grad_(router == "full")
        for name, param in layer.experts.named_parameters():
            if "lora_" in name:
                param.allreduce = False
                param.group_name = layer.ep_group_name
    adapted = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    _check_adapted(model, adapted, attention, experts, router, len(layers))
    if verbose:
        print(f"LoRA r={r} alpha={alpha}: {len(adapted)} trainable tensors, "
              f"{sum(p.numel() for p in peft_model.parameters() if p.requires_grad):,} parameters")
        for name in adapted:
            print(f"  {name}")
    return peft_model, adapted


def _check_adapted(model, adapted: list[str], attention, experts: bool, router: str, num_moe_layers: int) -> None:
    """What the config asked for is exactly what became trainable."""
    num_layers = model.config.num_hidden_layers
    problems = []
    for target in attention:
        count = sum(f".self_attn.{target}.lora_A." in n for n in adapted)
        if count != num_layers:
            problems.append(f"attention {target}: {count} of {num_layers} layers adapted")
    expert_pairs = sum(".mlp.experts." in n and ".lora_A." in n for n in adapted)
    if experts and expert_pairs != 3 * num_moe_layers:
        problems.append(f"experts: {expert_pairs} of {3 * num_moe_layers} expert weights adapted")
    routers = sum(n.endswith("router.gate.weight") for n in adapted)
    if routers != (num_moe_layers if router == "full" else 0):
        problems.append(f"router={router} but {routers} router weights are trainable")
    unexpected = [n for n in adapted if "lora_" not in n and not n.endswith("router.gate.weight")]
    if unexpected:
        problems.append(f"not asked for: {unexpected[:5]}")
    if problems:
        raise LoraTargetError("LoRA adapted other parameters than asked: " + "; ".join(problems))
