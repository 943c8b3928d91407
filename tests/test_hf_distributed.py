"""Imported models on 2 gloo ranks with EP=2 and ZeRO-2 equal one process, and export gathers every rank's
experts. One spawn covers all six families to keep CI lean.

Per family, each rank runs one micro-batch (half of the global batch) through `deepspeed.initialize` with
the family's AutoEP block, a loss that uses every part of the routing record (LM + DeepSpeed l_aux +
orthogonality of the unweighted expert outputs), and one SGD step (lr 1 after clipping the global gradient
norm to 1: the update is the averaged, clipped gradient, its norm counting each expert once). The
reference is one process without DeepSpeed on the whole batch. Then the checkpoint saved at EP=2 (each
rank writing its own experts) is exported and reloaded in plain transformers.
"""
from __future__ import annotations

import json

import pytest
import torch

from ds_moe_div.hf import autoep
from ds_moe_div.hf.export import export_checkpoint
from ds_moe_div.hf.families import SUPPORTED
from ds_moe_div.hf.load import load_pretrained
from ds_moe_div.hf.model import PretrainedMoELM
from ds_moe_div.objectives import orthogonality_loss
from tests import hf_fixtures
from tests.dist_utils import run_on_ranks
from tests.hf_fixtures import batch

tiny_dirs = hf_fixtures.tiny_dirs  # session fixture
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
CLIP = 1.0  # the global gradient norm counts each expert once across EP ranks
ZERO2 = {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True, "overlap_comm": False}


def _objective(out) -> torch.Tensor:
    l_aux = torch.stack([r.l_aux for r in out.routing]).mean()
    ortho = torch.stack([orthogonality_loss(outputs_TKM=r.expert_outputs_TKM, kept_TK=r.kept_TK, mask_T=None,
                                            form="pairwise", eps=1e-6, reduction="mean") for r in out.routing]).mean()
    return out.lm_loss + 0.01 * l_aux + 0.1 * ortho


def _family_step_on_ranks(rank, world_size, dirs, ckpt_root):
    import deepspeed
    results = {}
    for family, path in dirs.items():
        model = PretrainedMoELM.from_pretrained(path, ep_size=2)
        model.hf_model.set_experts_implementation("eager")
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "gradient_clipping": CLIP,
              "zero_optimization": ZERO2, "zero_allow_untested_optimizer": True,
              "expert_parallel": model.autoep_block(ep_size=2)}
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=list(model.parameters()), config=ds,
            optimizer=autoep.moe_optimizer(lambda groups: torch.optim.SGD(groups, lr=1.0)))
        model.attach_routing()
        ids, labels = batch(model.config.vocab_size, seed=7, shape=(4, 16))
        half = slice(2 * rank, 2 * rank + 2)
        out = engine(ids[half], labels_BS=labels[half], collect_expert_outputs=True)
        loss = _objective(out)
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint(f"{ckpt_root}/{family}", tag="step1")
        with torch.no_grad():
            logits = model.logits(ids)  # both ranks take part in the all-to-all
        layer = model.moe_layers()[0]
        results[family] = {"loss": loss.item(), "logits": logits, "state": {k: v.detach().clone() for k, v in
                                                                              model.state_dict().items()},
                           "local_experts": (layer.ep_rank * layer.num_local_experts, layer.num_local_experts)}
    return results


def _reference_step(path) -> tuple[float, PretrainedMoELM]:
    model = PretrainedMoELM.from_pretrained(path)
    model.hf_model.set_experts_implementation("eager")
    model.convert()
    model.train()
    ids, labels = batch(model.config.vocab_size, seed=7, shape=(4, 16))
    losses = [_objective(model(ids[h], labels_BS=labels[h], collect_expert_outputs=True))
              for h in (slice(0, 2), slice(2, 4))]
    (0.5 * (losses[0] + losses[1])).backward()  # DeepSpeed averages gradients over the 2 data-parallel ranks
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), CLIP)
    with torch.no_grad():
        for p in model.parameters():
            p -= p.grad
    return [x.item() for x in losses], model


@pytest.fixture(scope="module")
def two_rank_run(tiny_dirs, tmp_path_factory):
    ckpt_root = tmp_path_factory.mktemp("hf_ckpt")
    ranks = run_on_ranks(_family_step_on_ranks, world_size=2, timeout=600,
                         args=({f: str(p) for f, p in tiny_dirs.items()}, str(ckpt_root)))
    return ranks, ckpt_root


@pytest.mark.parametrize("family", SUPPORTED)
def test_ep2_zero2_step_equals_one_process(two_rank_run, tiny_dirs, family):
    ranks, _ = two_rank_run
    ref_losses, ref = _reference_step(tiny_dirs[family])
    for rank, result in enumerate(ranks):
        assert result[family]["loss"] == pytest.approx(ref_losses[rank], rel=1e-5)
    ref_state = ref.state_dict()
    for name, value in ref_state.items():
        if name.endswith("tokens_per_expert"):
            continue
        if name.endswith((".experts.w1", ".experts.w2", ".experts.w3")):
            got = torch.cat([r[family]["state"][name] for r in ranks])  # rank r holds experts [r*E/2, (r+1)*E/2)
        else:
            got = ranks[0][family]["state"][name]
            torch.testing.assert_close(ranks[1][family]["state"][name], got, rtol=0, atol=0)
        scale = value.abs().max().item()
        assert (got - value).abs().max().item() <= 1e-5 * max(scale, 1e-6), name


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "deepseek_v3"])
def test_export_of_an_ep2_checkpoint_reloads_with_the_same_logits(two_rank_run, tiny_dirs, family, tmp_path):
    ranks, ckpt_root = two_rank_run
    out = export_checkpoint(ckpt_root / family / "step1", tmp_path / "hf", pretrained=tiny_dirs[family],
                            max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    expert_keys = [k for k in index["weight_map"] if ".experts." in k]
    assert expert_keys and all(k.endswith(".weight") for k in expert_keys)  # hub per-expert layout
    if family == "deepseek_v3":
        assert any(k.endswith("e_score_correction_bias") for k in index["weight_map"])
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    reloaded = load_pretrained(out)
    reloaded.set_experts_implementation("eager")
    ids, _ = batch(reloaded.config.vocab_size, seed=7, shape=(4, 16))
    with torch.no_grad():
        logits = reloaded(ids).logits
    assert (logits - ranks[0][family]["logits"]).abs().max().item() <= 1e-5
