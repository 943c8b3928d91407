"""Export a checkpoint of a LoRA run (`model.lora`): merged into a plain Hugging Face model (default), or
the attention adapters as a PEFT adapter directory (`--adapter-only`).

    python -m ds_moe_div export runs/lora out/lora_hf                       # base + adapters merged
    python -m ds_moe_div export runs/lora out/lora_adapter --adapter-only   # PeftModel.from_pretrained(base, ...)

Merged: the base model is rebuilt from `model.pretrained` (its digest checked against the checkpoint's),
converted at EP=1, LoRA applied with the run's settings, every rank's adapters loaded
(lora_checkpoint.read_adapters), peft's `merge_and_unload`, then written like any imported model's
checkpoint (transformers' names, hub per-expert layout, tokenizer).

Adapter-only writes what peft loads onto transformers' own model (`PeftModel.from_pretrained(base, dir)`):
LoRA on the `self_attn` projections (`target_modules`), and the routed experts' adapters through peft's
`target_parameters` on transformers' fused `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj`.
Ours adapt AutoEP's separate w1 (gate) and w3 (up) with rank r each; on the fused weight they are one
exact rank-2r adapter per expert: A = [A_gate; A_up], B = blockdiag(B_gate, B_up), with
`rank_pattern`/`alpha_pattern` {"gate_up_proj": 2r / 2 alpha} so that the scale alpha / r is unchanged;
`down_proj` takes w2's adapter as is. If peft adapts other tensors on this family than ours (it can skip
modules silently), the export is refused naming them. A router that
was trained in full or LoRA'd has no place in a PEFT adapter of transformers' router: refused with that
reason (nothing is written); export such a run merged.
"""
from __future__ import annotations

import json
from pathlib import Path

from ds_moe_div import rundir
from ds_moe_div.hf import lora_checkpoint


class LoraExportError(ValueError):
    pass


def is_lora_checkpoint(tag_dir) -> bool:
    return rundir.lora_base_path(tag_dir).is_file()


def _lora_config(tag_dir):
    from ds_moe_div.config import ExperimentConfig
    from ds_moe_div.config_loader import from_dict
    return from_dict(ExperimentConfig, rundir.read_run_config(tag_dir)["config"]).model.lora


def adapted_model(tag_dir, pretrained):
    """The run's model at EP=1 (a PretrainedMoELM with peft's layers), its adapters loaded from every rank."""
    from ds_moe_div.hf import autoep, lora
    from ds_moe_div.hf.model import PretrainedMoELM

    tag_dir = Path(tag_dir)
    model = PretrainedMoELM.from_pretrained(pretrained)
    model.hf_model.set_experts_implementation("eager")
    lora.prepare(model, _lora_config(tag_dir), ep_size=1, ep_rank=0, seed=0, verbose=False)
    lora_checkpoint.check_base(model, tag_dir)
    tensors = lora_checkpoint.read_adapters(tag_dir)
    if any(k.endswith(".expert_bias") for k in tensors):
        autoep.enable_expert_bias(model)
    lora_checkpoint.load_weights(model, tensors)
    return model.eval()


def merged_state(tag_dir, pretrained) -> dict:
    """Our EP=1 state dict with every adapter merged into the weight it adapts."""
    model = adapted_model(tag_dir, pretrained)
    merged = model.lora_peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def write_adapter(tag_dir, pretrained, out_dir) -> None:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for transformers' model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = _lora_config(tag_dir)
    if cfg.router != "frozen":
        raise LoraExportError(
            f"--adapter-only: this run trained the router (model.lora.router={cfg.router}); a PEFT adapter of "
            f"transformers' model cannot hold it (its router is not an nn.Linear peft adapts). Export it merged "
            f"(drop --adapter-only); nothing was written")
    model = adapted_model(tag_dir, pretrained)
    peft_cfg = model.lora_peft_config
    experts = "experts" in cfg.targets
    r, alpha = peft_cfg.r, peft_cfg.lora_alpha
    target = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=peft_cfg.lora_dropout,
                        target_modules=peft_cfg.target_modules, base_model_name_or_path=str(pretrained),
                        target_parameters=list(HF_EXPERT_PARAMETERS) if experts else None,
                        rank_pattern={"gate_up_proj": 2 * r} if experts else {},
                        alpha_pattern={"gate_up_proj": 2 * alpha} if experts else {})
    hf = AutoModelForCausalLM.from_pretrained(Path(pretrained), local_files_only=True)
    peft_hf = get_peft_model(hf, target)
    values = _attention_values(model)
    if experts:
        values.update(_expert_values(model, peft_hf))
    theirs = {k for k in peft_hf.state_dict() if ".lora_" in k}
    if set(values) != theirs:
        raise LoraExportError(f"--adapter-only: peft adapts other tensors of transformers' {hf.config.model_type} "
                              f"than this run trained: ours only {sorted(set(values) - theirs)[:4]}, theirs only "
                              f"{sorted(theirs - set(values))[:4]}. Export it merged (drop --adapter-only); "
                              f"nothing was written")
    peft_hf.load_state_dict(values, strict=False)
    peft_hf.save_pretrained(out_dir)
    (Path(out_dir) / "ds_moe_div_lora.json").write_text(json.dumps({"checkpoint": str(tag_dir)}, indent=2))


HF_EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _attention_values(model) -> dict:
    return {"base_model.model." + k: v for k, v in model.state_dict().items()
            if ".lora_" in k and ".mlp.experts." not in k}


def _by_parameter(model, prefix: str = "") -> dict:
    """{(experts module path without peft's nesting, adapted parameter name): ParamWrapper}."""
    from peft.tuners.lora.layer import ParamWrapper
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            root = name.split(".experts")[0] + ".experts"
            out[(root[len(prefix):], module.parameter_name)] = (name, module)
    return out


def _expert_values(model, peft_hf) -> dict:
    """transformers' fused expert adapters from ours (module docstring)."""
    import torch
    ours = _by_parameter(model)
    theirs = _by_parameter(peft_hf, prefix="base_model.model.")
    values = {}
    for (root, parameter), (name, wrapper) in theirs.items():
        get = {w: ours.get((root, w)) for w in ("w1", "w2", "w3")}
        if any(v is None for v in get.values()):
            continue  # reported by the caller's name comparison
        ab = {w: (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()) for w, (_, m) in get.items()}
        if parameter == "down_proj":
            a, b = ab["w2"]
        else:  # gate_up_proj: rank 2r, A stacked, B block-diagonal, per expert
            (a1, b1), (a3, b3) = ab["w1"], ab["w3"]
            num_experts = get["w1"][1].num_experts
            r, hidden, inter = a1.shape[0] // num_experts, a1.shape[1], b1.shape[0]
            a = torch.cat([a1.reshape(num_experts, r, hidden), a3.reshape(num_experts, r, hidden)], dim=1)
            a = a.reshape(num_experts * 2 * r, hidden)
            b = torch.zeros(2 * inter, 2 * r, num_experts, dtype=b1.dtype)
            b[:inter, :r] = b1.reshape(inter, r, num_experts)
            b[inter:, r:] = b3.reshape(inter, r, num_experts)
            b = b.reshape(2 * inter, 2 * r * num_experts)
        values[f"{name}.lora_A.default.weight"] = a.clone()
        values[f"{name}.lora_B.default.weight"] = b
    return values
