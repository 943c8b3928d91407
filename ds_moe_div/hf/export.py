"""Export a ds_moe_div checkpoint of an imported model to a Hugging Face directory transformers loads as is.

    python -m ds_moe_div export runs/olmoe_lo out/olmoe_lo_hf [--overwrite] [--max-shard-size 2GB]
    python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('out/olmoe_lo_hf')"

A checkpoint of a from-scratch model (native DeepSpeed-MoE layers) is written as a Mixtral (see
scratch_export.py); one of `model.backend: "autoep"` as its own family (autoep_scratch_export.py). For an imported model, reads DeepSpeed's files directly in one process: the non-expert weights from `mp_rank_00_model_states.pt`
and every routed expert from the per-expert files `layer_{L}_expert_{E}_mp_rank_00_model_states.pt` that
each EP rank wrote for its own experts, so a checkpoint saved at any `autoep_size` exports complete
(DeepSpeed's `save_16bit_model` under AutoEP keeps only rank 0's experts). Names go back to transformers'
(`ds_moe_div.hf.autoep.to_hf_state_dict`; a Loss-Free Balancing bias folded into DeepSeek-V3's
`e_score_correction_bias`) and transformers writes the files: config.json, sharded safetensors with
their index, experts in the hub's per-expert layout (`save_original_format=True`, explicitly),
generation_config.json, and the checkpoint's tokenizer. Output is written to a temporary directory
beside the target and moved into place at the end; a non-empty target is refused unless `overwrite`.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import torch

from ds_moe_div import rundir
from ds_moe_div.cli import prog
from ds_moe_div.hf import lora_export
from ds_moe_div.hf.autoep import to_hf_state_dict
from ds_moe_div.hf.load import read_config

_EXPERT_KEY = re.compile(r"^(?P<base>.*\.experts\.w[123])\.(?P<e>\d+)$")


class ExportError(ValueError):
    pass


def read_checkpoint_state(tag_dir: Path, *, num_experts: int) -> dict[str, torch.Tensor]:
    """The full model state dict (all experts stacked, EP=1 layout) of a DeepSpeed AutoEP checkpoint."""
    main = tag_dir / "mp_rank_00_model_states.pt"
    if not main.is_file():
        raise ExportError(f"{main} is missing: not a DeepSpeed checkpoint directory")
    state = dict(torch.load(main, map_location="cpu", weights_only=False)["module"])
    experts: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for file in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        for key, value in torch.load(file, map_location="cpu", weights_only=False).items():
            match = _EXPERT_KEY.match(key)
            if match:
                experts[match["base"]][int(match["e"])] = value
    for base, by_id in experts.items():
        missing = sorted(set(range(num_experts)) - set(by_id))
        if missing:
            raise ExportError(f"{tag_dir}: no checkpoint file holds experts {missing} of {base}; every EP rank's "
                              f"layer_*_expert_* files must be in the checkpoint directory")
        state[base] = torch.stack([by_id[e] for e in range(num_experts)])
    if not experts:
        raise ExportError(f"{tag_dir}: no per-expert files (layer_*_expert_*): not a checkpoint of an imported model")
    return state


def build_hf_model(hf_config, hf_state: dict[str, torch.Tensor]):
    """A transformers model of `hf_config` holding `hf_state` (strict: every tensor accounted for)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    result = model.load_state_dict(hf_state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"checkpoint and {hf_config.model_type} config disagree: missing {result.missing_keys[:8]}, "
                          f"unexpected {result.unexpected_keys[:8]}")
    return model


def check_target(out_dir: Path, *, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; choose another directory or pass --overwrite "
                          f"(nothing was written)")


def export_checkpoint(tag_dir, out_dir, *, pretrained, overwrite: bool = False, max_shard_size: str = "2GB") -> Path:
    """Write the checkpoint in `tag_dir` (of a model imported from `pretrained`) as a HF directory `out_dir`."""
    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    check_target(out_dir, overwrite=overwrite)
    hf_config, family = read_config(pretrained)
    if lora_export.is_lora_checkpoint(tag_dir):  # a LoRA run: base + adapters, merged (hf/lora_export.py)
        state = lora_export.merged_state(tag_dir, pretrained)
    else:
        state = read_checkpoint_state(tag_dir, num_experts=family.num_experts(hf_config))
    model = build_hf_model(hf_config, to_hf_state_dict(state, family))
    return _write(model, out_dir, max_shard_size, lambda tmp: _copy_tokenizer_and_generation(Path(pretrained), tmp))


def export_adapter(tag_dir, out_dir, *, pretrained, overwrite: bool = False) -> Path:
    """A LoRA run's checkpoint as a PEFT adapter directory (see lora_export.py for what it can hold)."""
    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    check_target(out_dir, overwrite=overwrite)
    if not pretrained or not lora_export.is_lora_checkpoint(tag_dir):
        raise ExportError(f"--adapter-only needs a checkpoint of a LoRA run (model.lora); {tag_dir} is not one")
    return _write(None, out_dir, "", lambda tmp: lora_export.write_adapter(tag_dir, pretrained, tmp))


def export_scratch_checkpoint(tag_dir, out_dir, *, overwrite: bool = False, max_shard_size: str = "2GB") -> Path:
    """Write a checkpoint of a from-scratch model (native DeepSpeed-MoE) as a Mixtral directory (see
    scratch_export.py for what is refused), with the run's tokenizer."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from ds_moe_div.config import ExperimentConfig
    from ds_moe_div.config_loader import from_dict
    from ds_moe_div.data.tokenize import EOS, PAD
    from ds_moe_div.hf.scratch_export import mixtral_config, mixtral_state_dict, read_native_checkpoint

    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    check_target(out_dir, overwrite=overwrite)
    saved = rundir.read_run_config(tag_dir)
    cfg = from_dict(ExperimentConfig, saved["config"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(rundir.tokenizer_path(tag_dir)), eos_token=EOS,
                                        pad_token=PAD)
    hf_config = mixtral_config(cfg.model, vocab_size=int(saved["architecture"]["vocab_size"]),
                               seq_len=cfg.data.seq_len, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    model = build_hf_model(hf_config, mixtral_state_dict(read_native_checkpoint(tag_dir), cfg.model))
    generation = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    def extras(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp)
        generation.save_pretrained(tmp)
    return _write(model, out_dir, max_shard_size, extras)


def _write(model, out_dir: Path, max_shard_size: str, extras) -> Path:
    """save_pretrained (hub per-expert layout, explicitly) + extras into a temporary sibling, then move it."""
    tmp = out_dir.parent / f".{out_dir.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if model is not None:
            model.save_pretrained(tmp, max_shard_size=max_shard_size, save_original_format=True)
        extras(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _copy_tokenizer_and_generation(pretrained: Path, out: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig
    AutoTokenizer.from_pretrained(pretrained, local_files_only=True).save_pretrained(out)
    if (pretrained / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(pretrained, local_files_only=True).save_pretrained(out)


def resolve(path) -> tuple[Path, str | None]:
    """(checkpoint tag dir, the model.pretrained it was trained from, None for a from-scratch model)."""
    root, tag = rundir.resolve_checkpoint(path)
    tag_dir = root / tag
    return tag_dir, rundir.read_run_config(tag_dir)["config"]["model"].get("pretrained")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=prog("export"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one checkpoint tag dir")
    parser.add_argument("out_dir", help="Hugging Face directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    parser.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    parser.add_argument("--pretrained", help="the base model directory, if it moved since training")
    parser.add_argument("--adapter-only", action="store_true",
                        help="LoRA runs: write a PEFT adapter directory (attention adapters) instead of merging")
    args = parser.parse_args(argv)
    try:
        tag_dir, pretrained = resolve(args.checkpoint)
        if args.adapter_only:
            out = export_adapter(tag_dir, args.out_dir, pretrained=args.pretrained or pretrained,
                                 overwrite=args.overwrite)
        elif pretrained or args.pretrained:
            out = export_checkpoint(tag_dir, args.out_dir, pretrained=args.pretrained or pretrained,
                                    overwrite=args.overwrite, max_shard_size=args.max_shard_size)
        elif rundir.read_run_config(tag_dir)["config"]["model"].get("backend") == "autoep":
            from ds_moe_div.hf.autoep_scratch_export import export_scratch
            out = export_scratch(tag_dir, args.out_dir, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
        else:
            out = export_scratch_checkpoint(tag_dir, args.out_dir, overwrite=args.overwrite,
                                            max_shard_size=args.max_shard_size)
    except (ExportError, rundir.CheckpointError, ValueError, lora_export.LoraExportError) as e:
        print(f"ds_moe_div export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {tag_dir} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
