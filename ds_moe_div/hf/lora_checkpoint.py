"""Checkpoints of a LoRA run (`model.lora`): only the trainable state, written by ds_moe_div itself.

    save(engine, tag_dir, client=client, rank=rank)   # every rank: lora_state_rank{r}.pt; rank 0: lora_base.json
    check_base(engine.module, tag_dir)                # a changed base model is refused (before anything loads)
    client = load(engine, tag_dir, rank=rank, module_only=False)
    adapters = read_adapters(tag_dir)                 # all experts' adapters in the EP=1 layout (export, eval)

Why not `engine.save_checkpoint`: DeepSpeed's AutoEP save writes the (frozen) experts `w1/w2/w3` per
expert and looks them up through `module.experts`, which peft's wrapper hides, and it does not write the
expert adapters, which live only on the rank that owns the experts. Here each rank writes, atomically
(fileio), the trainable tensors it holds, its optimizer state (ZeRO partitions included), the LR
scheduler and the engine's step counters; rank 0 adds the base model's directory and digest (sha256 of
config.json and every safetensors header: names, dtypes, shapes, offsets). A resume loads the same
shape (world size, ep_size: checked by checkpoint.check_shape); a weights-only load (eval, init_from)
reads every rank's expert adapters and takes this rank's experts, at any ep_size.

peft stores a 3-D weight's adapters as lora_A [r * E_local, in] (expert-major rows) and lora_B
[out, r * E_local] (column j * E_local + e): expert slices are taken along those layouts.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ds_moe_div import fileio, rundir
from ds_moe_div.rundir import CheckpointError

ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def is_lora(module) -> bool:
    return getattr(module, "lora_peft_config", None) is not None


def base_digest(pretrained) -> str:
    """sha256 over config.json and the safetensors headers of a Hugging Face directory (see module docstring)."""
    from ds_moe_div.hf.load import shard_files
    root = Path(pretrained)
    digest = hashlib.sha256((root / "config.json").read_bytes())
    for file in shard_files(root):
        with file.open("rb") as f:
            head = f.read(8)
            digest.update(file.name.encode() + head + f.read(int.from_bytes(head, "little")))
    return digest.hexdigest()


def _ep(module) -> dict:
    layer = module.moe_layers()[0]
    return {"ep_rank": layer.ep_rank, "ep_size": layer.ep_size, "num_experts": layer.num_experts,
            "num_local_experts": layer.num_local_experts}


def save(engine, tag_dir, *, client: dict, rank: int) -> None:
    tag_dir = Path(tag_dir)
    module = engine.module
    state = {"trainable": {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad},
             "buffers": {n: b.detach().clone() for n, b in module.named_buffers() if n.endswith(".expert_bias")},
             "optimizer": engine.optimizer.state_dict(),
             "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
             "engine": {k: getattr(engine, k) for k in ENGINE_COUNTERS}, "client": client, "ep": _ep(module)}
    with fileio.atomic_path(rundir.lora_state_path(tag_dir, rank)) as tmp:
        torch.save(state, tmp)
    if rank == 0:
        fileio.write_json(rundir.lora_base_path(tag_dir), {"pretrained": module.source,
                                                             "sha256": base_digest(module.source)})


def check_base(module, tag_dir) -> None:
    """Refuse a checkpoint of a LoRA run whose base model is not the one `module` was built from."""
    path = rundir.lora_base_path(tag_dir)
    if not is_lora(module):
        if path.is_file():
            raise CheckpointError(f"{tag_dir} holds only the LoRA adapters of a run on {module_source(path)}: set "
                                  f"model.lora as in its run_config.json, or export it merged (`export`) and use "
                                  f"the export as model.pretrained")
        return
    if not path.is_file():
        raise CheckpointError(f"{tag_dir} holds no {path.name}: it is not a checkpoint of a LoRA run; use a LoRA "
                              f"run's checkpoint, or drop model.lora to load it")
    saved = json.loads(path.read_text(encoding="utf-8"))
    ours = base_digest(module.source)
    if saved["sha256"] != ours:
        raise CheckpointError(f"{tag_dir} adapts the base model {saved['pretrained']} (sha256 {saved['sha256'][:12]}), "
                              f"but model.pretrained={module.source} differs (sha256 {ours[:12]}: its config.json or "
                              f"safetensors changed). Point model.pretrained at the base the run was trained on")


def module_source(path: Path) -> str:
    return json.loads(path.read_text(encoding="utf-8"))["pretrained"]


def load(engine, tag_dir, *, rank: int, module_only: bool) -> dict:
    """Resume (full state of this rank) or weights only (module_only: any ep_size). Returns the client state."""
    tag_dir = Path(tag_dir)
    module = engine.module
    if module_only:
        load_weights(module, read_adapters(tag_dir))
        return {}
    path = rundir.lora_state_path(tag_dir, rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: resume with the number of ranks the run was saved with")
    state = torch.load(path, map_location="cpu", weights_only=False)
    _copy_into(module, {**state["trainable"], **state["buffers"]}, None)
    optimizer = engine.optimizer
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2: this rank's partition, fp32 master
        optimizer.load_state_dict([state["optimizer"]] * engine.dp_world_size, load_optimizer_states=True,
                                  load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(state["optimizer"])
    if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for key, value in state["engine"].items():
        setattr(engine, key, value)
    return state["client"]


def load_weights(module, tensors: dict) -> None:
    """Adapters (and router, expert_bias) of `read_adapters` into `module`, at its own ep rank and size."""
    _copy_into(module, tensors, _ep(module))


def _copy_into(module, tensors: dict, ep: dict | None) -> None:
    """Copy `tensors` into `module`'s trainable parameters (and expert_bias buffers); with `ep` (a full,
    EP=1-layout set) expert adapters are sliced to this rank's experts. Every trainable tensor must be there."""
    targets = {n: p for n, p in module.named_parameters() if p.requires_grad}
    targets.update({n: b for n, b in module.named_buffers() if n.endswith(".expert_bias")})
    missing = sorted(n for n, p in targets.items() if n not in tensors and not n.endswith(".expert_bias"))
    if missing:
        raise CheckpointError(f"the checkpoint has no value for {missing[:4]} ({len(missing)} tensors): it was saved "
                              f"with other model.lora settings; use the run's own config")
    with torch.no_grad():
        for name, target in targets.items():
            if name not in tensors:
                continue
            value = tensors[name]
            if ep is not None and ".mlp.experts." in name and "lora_" in name:
                value = expert_slice(name, value, lo=ep["ep_rank"] * ep["num_local_experts"],
                                     count=ep["num_local_experts"], num_experts=ep["num_experts"])
            if value.shape != target.shape:
                raise CheckpointError(f"{name}: checkpoint shape {list(value.shape)}, model {list(target.shape)}; "
                                      f"the checkpoint was saved with other model.lora settings")
            target.copy_(value)


def expert_slice(name: str, value: torch.Tensor, *, lo: int, count: int, num_experts: int) -> torch.Tensor:
    """Experts [lo, lo + count) of an expert adapter holding `num_experts` experts (module docstring layouts)."""
    if ".lora_A." in name:
        r = value.shape[0] // num_experts
        return value[lo * r:(lo + count) * r]
    out, r = value.shape[0], value.shape[1] // num_experts
    return value.reshape(out, r, num_experts)[:, :, lo:lo + count].reshape(out, r * count)


def read_adapters(tag_dir) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the checkpoint, expert adapters of all EP ranks joined (EP=1 layout)."""
    tag_dir = Path(tag_dir)
    by_ep: dict[int, dict] = {}
    for path in sorted(tag_dir.glob("lora_state_rank*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        by_ep.setdefault(state["ep"]["ep_rank"], state)
    if not by_ep:
        raise CheckpointError(f"{tag_dir} holds no lora_state_rank*.pt: not a checkpoint of a LoRA run")
    ep = by_ep[min(by_ep)]["ep"]
    if sorted(by_ep) != list(range(ep["ep_size"])):
        raise CheckpointError(f"{tag_dir}: the files of EP ranks {sorted(set(range(ep['ep_size'])) - set(by_ep))} "
                              f"are missing; copy every rank's lora_state_rank*.pt into the checkpoint")
    first = by_ep[0]
    tensors = {**first["trainable"], **first["buffers"]}
    for name in first["trainable"]:
        if ".mlp.experts." in name and "lora_" in name:
            tensors[name] = join_experts(name, [by_ep[e]["trainable"][name] for e in range(ep["ep_size"])],
                                         num_local_experts=ep["num_local_experts"])
    return tensors


def join_experts(name: str, parts: list[torch.Tensor], *, num_local_experts: int) -> torch.Tensor:
    """The inverse of expert_slice: one expert adapter from the EP ranks' parts, in ep_rank order."""
    if ".lora_A." in name:
        return torch.cat(parts, dim=0)
    out, r = parts[0].shape[0], parts[0].shape[1] // num_local_experts
    return torch.cat([p.reshape(out, r, num_local_experts) for p in parts], dim=2).reshape(out, -1)
