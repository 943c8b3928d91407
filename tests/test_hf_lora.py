"""LoRA through peft on attention and AutoEP expert projections (one process, EP=1)."""
from __future__ import annotations

import pytest
import torch

from ds_moe_div.hf.lora import LoraTargetError, apply_lora, attention_linear_names
from tests import hf_fixtures
from tests.hf_fixtures import batch, reference_and_ours

tiny_dirs = hf_fixtures.tiny_dirs  # session fixture
pytestmark = pytest.mark.filterwarnings("ignore")
pytest.importorskip("peft")


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_lora_adapts_exactly_what_was_asked_and_merges_to_the_same_model(tiny_dirs, family, capsys):
    _, ours = reference_and_ours(tiny_dirs[family])
    ids, labels = batch(ours.config.vocab_size, seed=9)
    with torch.no_grad():
        base = ours.logits(ids)
    attention = attention_linear_names(ours)
    peft_model, adapted = apply_lora(ours, r=2, alpha=4)
    assert "LoRA r=2" in capsys.readouterr().out
    if family == "deepseek_v3":
        assert "kv_b_proj" in attention and "q_a_proj" in attention  # MLA's own names
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == set(adapted) and all("lora_" in n for n in adapted)
    assert sum(".mlp.experts." in n for n in adapted) == 2 * 3 * len(ours.moe_layers())
    for layer in ours.moe_layers():
        lora = [p for n, p in layer.experts.named_parameters() if "lora_" in n]
        assert len(lora) == 6 and all(p.allreduce is False and p.group_name == "ep_size_1" for p in lora)
    model = peft_model.base_model.model
    with torch.no_grad():
        assert torch.equal(model.logits(ids), base)  # B = 0 at start
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        adapted_logits = model.logits(ids)
    assert (adapted_logits - base).abs().max() > 1e-3
    out = model(ids, labels_BS=labels, collect_expert_outputs=True)
    out.lm_loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_A" in n)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if not p.requires_grad)
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        assert (merged.logits(ids) - adapted_logits).abs().max().item() < 1e-5


def test_router_full_and_bad_targets(tiny_dirs):
    _, ours = reference_and_ours(tiny_dirs["olmoe"])
    with pytest.raises(LoraTargetError, match=r"\['qkv'\] match no module.*q_proj"):
        apply_lora(ours, r=2, alpha=4, attention=("qkv",), verbose=False)
    _, ours = reference_and_ours(tiny_dirs["olmoe"])
    _, adapted = apply_lora(ours, r=2, alpha=4, attention=("o_proj",), router="full", verbose=False)
    assert sum(n.endswith("router.gate.weight") for n in adapted) == 2
    assert sum(".self_attn.o_proj.lora_" in n for n in adapted) == 2 * ours.config.num_hidden_layers
    assert not any(".q_proj." in n for n in adapted)


def test_router_lora_and_target_names(tiny_dirs):
    from ds_moe_div.hf.lora import resolve_targets
    _, ours = reference_and_ours(tiny_dirs["deepseek_v3"])
    assert resolve_targets(ours, ("kv_b_proj", "experts")) == (("kv_b_proj",), True)
    assert resolve_targets(ours, ("attention",))[0] == tuple(attention_linear_names(ours))
    with pytest.raises(LoraTargetError, match=r"targets \['qkv'\] match no module.*kv_b_proj"):
        resolve_targets(ours, ("qkv",))
    peft_model, adapted = apply_lora(ours, r=2, alpha=4, attention=(), experts=False, router="lora", verbose=False)
    assert sorted({n.split(".mlp.")[1] for n in adapted}) == ["router.gate.lora_A.default.weight",
                                                             "router.gate.lora_B.default.weight"]
    assert sum(".lora_A." in n for n in adapted) == len(ours.moe_layers())
    ids, labels = batch(ours.config.vocab_size, seed=9)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    out = ours(ids, labels_BS=labels)
    out.lm_loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_A" in n)
