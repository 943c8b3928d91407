"""LoRA post-training through the trainer (`model.lora`): config checks, then one 1-process run on a tiny
olmoe that trains only the adapters (+ the router with router=full) and leaves every base weight
bit-identical; its checkpoint holds only trainable state, resumes bit-exact, and exports merged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ds_moe_div.config import load_experiment
from ds_moe_div.config_loader import ConfigError
from tests import hf_fixtures
from tests.dist_utils import run_on_ranks

tiny_dirs = hf_fixtures.tiny_dirs  # session fixture
pytestmark = pytest.mark.filterwarnings("ignore")
pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]
DS_ZERO2 = ROOT / "ds_configs" / "ds_zero2_cpu.json"
IDS = torch.arange(2, 34).view(2, 16)


def test_lora_config_is_validated():
    cfg = load_experiment(None, ["model.pretrained=/x", "model.lora.r=4", "model.lora.router=full"])
    assert cfg.model.lora.r == 4 and cfg.model.lora.targets == ("attention", "experts")
    for override, message in (("model.lora.r=0", "r=0 must be >= 1"), ("model.lora.alpha=0", "alpha=0"),
                              ("model.lora.dropout=1.0", r"dropout=1.0 must be in \[0, 1\)"),
                              ("model.lora.dropout=0.1", "no dropout"), ("model.lora.router=lora2", "router")):
        with pytest.raises((ValueError, ConfigError), match=message):
            load_experiment(None, ["model.pretrained=/x", override])
    with pytest.raises((ValueError, ConfigError), match="model.lora needs model.pretrained"):
        load_experiment(None, ["model.lora.r=4"])


def _config(pretrained, run_dir, *extra):
    return load_experiment(None, [f"model.pretrained={pretrained}", "model.lora.r=4", "model.lora.alpha=8",
                                  "model.lora.router=full", "data.seq_len=32", f"data.cache_dir={run_dir}/../cache",
                                  f"train.run_dir={run_dir}", "train.log_interval=1", "train.eval_interval=100",
                                  "train.eval_batches=1", "train.save_interval=2", "train.show_progress=false",
                                  "objectives.balance.coef=0.01", *extra])


def _ds():
    ds = json.loads(DS_ZERO2.read_text())
    ds["scheduler"]["params"].update(warmup_num_steps=1, warmup_min_ratio=1.0)
    ds["optimizer"]["params"]["lr"] = 1e-2
    return ds


def _train(cfg):
    """build + run, recording the loss of every micro-step; returns (state, losses)."""
    from ds_moe_div.session import build
    from ds_moe_div.train import run

    state = build(cfg, _ds())
    losses = []
    original = state.engine.backward

    def record(loss, *args, **kwargs):
        losses.append(loss.item())
        return original(loss, *args, **kwargs)
    state.engine.backward = record
    before = {n: p.detach().clone() for n, p in state.engine.module.named_parameters()}
    run(state)
    return state, losses, before


def _lora_run(rank, world_size, pretrained, run_dir):
    import shutil

    from ds_moe_div.rundir import CheckpointError
    from ds_moe_div.session import build

    state, losses, before = _train(_config(pretrained, run_dir, "train.steps=4"))
    model = state.engine.module
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = {"trainable": trainable, "losses": losses,
              "changed": sorted(n for n in before if not torch.equal(before[n], after[n])),
              "frozen_equal": all(torch.equal(before[n], after[n]) for n in before if n not in trainable),
              "saved": sorted(torch.load(Path(run_dir) / "checkpoints/global_step2/lora_state_rank0.pt",
                                         weights_only=False)["trainable"])}
    with torch.no_grad():
        result["logits"] = model.logits(IDS)
    # Resume from step 2 in a copy of the run: steps 3 and 4 repeat bit-exactly.
    resumed_dir = f"{run_dir}_resumed"
    shutil.copytree(f"{run_dir}/checkpoints/global_step2", f"{resumed_dir}/checkpoints/global_step2")
    Path(f"{resumed_dir}/checkpoints/latest").write_text("global_step2")
    state2, losses2, _ = _train(_config(pretrained, resumed_dir, "train.steps=4", "train.resume=true"))
    result["resumed_losses"] = losses2
    result["resumed_equal"] = all(torch.equal(p, after[n]) for n, p in state2.engine.module.named_parameters())
    state2.close()
    # Activation checkpointing (transformers' recomputation through peft's layers): the same steps.
    checkpointed, result["checkpointed_losses"], _ = _train(_config(pretrained, f"{run_dir}_ac", "train.steps=4",
                                                                    "model.activation_checkpointing=true"))
    checkpointed.close()
    # Without model.lora, the adapters-only checkpoint is refused with the fix.
    try:
        build(load_experiment(None, [f"model.pretrained={pretrained}", "data.seq_len=32",
                                     f"data.cache_dir={run_dir}/../cache", f"train.run_dir={run_dir}_full",
                                     f"train.init_from={run_dir}", "train.show_progress=false"]), _ds())
        result["without_lora"] = "accepted"
    except CheckpointError as e:
        result["without_lora"] = str(e)
    # The same checkpoint against a changed base model: refused, naming both.
    changed = Path(f"{run_dir}_base")
    shutil.copytree(pretrained, changed)
    config = json.loads((changed / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (changed / "config.json").write_text(json.dumps(config))
    try:
        build(_config(changed, resumed_dir, "train.steps=4", "train.resume=true"), _ds())
        result["changed_base"] = "accepted"
    except CheckpointError as e:
        result["changed_base"] = str(e)
    # eval's loader rebuilds base + adapters from the step-4 checkpoint.
    from ds_moe_div.evaluation.loading import load_for_eval
    loaded = load_for_eval(Path(run_dir) / "checkpoints" / "global_step4", show_progress=False)
    with torch.no_grad():
        result["eval_logits"] = loaded.model.logits(IDS)
    result["eval_has_lora"] = any("lora_" in n for n, _ in loaded.model.named_parameters())
    # A run with the router frozen (attention and experts adapted): what --adapter-only can write.
    attn, _, _ = _train(_config(pretrained, f"{run_dir}_attn", "train.steps=2", "model.lora.router=frozen"))
    with torch.no_grad():
        result["attn_logits"] = attn.engine.module.logits(IDS)
    attn.close()
    return result


@pytest.fixture(scope="module")
def lora_run(tiny_dirs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    (result,) = run_on_ranks(_lora_run, world_size=1, timeout=600, args=(str(tiny_dirs["olmoe"]), str(run_dir)))
    return result, run_dir


@pytest.mark.slow
def test_lora_run_trains_only_adapters_and_router(lora_run):
    result, _ = lora_run
    trainable = result["trainable"]
    assert trainable and all("lora_" in n or n.endswith("router.gate.weight") for n in trainable)
    assert sum(n.endswith("router.gate.weight") for n in trainable) == 2  # router=full, 2 MoE layers
    assert any(".mlp.experts." in n for n in trainable) and any(".self_attn." in n for n in trainable)
    assert result["frozen_equal"]  # base weights bit-identical after the steps
    assert set(result["changed"]) <= set(trainable) and any(".mlp.experts." in n for n in result["changed"])
    assert len(result["losses"]) == 4 and result["losses"][-1] < result["losses"][0]
    assert result["checkpointed_losses"] == result["losses"]  # activation checkpointing: no double counting


@pytest.mark.slow
def test_lora_checkpoint_holds_only_trainable_state_and_resumes_bit_exact(lora_run):
    result, run_dir = lora_run
    tag = run_dir / "checkpoints" / "global_step2"
    names = {p.name for p in tag.iterdir()}
    assert {"lora_state_rank0.pt", "lora_base.json"} <= names
    assert not any(n.startswith(("mp_rank", "layer_", "zero_pp", "bf16_zero")) for n in names)  # no base weights
    assert result["saved"] == result["trainable"]
    base = json.loads((tag / "lora_base.json").read_text())
    assert len(base["sha256"]) == 64 and base["pretrained"].endswith("olmoe")
    assert result["resumed_losses"] == result["losses"][2:]  # bit-exact next-step losses
    assert result["resumed_equal"]  # and bit-exact adapters (and everything else) after them
    # eval: base + adapters of step 4, merged
    assert (result["eval_logits"] - result["logits"]).abs().max().item() <= 1e-5
    assert not result["eval_has_lora"]
    assert "set model.lora as in its run_config.json" in result["without_lora"]
    assert "differs" in result["changed_base"] and "model.pretrained" in result["changed_base"]


@pytest.mark.slow
def test_lora_export_merged_and_adapter_only(lora_run, tiny_dirs, tmp_path):
    from ds_moe_div import cli
    from ds_moe_div.hf.load import load_pretrained

    result, run_dir = lora_run
    out = tmp_path / "merged"
    assert cli.main(["export", str(run_dir), str(out), "--max-shard-size", "40KB"]) == 0
    assert not list(out.glob("adapter_*"))  # a plain transformers directory
    reloaded = load_pretrained(out)
    reloaded.set_experts_implementation("eager")
    with torch.no_grad():
        logits = reloaded(IDS).logits
        base = load_pretrained(tiny_dirs["olmoe"])(IDS).logits
    assert (logits - result["logits"]).abs().max().item() <= 1e-5
    assert (logits - base).abs().max().item() > 1e-3  # the adapters changed the model
    refused = tmp_path / "refused"
    assert cli.main(["export", str(run_dir), str(refused), "--adapter-only"]) == 2  # router trained in full
    assert not refused.exists()
    from peft import PeftModel
    adapter = tmp_path / "adapter"
    assert cli.main(["export", f"{run_dir}_attn", str(adapter), "--adapter-only"]) == 0
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] and config["rank_pattern"] == {"gate_up_proj": 8}
    base_hf = load_pretrained(tiny_dirs["olmoe"])
    base_hf.set_experts_implementation("eager")
    peft_model = PeftModel.from_pretrained(base_hf, adapter)
    with torch.no_grad():
        adapted = peft_model(input_ids=IDS).logits
    assert (adapted - result["attn_logits"]).abs().max().item() <= 1e-5
    assert (adapted - base).abs().max().item() > 1e-4
    with torch.no_grad():  # the expert adapters are part of what matched
        for name, param in peft_model.named_parameters():
            if ".mlp.experts." in name and ".lora_B." in name:
                param.zero_()
        without_experts = peft_model(input_ids=IDS).logits
    assert (without_experts - adapted).abs().max().item() > 1e-4


def test_shipped_posttrain_lora_config():
    cfg = load_experiment(ROOT / "ds_configs" / "experiments" / "posttrain_lora.json")
    lora = cfg.model.lora
    assert (lora.r, lora.alpha, lora.targets, lora.router) == (16, 32.0, ("attention", "experts"), "full")
    assert cfg.model.pretrained and cfg.objectives.balance.scope == "global_batch"
    assert cfg.objectives.balance.coef == 0.001  # methods.md: paper 1's alpha
    assert cfg.objectives.orthogonality.coef == "auto" and cfg.objectives.variance.coef == "auto"
