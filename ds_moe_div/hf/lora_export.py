"""Export a checkpoint of a LoRA run (`model.lora`): merged into a plain Hugging Face model (default), or
the attention adapters as a PEFT adapter directory (`--adapter-only`).

    python -m ds_moe_div export runs/lora out/lora_hf                       # base + adapters merged
    python -m ds_moe_div export runs/lora out/lora_adapter --adapter-only   # PeftModel.from_pretrained(base, ...)

Merged: the base model is rebuilt from `model.pretrained` (its digest checked against the checkpoint's),
converted at EP=1, LoRA applied with the run's settings, every rank's adapters loaded
(lora_checkpoint.read_adapters), peft's `merge_and_unload`, then written like any imported model's
checkpoint (transformers' names, hub per-expert layout, tokenizer).

Adapter-only writes what peft can load onto transformers' own model: LoRA on the `self_attn`
projections. The routed experts' adapters are not representable there: ours adapt AutoEP's separate
w1 / w3 / w2 [E, out, in], transformers 5 fuses gate and up into one `gate_up_proj` parameter, and peft's
`target_parameters` adapter on it would be one rank-r product over the fused weight, not two. A run that
adapted experts, or trained or adapted the router, is refused with that reason (nothing is written):
export it merged instead.
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
    if "experts" in cfg.targets or cfg.router != "frozen":
        raise LoraExportError(
            f"--adapter-only: this run adapted {'the routed experts' if 'experts' in cfg.targets else ''}"
            f"{' and ' if 'experts' in cfg.targets and cfg.router != 'frozen' else ''}"
            f"{'the router (' + cfg.router + ')' if cfg.router != 'frozen' else ''}; a PEFT adapter on transformers' "
            f"model holds LoRA on the attention projections only (transformers fuses the experts' gate and up "
            f"weights, which our per-weight expert adapters cannot be written onto). Export it merged (drop "
            f"--adapter-only); nothing was written")
    model = adapted_model(tag_dir, pretrained)
    ours = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    hf = AutoModelForCausalLM.from_pretrained(Path(pretrained), local_files_only=True)
    peft_cfg = model.lora_peft_config
    target = LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.lora_alpha, lora_dropout=peft_cfg.lora_dropout,
                        target_modules=peft_cfg.target_modules, base_model_name_or_path=str(pretrained))
    peft_hf = get_peft_model(hf, target)
    theirs = {k: v for k, v in peft_hf.state_dict().items() if ".lora_" in k}
    mapped = {"base_model.model." + k: v for k, v in ours.items()}
    if set(mapped) != set(theirs):
        raise LoraExportError(f"adapter names differ from transformers' model: ours-only "
                              f"{sorted(set(mapped) - set(theirs))[:4]}, theirs-only {sorted(set(theirs) - set(mapped))[:4]}")
    peft_hf.load_state_dict(mapped, strict=False)
    peft_hf.save_pretrained(out_dir)
    (Path(out_dir) / "ds_moe_div_lora.json").write_text(json.dumps({"checkpoint": str(tag_dir)}, indent=2))
