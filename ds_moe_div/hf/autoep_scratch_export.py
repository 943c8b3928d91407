"""Export a checkpoint of a from-scratch AutoEP model (`model.backend: "autoep"`) to a Hugging Face directory.

    python -m ds_moe_div export runs/tiny_autoep out/tiny_hf        # the same command as imported models
    python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('out/tiny_hf').generate(...)"

There is no source directory to copy from: the transformers config is rebuilt from the checkpoint's
run_config.json (`ds_moe_div.hf.scratch.scratch_config`, the function the run was built with), the
tokenizer is the checkpoint's own tokenizer.json (wrapped as a fast tokenizer with its <|pad|> and
<|eos|>), and generation_config.json names those ids. Weights are read, renamed and written exactly as for
imported models (`ds_moe_div.hf.export`), experts gathered from every EP rank's per-expert files. (Native
from-scratch checkpoints export as Mixtral through `ds_moe_div.hf.scratch_export`.)
"""
from __future__ import annotations

from pathlib import Path

from ds_moe_div import rundir
from ds_moe_div.config import ExperimentConfig
from ds_moe_div.config_loader import from_dict
from ds_moe_div.hf.autoep import to_hf_state_dict
from ds_moe_div.hf.export import ExportError, build_hf_model, check_target, read_checkpoint_state
from ds_moe_div.hf.export import _write as write_hf_dir
from ds_moe_div.hf.families import FAMILIES
from ds_moe_div.hf.scratch import scratch_config


def scratch_hf_config(tag_dir: Path):
    """(transformers config, tokenizer.json path) of a from-scratch AutoEP checkpoint."""
    from ds_moe_div.data.tokenize import load_tokenizer, special_ids

    run_config = rundir.read_run_config(tag_dir)
    cfg = from_dict(ExperimentConfig, run_config["config"])
    if cfg.model.backend != "autoep" or cfg.model.pretrained:
        raise ExportError(f"{tag_dir} is not a checkpoint of a from-scratch model.backend='autoep' model")
    tokenizer_file = rundir.tokenizer_path(tag_dir)
    if not tokenizer_file.is_file():
        raise ExportError(f"{tokenizer_file} is missing: the checkpoint was saved without its tokenizer, which the "
                          f"exported directory needs; copy the run's data tokenizer.json there")
    pad_id, eos_id = special_ids(load_tokenizer(tokenizer_file))
    hf_config = scratch_config(cfg.model, vocab_size=int(run_config["architecture"]["vocab_size"]),
                               seq_len=cfg.data.seq_len, pad_id=pad_id, eos_id=eos_id)
    return hf_config, tokenizer_file


def export_scratch(tag_dir, out_dir, *, overwrite: bool = False, max_shard_size: str = "2GB") -> Path:
    """Write the from-scratch AutoEP checkpoint in `tag_dir` as a Hugging Face directory `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    from ds_moe_div.data.tokenize import EOS, PAD

    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    check_target(out_dir, overwrite=overwrite)
    hf_config, tokenizer_file = scratch_hf_config(tag_dir)
    family = FAMILIES[hf_config.model_type]
    state = read_checkpoint_state(tag_dir, num_experts=family.num_experts(hf_config))
    model = build_hf_model(hf_config, to_hf_state_dict(state, family))
    model.generation_config.pad_token_id = hf_config.pad_token_id
    model.generation_config.eos_token_id = hf_config.eos_token_id
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=EOS, pad_token=PAD)
    return write_hf_dir(model, out_dir, max_shard_size, tokenizer.save_pretrained)
