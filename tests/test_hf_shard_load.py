"""Shard-by-shard loading (hf/shard_load.py): each EP rank reads only its own experts, and what it holds
is bit for bit what transformers' whole-model loading followed by AutoEP's slicing gives (`sharded=False`).
"""
from __future__ import annotations

import json
import shutil

import pytest
import safetensors
import torch

from ds_moe_div.hf import autoep
from ds_moe_div.hf.families import SUPPORTED
from ds_moe_div.hf.load import PretrainedLoadError, load_pretrained
from ds_moe_div.hf.model import PretrainedMoELM
from tests import hf_fixtures
from tests.dist_utils import run_on_ranks
from tests.hf_fixtures import batch

tiny_dirs = hf_fixtures.tiny_dirs  # session fixture
pytestmark = pytest.mark.filterwarnings("ignore")


def _tensors(model) -> dict:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


def _assert_same(ours, today) -> None:
    a, b = _tensors(ours), _tensors(today)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
        assert a[name].requires_grad == b[name].requires_grad, name
    pa, pb = dict(ours.named_parameters()), dict(today.named_parameters())
    for name, param in pa.items():  # AutoEP's tags (allreduce, group_name, placement metadata) survive the fill
        assert {k for k in vars(param) if not k.startswith("_")} == \
               {k for k in vars(pb[name]) if not k.startswith("_")}, name
        assert getattr(param, "allreduce", True) == getattr(pb[name], "allreduce", True), name


def _expert_reads(model) -> list:
    return [(name, rows) for name, rows in model.expert_source.reader.reads if ".experts." in name]


@pytest.mark.parametrize("family", SUPPORTED)
def test_each_rank_reads_only_its_experts_and_equals_whole_model_loading(tiny_dirs, family):
    path = tiny_dirs[family]
    for ep_size, ep_rank in ((1, 0), (2, 0), (2, 1)):
        ours = PretrainedMoELM.from_pretrained(path, ep_size=ep_size)
        assert not _expert_reads(ours)  # before AutoEP builds its layers, no expert is read or allocated
        assert all(t.is_meta for n, t in _tensors(ours).items() if n.endswith(("gate_up_proj", "down_proj")))
        ours.convert(ep_size=ep_size, ep_rank=ep_rank)
        today = PretrainedMoELM.from_pretrained(path, ep_size=ep_size, sharded=False)
        today.convert(ep_size=ep_size, ep_rank=ep_rank)
        assert not [n for n, t in _tensors(ours).items() if t.is_meta]
        _assert_same(ours, today)
        reads = _expert_reads(ours)
        e_local = 8 // ep_size
        experts = sorted({int(name.split(".experts.")[1].split(".")[0]) for name, _ in reads})
        assert experts == list(range(ep_rank * e_local, (ep_rank + 1) * e_local))
        layers = len(ours.moe_layers())
        assert len(reads) == len(set(reads)) == layers * e_local * 3  # each local tensor once, nothing else
        assert all(rows is None for _, rows in reads)
        non_expert = [n for n, _ in ours.expert_source.reader.reads if ".experts." not in n]
        assert len(non_expert) == len(set(non_expert))
        if ep_size == 1:
            ids, _ = batch(ours.config.vocab_size, seed=1)
            with torch.no_grad():
                assert torch.equal(ours.logits(ids), today.logits(ids))


def test_fused_checkpoint_is_read_by_row_slices(tiny_dirs, tmp_path):
    hf = load_pretrained(tiny_dirs["qwen3_moe"])
    hf.save_pretrained(tmp_path / "fused", save_original_format=False, max_shard_size="64KB")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dirs["qwen3_moe"] / name, tmp_path / "fused" / name)
    ours = PretrainedMoELM.from_pretrained(tmp_path / "fused", ep_size=2)
    ours.convert(ep_size=2, ep_rank=1)
    today = PretrainedMoELM.from_pretrained(tiny_dirs["qwen3_moe"], ep_size=2, sharded=False)
    today.convert(ep_size=2, ep_rank=1)
    _assert_same(ours, today)
    reads = _expert_reads(ours)
    assert {rows for _, rows in reads} == {(4, 8)}
    assert sorted(name.rsplit(".", 1)[1] for name, _ in reads) == ["down_proj"] * 2 + ["gate_up_proj"] * 2


@pytest.fixture
def copy_of(tiny_dirs, tmp_path):
    def make(family):
        return shutil.copytree(tiny_dirs[family], tmp_path / family)
    return make


@pytest.fixture
def no_weight_read(monkeypatch):
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("a weight was read"))


def test_refusals_come_before_any_weight_is_read(copy_of, no_weight_read):
    root = copy_of("qwen3_moe")
    with pytest.raises(PretrainedLoadError, match="num_experts=8 is not divisible by ep_size=3"):
        PretrainedMoELM.from_pretrained(root, ep_size=3)
    cfg = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**cfg, "moe_intermediate_size": cfg["moe_intermediate_size"] * 2}))
    with pytest.raises(PretrainedLoadError, match=r"experts\.\d+\.(gate|up|down)_proj.*shape"):
        PretrainedMoELM.from_pretrained(root, ep_size=2)
    (root / "config.json").write_text(json.dumps(cfg))
    shards = sorted(root.glob("model-*.safetensors"))
    shards[0].write_bytes(shards[0].read_bytes()[:-100])
    with pytest.raises(PretrainedLoadError, match="truncated"):
        PretrainedMoELM.from_pretrained(root, ep_size=2)
    shards[1].unlink()
    with pytest.raises(PretrainedLoadError, match=f"{shards[1].name}.*missing"):
        PretrainedMoELM.from_pretrained(root, ep_size=2)


def test_a_missing_expert_tensor_is_named_before_any_weight_is_read(copy_of, monkeypatch):
    from safetensors.torch import load_file, save_file
    root = copy_of("olmoe")
    index = json.loads((root / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.mlp.experts.5.up_proj.weight"
    shard = root / index["weight_map"].pop(victim)
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(PretrainedLoadError, match=r"model\.layers\.1\.mlp\.experts.*5\.up.*incomplete"):
        PretrainedMoELM.from_pretrained(root, ep_size=2)


# ---------------------------------------------------------------------------------------------------------
# Through deepspeed.initialize (ZeRO-2, AutoEP): the engine's state, optimizer master weights included.
# ---------------------------------------------------------------------------------------------------------
ZERO2 = {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True, "overlap_comm": False}


def _initialized_state(rank, world_size, path, sharded):
    import deepspeed
    model = PretrainedMoELM.from_pretrained(path, ep_size=world_size, sharded=sharded)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "zero_optimization": ZERO2, "zero_allow_untested_optimizer": True,
          "expert_parallel": model.autoep_block(ep_size=world_size)}
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=list(model.parameters()), config=ds,
        optimizer=autoep.moe_optimizer(lambda groups: torch.optim.SGD(groups, lr=1.0)))
    model.attach_routing()
    ids, labels = batch(model.config.vocab_size, seed=5, shape=(2, 16))
    with torch.no_grad():
        loss = engine(ids, labels_BS=labels).lm_loss.item()
    return {"state": {k: v.detach().clone() for k, v in _tensors(model).items()},
            "master": [t.detach().clone() for t in engine.optimizer.single_partition_of_fp32_groups],
            "loss": loss, "reads": _expert_reads(model) if sharded else None}


def _both_paths(rank, world_size, dirs):
    return {family: {sharded: _initialized_state(rank, world_size, path, sharded) for sharded in (True, False)}
            for family, path in dirs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_engine_state_after_initialize_equals_whole_model_loading(tiny_dirs, world_size):
    dirs = {f: str(tiny_dirs[f]) for f in ("olmoe", "deepseek_v3")}  # custom pattern keys; preset + bias
    results = run_on_ranks(_both_paths, world_size=world_size, args=(dirs,), timeout=600)
    for rank, by_family in enumerate(results):
        for family, r in by_family.items():
            ours, today = r[True], r[False]
            assert ours["state"].keys() == today["state"].keys()
            for name, value in ours["state"].items():
                assert torch.equal(value, today["state"][name]), (rank, family, name)
            assert len(ours["master"]) == len(today["master"])
            assert all(torch.equal(a, b) for a, b in zip(ours["master"], today["master"])), (rank, family)
            assert ours["loss"] == today["loss"]
            e_local = 8 // world_size
            experts = {int(name.split(".experts.")[1].split(".")[0]) for name, _ in ours["reads"]}
            assert experts == set(range(rank * e_local, (rank + 1) * e_local)), (rank, family)


def test_moving_the_model_before_autoep_built_its_layers_is_refused_naming_the_fix(tiny_dirs):
    model = PretrainedMoELM.from_pretrained(tiny_dirs["olmoe"], ep_size=2)
    with pytest.raises(RuntimeError, match="expert_parallel block to deepspeed.initialize, or call model.convert"):
        model.to("cpu")
    model.convert(ep_size=2, ep_rank=0)
    model.to("cpu")  # every expert is read now


def _same_after_convert(path, *, ep_size: int, ep_rank: int) -> PretrainedMoELM:
    ours = PretrainedMoELM.from_pretrained(path, ep_size=ep_size)
    ours.convert(ep_size=ep_size, ep_rank=ep_rank)
    today = PretrainedMoELM.from_pretrained(path, ep_size=ep_size, sharded=False)
    today.convert(ep_size=ep_size, ep_rank=ep_rank)
    _assert_same(ours, today)
    return ours


def test_tied_embeddings_and_a_bf16_checkpoint(tiny_dirs, tmp_path):
    from ds_moe_div.hf.tiny import make_tiny
    tied = make_tiny(family="qwen3_moe", out_dir=tmp_path / "tied", overrides={"tie_word_embeddings": True})
    ours = _same_after_convert(tied, ep_size=2, ep_rank=1)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # lm_head is not on disk: still tied
    load_pretrained(tiny_dirs["olmoe"]).to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="64KB")
    ours = _same_after_convert(tmp_path / "bf16", ep_size=2, ep_rank=1)  # cast to fp32 as transformers does
    assert {t.dtype for t in ours.state_dict().values()} == {torch.float32}
