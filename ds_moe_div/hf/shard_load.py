"""Load a checked Hugging Face MoE checkpoint shard by shard, each EP rank reading only its own experts.

    hf_model, experts = load_sharded("models/tiny_olmoe")    # everything but the routed experts, on CPU
    autoep.fill_experts_when_replaced(model, experts.fill)   # AutoEP's layers get their local slice
    deepspeed.initialize(model=model, config=ds)             # (PretrainedMoELM.from_pretrained does both)

Memory: the transformers model is built on the meta device (no weight allocated, as transformers' own
`from_pretrained` does); every non-expert tensor is then read from the memory-mapped safetensors, copied
into its own CPU tensor and the mapping dropped, one shard file at a time. The routed experts stay on the
meta device: AutoEP's `AutoEPMoELayer` slices them to the rank's experts without reading a value
(`repack_expert_weights` on meta tensors, into a `GroupedExperts` that hf/autoep.py has built on the meta
device too), and as each layer is built `ExpertSource.fill` reads exactly
that rank's experts (`safe_open(...).get_slice(name)[lo:hi]` for a fused file, the per-expert hub tensors
`...experts.{e}.gate_proj/up_proj/down_proj.weight` otherwise) into its `w1`/`w3`/`w2`. Other ranks'
experts are never read. Peak host memory is the rank's share plus one tensor in flight.

Values are bit-identical to transformers' loading followed by AutoEP's slicing: the same tensors are
copied (cast to `dtype` the same way), gate rows are `gate_up_proj[:, :I]` and up rows `[:, I:]` as in
AutoEP's repacking, and rotary buffers (the only non-persistent buffers of the six families) are
computed by the model's own `_init_weights`, which is what transformers runs after its meta-device build.
Every read is recorded in `ShardReader.reads` (name, expert rows or None) so a test can check that a rank
read no other rank's expert.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ds_moe_div.hf.load import PretrainedLoadError, safetensors_header

_PER_EXPERT = re.compile(r"^(?P<prefix>.*)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*)\.experts\.(?P<proj>gate_up_proj|down_proj)$")
_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def memory_name(disk_name: str) -> str:
    """transformers' in-memory name of a hub tensor name (Mixtral's `block_sparse_moe` is `mlp`)."""
    return disk_name.replace(".block_sparse_moe.", ".mlp.")


class ShardReader:
    """Reads named tensors from a checkpoint's safetensors files, memory-mapped; every returned tensor owns
    its memory and the mapping is closed before the next read."""

    def __init__(self, files: list[Path]) -> None:
        self.file_of: dict[str, Path] = {}
        for file in files:
            for name in safetensors_header(file):
                self.file_of[name] = file
        self.reads: list[tuple[str, tuple[int, int] | None]] = []

    def read(self, requests: list[tuple[str, tuple[int, int] | None]], *, dtype: torch.dtype):
        """Yield (request, tensor) for each (disk name, rows [lo, hi) of dim 0 or None for all), file by file."""
        from safetensors import safe_open

        by_file = defaultdict(list)
        for request in requests:
            by_file[self.file_of[request[0]]].append(request)
        for file in sorted(by_file):
            for name, rows in by_file[file]:
                # One mapping per tensor: an open file keeps every page read through it resident (and counted
                # in the process's RSS) until it is closed, so each is closed before the next tensor is read.
                with safe_open(str(file), framework="pt") as f:
                    view = f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0]:rows[1]]
                    value = view.to(dtype=dtype, copy=True)  # owns its memory
                    del view
                self.reads.append((name, rows))
                yield (name, rows), value
                del value


def _is_routed_expert(name: str) -> bool:
    return _FUSED.match(name) is not None


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, aliases: dict[int, list[tuple[nn.Module, str]]]):
    """Put `value` in place of the (meta) parameter or buffer `name` and of every alias of it (tied weights)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(leaf) if leaf in module._parameters else module._buffers[leaf]
    new = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
    for owner, attr in aliases.get(id(old), [(module, leaf)]):
        (owner._parameters if attr in owner._parameters else owner._buffers)[attr] = new


def _aliases(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    out = defaultdict(list)
    for module in model.modules():
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                out[id(tensor)].append((module, attr))
    return out


@dataclass
class ExpertSource:
    """Where each MoE block's routed experts live on disk; `fill` reads one AutoEP layer's local experts."""
    reader: ShardReader
    dtype: torch.dtype
    # block prefix (e.g. "model.layers.1.mlp") -> ("fused", {role: disk name}) or ("per_expert", {(e, role): name})
    blocks: dict[str, tuple[str, dict]] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)

    def fill(self, block_name: str, layer) -> None:
        """Give AutoEP layer `layer` (replacing `block_name`) its experts [ep_rank * E_local, +E_local)."""
        if block_name not in self.blocks:
            raise PretrainedLoadError(f"{block_name}: AutoEP replaced a block whose experts are not in the checkpoint")
        kind, names = self.blocks[block_name]
        experts = layer.experts
        e_local = experts.w1.shape[0]
        lo = layer.ep_rank * e_local
        w1, w2, w3 = (torch.empty(getattr(experts, w).shape, dtype=self.dtype) for w in ("w1", "w2", "w3"))
        if kind == "fused":
            requests = [(names["gate_up"], (lo, lo + e_local)), (names["down"], (lo, lo + e_local))]
            for (name, _), value in self.reader.read(requests, dtype=self.dtype):
                if name == names["down"]:
                    w2.copy_(value)
                else:  # AutoEP's gate_up_first layout: gate rows first, then up rows
                    half = value.shape[1] // 2
                    w1.copy_(value[:, :half])
                    w3.copy_(value[:, half:])
        else:
            requests = [(names[(e, role)], None) for e in range(lo, lo + e_local) for role in ("gate", "up", "down")]
            target = {names[(e, role)]: (dst, e - lo) for e in range(lo, lo + e_local)
                      for role, dst in (("gate", w1), ("up", w3), ("down", w2))}
            for (name, _), value in self.reader.read(requests, dtype=self.dtype):
                dst, i = target[name]
                dst[i].copy_(value)
        for attr, value in (("w1", w1), ("w2", w2), ("w3", w3)):
            # The same Parameter object, now holding the values: DeepSpeed has already recorded it (by id)
            # as the replacement of the block's source experts, to put it into the optimizer's groups.
            param = experts._parameters[attr]
            filled = nn.Parameter(value, requires_grad=param.requires_grad)
            filled.__dict__.update(param.__dict__)  # AutoEP's tags: allreduce, group_name, placement metadata
            torch.utils.swap_tensors(param, filled)
        self.pending.discard(block_name)


def _expert_blocks(disk_names: list[str], num_experts: int) -> dict[str, tuple[str, dict]]:
    per_expert: dict[str, dict] = defaultdict(dict)
    fused: dict[str, dict] = defaultdict(dict)
    for disk in disk_names:
        name = memory_name(disk)
        if (m := _PER_EXPERT.match(name)) is not None:
            per_expert[m["prefix"]][(int(m["e"]), _ROLE[m["proj"]])] = disk
        elif (m := _FUSED.match(name)) is not None:
            fused[m["prefix"]]["gate_up" if m["proj"] == "gate_up_proj" else "down"] = disk
    blocks = {}
    for prefix, names in fused.items():
        if set(names) != {"gate_up", "down"}:
            raise PretrainedLoadError(f"{prefix}.experts: the checkpoint has {sorted(names)} of the fused expert "
                                      f"tensors but needs gate_up_proj and down_proj")
        blocks[prefix] = ("fused", names)
    for prefix, names in per_expert.items():
        missing = [f"{e}.{role}" for e in range(num_experts) for role in ("gate", "up", "down") if (e, role) not in names]
        if missing:
            raise PretrainedLoadError(f"{prefix}.experts: expert tensor(s) {missing[:6]} missing from the checkpoint "
                                      f"(of {num_experts} experts x gate/up/down); the download is incomplete")
        blocks[prefix] = ("per_expert", names)
    return blocks


def load_sharded(path, config, family, files: list[Path], *, dtype: torch.dtype = torch.float32):
    """(transformers model with meta routed experts and every other tensor read, ExpertSource). `files` are
    the checked shard files (load.check_checkpoint)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    reader = ShardReader(files)
    blocks = _expert_blocks(list(reader.file_of), family.num_experts(config))
    state = model.state_dict(keep_vars=True)
    wanted = [(disk, None) for disk in reader.file_of if memory_name(disk) in state
              and not _is_routed_expert(memory_name(disk))]
    aliases = _aliases(model)
    with torch.no_grad():
        for (disk, _), value in reader.read(wanted, dtype=dtype):
            _set_tensor(model, memory_name(disk), value, aliases)
        _materialise_non_persistent_buffers(model)
    missing = [n for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
               if t.is_meta and not (_is_routed_expert(n) and _FUSED.match(n)["prefix"] in blocks)]
    if missing:
        raise PretrainedLoadError(f"{path}: tensor(s) {missing[:6]} of the {config.model_type} model are missing "
                                  f"from the checkpoint; the download is incomplete or the weights belong to "
                                  f"another config")
    return model.eval(), ExpertSource(reader=reader, dtype=dtype, blocks=blocks, pending=set(blocks))


def _materialise_non_persistent_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary `inv_freq`) are not on disk: recompute them on CPU with the model's own
    `_init_weights`, as transformers does after building on the meta device."""
    for module in model.modules():
        meta = [b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None
                and module._buffers[b].is_meta]
        if not meta:
            continue
        for b in meta:
            module._buffers[b] = torch.empty_like(module._buffers[b], device="cpu")
        model._init_weights(module)
