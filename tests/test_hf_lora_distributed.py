"""LoRA at EP=2 on 2 gloo ranks (ZeRO-2) equals one process: expert adapters are expert-parallel, so their
gradients are reduced only over the expert's data-parallel group (here: no other rank), the attention
adapters and the router over all ranks. A wrong group (all ranks) would average the gradients of different
experts' adapters and fail the comparison.

Each rank runs half the batch through the trainer's LoRA path (hf/lora.prepare with this rank's experts,
engine_view, no expert_parallel block) with router="full" and nonzero lora_B (so lora_A gets gradients too),
one SGD step (lr 1 after clipping the global norm to 1); the reference is one process at EP=1 on the whole
batch. Every rank then writes its LoRA checkpoint file; joined (lora_checkpoint.read_adapters) they equal
the reference's adapters. In the same spawn, a 2-step trainer run with `model.lora` at EP=2 is saved,
resumed, and its checkpoint exported merged.
"""
from __future__ import annotations

import pytest
import torch

from ds_moe_div.config import LoraConfig
from ds_moe_div.hf.lora_checkpoint import expert_slice, read_adapters
from tests import hf_fixtures
from tests.dist_utils import run_on_ranks
from tests.hf_fixtures import batch

tiny_dirs = hf_fixtures.tiny_dirs  # session fixture
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
pytest.importorskip("peft")
CLIP = 1.0
LORA = LoraConfig(r=2, alpha=4.0, targets=("attention", "experts"), router="full")
FAMILY = "deepseek_v3"  # shared experts, group-limited sigmoid routing, MLA attention


def _model(path, *, ep_size: int, ep_rank: int):
    from ds_moe_div.hf import lora
    from ds_moe_div.hf.model import PretrainedMoELM
    model = PretrainedMoELM.from_pretrained(path, ep_size=ep_size)
    model.hf_model.set_experts_implementation("eager")
    lora.prepare(model, LORA, ep_size=ep_size, ep_rank=ep_rank, seed=5, verbose=False)
    # lora_B is zero after init: one global draw per tensor (this rank's experts sliced) makes every
    # adapter receive gradients.
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted((n, p) for n, p in model.named_parameters() if ".lora_B." in n)):
            expert = ".mlp.experts." in name
            shape = (param.shape[0], param.shape[1] * ep_size) if expert else param.shape
            full = torch.randn(shape, generator=torch.Generator().manual_seed(100 + index)) * 0.1
            local = model.num_experts // ep_size
            param.copy_(expert_slice(name, full, lo=ep_rank * local, count=local, num_experts=model.num_experts)
                        if expert else full)
    return model


def _loss(model, ids, labels):
    out = model(ids, labels_BS=labels, collect_expert_outputs=True)
    return out.lm_loss + 0.01 * torch.stack([r.l_aux for r in out.routing]).mean()


def _trainer_run(pretrained, run_dir):
    """The trainer's LoRA path at EP=2 (model.lora, ZeRO-2): 2 steps saved, then resumed for a third."""
    from ds_moe_div.session import build
    from ds_moe_div.train import run
    from tests.test_hf_lora_train import IDS, _config, _ds

    state = build(_config(pretrained, run_dir, "train.steps=2", "model.moe.ep_size=2"), _ds())
    run(state)
    with torch.no_grad():
        logits = state.engine.module.logits(IDS)
    state.close()
    resumed = build(_config(pretrained, run_dir, "train.steps=3", "model.moe.ep_size=2", "train.resume=true"), _ds())
    step = resumed.step
    run(resumed)
    resumed.close()
    return {"logits": logits, "resumed_at": step}


def _step_on_ranks(rank, world_size, path, tag_dir, trainer_model, run_dir):
    import deepspeed

    from ds_moe_div.hf import autoep, lora_checkpoint
    model = _model(path, ep_size=2, ep_rank=rank)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "gradient_clipping": CLIP, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True,
                                "overlap_comm": False}}
    with autoep.engine_view(model):
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds,
            optimizer=autoep.moe_optimizer(lambda groups: torch.optim.SGD(groups, lr=1.0)))
    layer = model.moe_layers()[0]
    expert_params = [p for n, p in model.named_parameters() if ".mlp.experts." in n and "lora_" in n]
    groups_ok = all(p.group_name == layer.ep_group_name and p.allreduce is False for p in expert_params)
    edp_size = torch.distributed.get_world_size(group=layer.expert_data_parallel_group())
    ids, labels = batch(model.config.vocab_size, seed=7, shape=(4, 16))
    half = slice(2 * rank, 2 * rank + 2)
    loss = _loss(engine, ids[half], labels[half])
    engine.backward(loss)
    engine.step()
    lora_checkpoint.save(engine, tag_dir, client={}, rank=rank)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"loss": loss.item(), "trainable": trainable, "groups_ok": groups_ok, "edp_size": edp_size,
            "trainer": _trainer_run(trainer_model, run_dir)}


def _reference(path):
    model = _model(path, ep_size=1, ep_rank=0)
    model.train()
    ids, labels = batch(model.config.vocab_size, seed=7, shape=(4, 16))
    losses = [_loss(model, ids[h], labels[h]) for h in (slice(0, 2), slice(2, 4))]
    (0.5 * (losses[0] + losses[1])).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    with torch.no_grad():
        for p in params:
            p -= p.grad
    return [x.item() for x in losses], {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def two_ranks(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_ep2")
    ranks = run_on_ranks(_step_on_ranks, world_size=2, timeout=600,
                         args=(str(tiny_dirs[FAMILY]), str(root / "tag"), str(tiny_dirs["olmoe"]), str(root / "run")))
    return ranks, root


def test_ep2_lora_step_equals_one_process_and_checkpoint_joins_experts(tiny_dirs, two_ranks):
    path = tiny_dirs[FAMILY]
    ranks, root = two_ranks
    tag_dir = root / "tag"
    ref_losses, ref = _reference(path)
    assert all(r["groups_ok"] and r["edp_size"] == 1 for r in ranks)
    joined = read_adapters(tag_dir)
    assert set(joined) == set(ref)
    for rank, result in enumerate(ranks):
        assert result["loss"] == pytest.approx(ref_losses[rank], rel=1e-5)
    moved = 0
    for name, value in ref.items():
        if ".mlp.experts." in name:
            got = joined[name]
        else:
            got = ranks[0]["trainable"][name]
            torch.testing.assert_close(ranks[1]["trainable"][name], got, rtol=0, atol=0)
            torch.testing.assert_close(joined[name], got, rtol=0, atol=0)
        scale = value.abs().max().item()
        assert (got - value).abs().max().item() <= 1e-5 * max(scale, 1e-6), name
        moved += ".lora_A." in name and ".mlp.experts." in name
    assert moved > 0


def test_ep2_lora_trainer_run_resumes_and_exports_merged(two_ranks, tmp_path):
    from ds_moe_div import cli
    from ds_moe_div.hf.load import load_pretrained
    from tests.test_hf_lora_train import IDS

    ranks, root = two_ranks
    assert all(r["trainer"]["resumed_at"] == 2 for r in ranks)
    torch.testing.assert_close(ranks[0]["trainer"]["logits"], ranks[1]["trainer"]["logits"], rtol=0, atol=0)
    tag = root / "run" / "checkpoints" / "global_step2"
    assert {"lora_state_rank0.pt", "lora_state_rank1.pt", "lora_base.json"} <= {p.name for p in tag.iterdir()}
    out = tmp_path / "merged"
    assert cli.main(["export", str(tag), str(out)]) == 0  # every EP rank's expert adapters, merged
    reloaded = load_pretrained(out)
    reloaded.set_experts_implementation("eager")
    with torch.no_grad():
        logits = reloaded(IDS).logits
    assert (logits - ranks[0]["trainer"]["logits"]).abs().max().item() <= 1e-5
