"""Load a Hugging Face MoE checkpoint from a local directory, after checking everything that can be checked
without reading a weight.

    config, family = read_config("models/tiny_olmoe")          # unsupported model_type refused here
    check_checkpoint("models/tiny_olmoe", config, family, ep_size=2)
    model = load_pretrained("models/tiny_olmoe", ep_size=2)     # both of the above, then transformers loads
    hf_model, experts = load_pretrained_sharded("models/tiny_olmoe", ep_size=2)  # both, then shard_load.py:
                                                                # each EP rank reads only its own experts

A directory holds config.json, `model.safetensors` or shards named by `model.safetensors.index.json`, and
tokenizer files. Checks, in order, each a `PretrainedLoadError` naming the file and the fix: the directory
and config.json exist; the model_type is one of the supported families; `num_experts % ep_size == 0`; the
index names only shards that exist; every shard's safetensors header is readable and the file is as long
as the header says (a truncated download fails here); every tensor whose name maps to a model parameter
has the shape the config implies (per-expert hub names included). Only headers are read (a few KB).
`load_pretrained` is transformers' whole-model loading (every expert on every rank; the reference);
`load_pretrained_sharded` (what `PretrainedMoELM.from_pretrained` uses) reads the weights shard by shard,
each EP rank only its own experts (hf/shard_load.py), with the same values.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

from ds_moe_div.hf.families import Family, family_of

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Hub per-expert names: ...experts.{e}.{gate_proj|up_proj|down_proj}.weight (Mixtral: w1 / w3 / w2).
_EXPERT = re.compile(r"^(?P<prefix>.*)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")


class PretrainedLoadError(ValueError):
    pass


def read_config(path) -> tuple[object, Family]:
    """The transformers config of the checkpoint in `path` and its family (model_type checked first)."""
    root = Path(path)
    config_file = root / "config.json"
    if not config_file.is_file():
        raise PretrainedLoadError(f"{root}: no config.json; model.pretrained must be a local Hugging Face model "
                                  f"directory (config.json + safetensors + tokenizer files)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PretrainedLoadError(f"{config_file}: not valid JSON ({e})") from None
    family = family_of(raw)
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(root, local_files_only=True), family


def shard_files(root: Path) -> list[Path]:
    """The safetensors files of the checkpoint: the shards its index names, or the single file."""
    index = root / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise PretrainedLoadError(f"{root}: shard(s) {missing} named in {INDEX} are missing; copy them "
                                      f"(the download is incomplete) or fix the index")
        return [root / n for n in names]
    if (root / SINGLE).is_file():
        return [root / SINGLE]
    raise PretrainedLoadError(f"{root}: neither {INDEX} nor {SINGLE}; only safetensors checkpoints are supported "
                              f"(convert .bin files with transformers' save_pretrained)")


def safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors header, checking the file holds all the data it declares."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PretrainedLoadError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise PretrainedLoadError(f"{path}: truncated or corrupt safetensors header (declares {n} bytes, file "
                                      f"has {size}); download the file again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PretrainedLoadError(f"{path}: corrupt safetensors header; download the file again") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + n + end > size:
        raise PretrainedLoadError(f"{path}: truncated safetensors file ({size} bytes, its header needs "
                                  f"{8 + n + end}); download the file again")
    return {k: tuple(v["shape"]) for k, v in tensors.items()}


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """In-memory parameter and buffer shapes of the model `config` describes (built on the meta device)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def disk_shape_expected(name: str, shapes: dict[str, tuple[int, ...]]) -> tuple[str, tuple[int, ...]] | None:
    """(in-memory name, expected shape) of a tensor stored under hub name `name`; None if it maps to nothing."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    match = _EXPERT.match(name)
    if match is None:
        return (name, shapes[name]) if name in shapes else None
    fused = f"{match['prefix']}.experts.gate_up_proj"
    if fused not in shapes:
        return None
    num_experts, two_i, hidden = shapes[fused]
    if int(match["e"]) >= num_experts:
        return fused, (num_experts, two_i, hidden)  # reported as an expert index out of range
    if match["proj"] in ("down_proj", "w2"):
        return f"{match['prefix']}.experts.down_proj", (hidden, two_i // 2)
    return fused, (two_i // 2, hidden)


def check_checkpoint(path, config, family: Family, *, ep_size: int = 1) -> list[Path]:
    """All checks of the module docstring; returns the shard files. Reads headers only."""
    root = Path(path)
    num_experts = family.num_experts(config)
    if ep_size < 1 or num_experts % ep_size:
        raise PretrainedLoadError(f"{root}: num_experts={num_experts} is not divisible by ep_size={ep_size}; choose "
                                  f"an ep_size (model.moe.ep_size / autoep_size) that divides {num_experts}")
    files = shard_files(root)
    shapes = expected_shapes(config)
    for file in files:
        for name, shape in safetensors_header(file).items():
            target = disk_shape_expected(name, shapes)
            if target is None:
                continue
            match = _EXPERT.match(name.replace(".block_sparse_moe.", ".mlp."))
            if match is not None and int(match["e"]) >= num_experts:
                raise PretrainedLoadError(f"{file}: {name} names expert {match['e']} but config.json has "
                                          f"{num_experts} experts; the weights do not belong to this config")
            if shape != target[1]:
                raise PretrainedLoadError(f"{file}: tensor {name} has shape {list(shape)} but config.json implies "
                                          f"{list(target[1])}; the weights do not belong to this config.json")
    return files


def load_pretrained(path, *, ep_size: int = 1, dtype: torch.dtype = torch.float32):
    """The transformers model in `path`, checked first (see the module docstring); eval mode, fp32 by default."""
    from transformers import AutoModelForCausalLM

    config, family = read_config(path)
    check_checkpoint(path, config, family, ep_size=ep_size)
    model = AutoModelForCausalLM.from_pretrained(Path(path), local_files_only=True, dtype=dtype,
                                                 attn_implementation="eager")
    return model.eval()


def load_pretrained_sharded(path, *, ep_size: int = 1, dtype: torch.dtype = torch.float32):
    """Checked like `load_pretrained`, then (transformers model without its routed experts, ExpertSource):
    see hf/shard_load.py. The experts are read into AutoEP's layers, each rank its own."""
    from ds_moe_div.hf.shard_load import load_sharded

    config, family = read_config(path)
    files = check_checkpoint(path, config, family, ep_size=ep_size)
    return load_sharded(path, config, family, files, dtype=dtype)


def load_tokenizer(path):
    """The checkpoint's own tokenizer (tokenizer.json / tokenizer_config.json in `path`)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(Path(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise PretrainedLoadError(f"{path}: no loadable tokenizer ({e}); copy the tokenizer files next to "
                                  f"config.json") from None
