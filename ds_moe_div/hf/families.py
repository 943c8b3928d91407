"""The Hugging Face MoE families ds_moe_div imports, trains and exports, and what differs between them.

    fam = family_of(config)                 # refuses an unsupported model_type, naming the supported ones
    fam.autoep_block(ep_size=2)             # the ds_config "expert_parallel" block for this family

Facts measured on transformers 5.22.2 (measured per family when this module was written): every family keeps its MoE
block at `model.layers.{i}.mlp`, its router at `mlp.gate` (a `[E, H]` weight) and its routed experts as
fused 3-D parameters `mlp.experts.gate_up_proj [E, 2I, H]` / `mlp.experts.down_proj [E, H, I]` in memory
(per expert on disk). Values are read through the config object (its `attribute_map`), never raw JSON.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Family:
    model_type: str
    score_func: Literal["softmax", "sigmoid"]
    # AutoEP preset of DeepSpeed 0.19.8, or None: the family goes through AutoEP's custom pattern keys.
    autoep_preset: str | None
    num_experts_attr: str  # config attribute holding the number of routed experts
    expert_width_attr: str  # config attribute holding the expert width I
    shared_experts: str | None  # child of the MoE block holding shared experts (kept as they are by AutoEP)
    has_hf_aux_loss: bool  # transformers computes `aux_loss` with output_router_logits
    # Top-k weights renormalised: True/False, or the name of the config flag that decides.
    route_norm: bool | str

    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_attr))

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)

    def expert_width(self, config) -> int:
        return int(getattr(config, self.expert_width_attr))

    def autoep_block(self, *, ep_size: int, config=None) -> dict:
        """The ds_config `expert_parallel` block that makes DeepSpeed replace this family's MoE blocks.

        score_apply "post": the router weights multiply expert outputs after the experts (as transformers
        does); the routing adapter relies on it to see each expert's unweighted output."""
        block = {"enabled": True, "autoep_size": ep_size, "score_apply": "post"}
        if self.autoep_preset is not None:
            return {**block, "preset_model": self.autoep_preset}
        route_norm = self.route_norm if isinstance(self.route_norm, bool) else bool(getattr(config, self.route_norm))
        return {**block, "moe_layer_pattern": r"model\.layers\.\d+\.mlp", "router_pattern": "gate",
                "expert_pattern": "experts", "expert_w1": "gate_up_proj", "expert_w2": "down_proj",
                "expert_w3": None, "num_experts_attr": self.num_experts_attr, "top_k_attr": "num_experts_per_tok",
                "score_func": self.score_func, "route_norm": route_norm}


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("mixtral", "softmax", "mixtral", "num_local_experts", "intermediate_size", None, True, True),
    Family("qwen2_moe", "softmax", "qwen3_moe", "num_experts", "moe_intermediate_size", "shared_expert", True,
           "norm_topk_prob"),
    # Not an AutoEP preset in DeepSpeed 0.19.8: replaced through the custom pattern keys.
    Family("olmoe", "softmax", None, "num_experts", "intermediate_size", None, True, "norm_topk_prob"),
    Family("qwen3_moe", "softmax", "qwen3_moe", "num_experts", "moe_intermediate_size", None, True, "norm_topk_prob"),
    # Never renormalised (norm_topk_prob is ignored); x routed_scaling_factor; group-limited by each group's max.
    Family("deepseek_v2", "softmax", "deepseek_v2", "n_routed_experts", "moe_intermediate_size", "shared_experts",
           False, False),
    # Sigmoid; selection on score + e_score_correction_bias, group score = sum of its top-2.
    Family("deepseek_v3", "sigmoid", "deepseek_v3", "n_routed_experts", "moe_intermediate_size", "shared_experts",
           False, "norm_topk_prob"),
)}
SUPPORTED = tuple(FAMILIES)


class UnsupportedModelError(ValueError):
    pass


def family_of(config) -> Family:
    """The family of a transformers config (or a config.json dict); refuses anything not in FAMILIES."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; ds_moe_div imports the MoE families "
            f"{', '.join(SUPPORTED)}. Convert the checkpoint to one of them or use a from-scratch model "
            f"(drop model.pretrained). No weight was read.")
    return FAMILIES[model_type]
