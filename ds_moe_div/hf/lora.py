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
over the expert-data-parallel group only. The router stays frozen, trains in full (`router="full"`), or
gets its own LoRA on `router.gate` (`router="lora"`); everything else is frozen. A target that matches
nothing, or a MoE layer left without its expert adapters, is refused (peft can skip modules silently).

In the trainer (`model.lora`): `prepare` converts the MoE blocks itself (this rank's experts), applies
LoRA, draws every lora_A from the seed (independent of ep_size), and the engine is built without an
`expert_parallel` block (the layers exist already; DeepSpeed still gives them their groups; `autoep.engine_view`
hides them from ZeRO when no expert parameter trains). DeepSpeed's AutoEP checkpoint would write the frozen experts and not the
expert adapters: a LoRA run saves its trainable state itself (hf/lora_checkpoint.py).
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
               router: Literal["frozen", "full", "lora"] = "frozen", dropout: float = 0.0, verbose: bool = True):
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
    if not attention and not experts and router != "lora":
        raise LoraTargetError("LoRA with no attention target and experts=False adapts nothing")
    modules = [rf".*\.self_attn\.{name}" for name in attention] + ([r".*\.mlp\.router\.gate"] if router == "lora" else [])
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules="^(?:" + "|".join(modules) + ")$" if modules else None,
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
    router_pairs = sum(".mlp.router.gate.lora_A." in n for n in adapted)
    if router_pairs != (num_moe_layers if router == "lora" else 0):
        problems.append(f"router={router} but {router_pairs} of {num_moe_layers} routers have LoRA")
    unexpected = [n for n in adapted if "lora_" not in n and not n.endswith("router.gate.weight")]
    if unexpected:
        problems.append(f"not asked for: {unexpected[:5]}")
    if problems:
        raise LoraTargetError("LoRA adapted other parameters than asked: " + "; ".join(problems))


def resolve_targets(model, targets: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
    """model.lora.targets -> (attention projection names, experts?): "attention" = all of `self_attn`'s."""
    available = attention_linear_names(model)
    names = [t for t in targets if t not in ("attention", "experts")]
    attention = tuple(available) if "attention" in targets else ()
    attention += tuple(n for n in names if n not in attention)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise LoraTargetError(f"model.lora.targets {unknown} match no module of this {model.config.model_type} model; "
                              f"use \"attention\", \"experts\" or its attention projections {available}")
    return attention, "experts" in targets


def prepare(model, lora_cfg, *, ep_size: int, ep_rank: int, seed: int, verbose: bool = True):
    """The trainer's LoRA model (`model.lora`): AutoEP layers for this rank's experts, LoRA applied, every
    lora_A drawn from `seed` (expert adapters: for all experts, rank `ep_rank` taking its experts' slice), so
    the initial adapters depend neither on ep_size nor on the RNG's history. Returns the PretrainedMoELM
    (peft's layers inside it)."""
    model.convert(ep_size=ep_size, ep_rank=ep_rank)
    attention, experts = resolve_targets(model, lora_cfg.targets)
    peft_model, _ = apply_lora(model, r=lora_cfg.r, alpha=lora_cfg.alpha, attention=attention, experts=experts,
                               router=lora_cfg.router, dropout=lora_cfg.dropout, verbose=verbose)
    _init_adapters(model, ep_rank=ep_rank, seed=seed)
    object.__setattr__(model, "lora_peft_config", peft_model.peft_config["default"])  # for --adapter-only
    object.__setattr__(model, "lora_peft_model", peft_model)  # not a submodule: for merge_and_unload
    return model


def _init_adapters(model, *, ep_rank: int, seed: int) -> None:
    """peft's kaiming-uniform init of every lora_A from its own generator (seed, name order): the same on
    every rank and for every ep_size; an expert adapter is drawn for all experts and sliced to this rank's."""
    import math

    import torch
    named = sorted((n, p) for n, p in model.named_parameters() if ".lora_A." in n)
    for index, (name, param) in enumerate(named):
        rows = param.shape[0]
        if ".mlp.experts." in name:
            rows *= model.num_experts // _owner(model, name).num_experts
        full = torch.empty(rows, param.shape[1])
        bound = 1 / math.sqrt(param.shape[1])  # kaiming_uniform_(a=sqrt(5)) on fan_in
        full.uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed * 1000003 + index))
        with torch.no_grad():
            param.copy_(full[ep_rank * param.shape[0]:(ep_rank + 1) * param.shape[0]] if rows != param.shape[0]
                        else full)


def expert_adapter_parameters(model) -> list:
    """(name, parameter) of the routed experts' LoRA tensors (this rank's experts), in name order."""
    return [(n, p) for n, p in model.named_parameters() if ".mlp.experts." in n and "lora_" in n]


def _owner(model, param_name: str):
    """The peft ParamWrapper that owns `...lora_A.default.weight`."""
    return model.get_submodule(param_name.rsplit(".lora_", 1)[0])
