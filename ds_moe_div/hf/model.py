"""A pretrained Hugging Face MoE as a ds_moe_div language model: same call, same typed output as
`ds_moe_div.model.MoELanguageModel`, so the trainer, composer, statistics and evaluation see no difference.

    model = PretrainedMoELM.from_pretrained("models/tiny_olmoe", ep_size=2)  # checked; experts not read yet
    engine = deepspeed.initialize(model=model, config=with_autoep(ds, model, ep_size=2), ...)[0]
    model.attach_routing()                                           # after AutoEP replaced the MoE blocks
    out = model(input_ids_BS, labels_BS=labels, collect_expert_outputs=True)
    out.lm_loss, out.routing[0].probs_TE

Module names are transformers' (`model.*`, `lm_head.*`): the backbone and head are the transformers
model's own modules, so AutoEP's presets match `model.layers.N.mlp`, and `hf_model` (the transformers
model object, sharing every module) still runs `generate` and transformers' own forward (once converted).

Loading is shard by shard (hf/shard_load.py): the routed experts are read only when AutoEP builds its layers
inside `deepspeed.initialize` (or `convert`), each rank its own experts; peak host memory is the rank's share
of the weights (`python scripts/bench_hf.py --memory` prints it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds_moe_div.data.loader import IGNORE_INDEX
from ds_moe_div.hf import autoep
from ds_moe_div.hf.families import Family, family_of
from ds_moe_div.hf.load import load_pretrained, load_pretrained_sharded
from ds_moe_div.model import ModelOutput


class PretrainedMoELM(nn.Module):
    base_model_prefix = "model"  # transformers' name of the backbone (peft's conversion mapping reads it)

    def __init__(self, hf_model, *, family: Family | None = None, source: str | None = None) -> None:
        super().__init__()
        self.model = hf_model.model
        self.lm_head = hf_model.lm_head
        self.config = hf_model.config  # AutoEP reads model.config (num_experts, top_k, group routing)
        self.family = family or family_of(hf_model.config)
        self.source = source
        object.__setattr__(self, "hf_model", hf_model)  # not a submodule: its modules are ours already

    @classmethod
    def from_pretrained(cls, path, *, ep_size: int = 1, sharded: bool = True) -> PretrainedMoELM:
        """The checkpoint in `path`, checked first (hf/load.py). `sharded` (default): everything but the routed
        experts is read now; each rank's experts are read into AutoEP's layers as `deepspeed.initialize` (or
        `convert`) builds them, and no rank reads another's (hf/shard_load.py). `sharded=False`: transformers
        loads every expert on every rank and AutoEP slices them (same values, the whole model in memory)."""
        if not sharded:
            return cls(load_pretrained(path, ep_size=ep_size), source=str(path))
        hf_model, experts = load_pretrained_sharded(path, ep_size=ep_size)
        model = cls(hf_model, source=str(path))
        object.__setattr__(model, "expert_source", experts)  # its reader records what was read
        autoep.fill_experts_when_replaced(model, experts.fill)
        return model

    def _apply(self, fn, recurse=True):
        """`.to()`, `.float()`, ... (DeepSpeed's engine moves the module after building its layers): refused
        while routed experts still wait on the meta device for AutoEP to build the layers that read them."""
        source = getattr(self, "expert_source", None)
        if source is not None and source.pending:
            raise RuntimeError(f"the routed experts of {self.source} are read when AutoEP builds its layers, which "
                               f"has not happened yet ({len(source.pending)} MoE blocks pending): pass "
                               f"model.autoep_block(ep_size=...) as the ds_config expert_parallel block to "
                               f"deepspeed.initialize, or call model.convert(), first")
        return super()._apply(fn, recurse)

    @property
    def num_experts(self) -> int:
        return self.family.num_experts(self.config)

    @property
    def k(self) -> int:
        return self.family.top_k(self.config)

    def autoep_block(self, *, ep_size: int) -> dict:
        return autoep.autoep_block(self.family, self.config, ep_size=ep_size)

    def convert(self, *, ep_size: int = 1, ep_rank: int = 0) -> None:
        """Replace the MoE blocks without a DeepSpeed engine (one process), then attach routing."""
        autoep.convert(self, self.family, ep_size=ep_size, ep_rank=ep_rank)
        self.attach_routing()

    def attach_routing(self) -> None:
        autoep.attach_routing(self)

    def moe_layers(self) -> list:
        return autoep.moe_layers(self)

    def enable_activation_checkpointing(self) -> None:
        """transformers' per-layer recomputation (non-reentrant); routing records come from the first
        forward only (the recomputation runs outside `routing_capture`)."""
        self.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def end_of_step(self) -> torch.Tensor:
        """Called once per optimizer step: AutoEP's accumulated [L, E] token counts, then reset."""
        return autoep.take_tokens_per_expert(self)

    def forward(self, input_ids_BS: torch.Tensor, *, labels_BS: torch.Tensor,
                collect_expert_outputs: bool = False) -> ModelOutput:
        if not self.moe_layers():
            raise RuntimeError("PretrainedMoELM runs through AutoEP layers: pass autoep_block() as the ds_config "
                               "expert_parallel block to deepspeed.initialize, or call convert(), first")
        with autoep.routing_capture(self, collect_expert_outputs=collect_expert_outputs) as records:
            hidden_BSM = self.model(input_ids=input_ids_BS, use_cache=False).last_hidden_state
        logits_BSV = self.lm_head(hidden_BSM).float()
        nll = F.cross_entropy(logits_BSV.flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="none").view_as(labels_BS)
        num_targets = (labels_BS != IGNORE_INDEX).sum().clamp(min=1)
        return ModelOutput(lm_loss=nll.sum() / num_targets, token_nll_BS=nll, routing=tuple(records))

    def logits(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """[B, S, V] logits (no routing capture): what transformers' forward returns."""
        return self.lm_head(self.model(input_ids=input_ids_BS, use_cache=False).last_hidden_state)
