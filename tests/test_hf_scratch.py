"""From-scratch models on the AutoEP path (`model.backend: "autoep"`, ds_moe_div/hf/scratch.py).

Fast: the config mapping, the checks, seeded initialisation. Slow (one 2-rank spawn shared by the module):
(a) one step of the scratch model under DeepSpeed with EP=2 and ZeRO-2 equals one process on the
concatenated batch (loss, and every weight after an SGD step, i.e. the gradients); (b) the trainer runs it
with every objective on and logs the routing statistics; a run resumed from its step-1 checkpoint continues
exactly; its checkpoint evaluates (`eval`), loads into one process for scoring and generation, exports
(`export`) and reloads in plain transformers with the same logits, and `model.generate` runs.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from ds_moe_div import cli
from ds_moe_div.config import load_experiment
from ds_moe_div.hf import autoep
from ds_moe_div.hf.scratch import build_scratch, scratch_config
from ds_moe_div.objectives import orthogonality_loss
from tests.dist_utils import run_command, run_on_ranks
from tests.hf_fixtures import batch

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "ds_configs" / "experiments" / "smoke.json"
TINY = ROOT / "ds_configs" / "experiments" / "tiny.json"
DS_ZERO2 = ROOT / "ds_configs" / "ds_zero2_cpu.json"
TERMS = ("balance", "z_loss", "divergence", "orthogonality", "variance")
AUTOEP = ["model.backend=autoep"]
CLIP = 1.0
ZERO2 = {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True, "overlap_comm": False}


def test_config_maps_onto_qwen3_moe():
    cfg = load_experiment(TINY, [*AUTOEP, "model.moe.first_dense_layers=1", "model.rope_theta=5000",
                                 "model.tie_embeddings=false"])
    hf = scratch_config(cfg.model, vocab_size=300, seq_len=128)
    assert (hf.model_type, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.head_dim) == \
        ("qwen3_moe", 128, 4, 4, 32)
    assert (hf.moe_intermediate_size, hf.intermediate_size, hf.num_experts, hf.num_experts_per_tok) == (256, 256, 8, 2)
    assert hf.mlp_only_layers == [0] and hf.norm_topk_prob and not hf.tie_word_embeddings
    assert hf.rope_parameters["rope_theta"] == 5000 and hf.vocab_size == 300 and hf.max_position_embeddings == 128
    every_other = load_experiment(TINY, [*AUTOEP, "model.moe.layer_pattern=every_other", "model.moe.k=1"])
    hf = scratch_config(every_other.model, vocab_size=300, seq_len=128)
    assert hf.mlp_only_layers == [1, 3] and not hf.norm_topk_prob  # DeepSpeed's top-1 gate does not renormalise


def test_native_only_keys_refused_with_autoep():
    assert load_experiment(TINY).model.uses_autoep  # the default for from-scratch models
    assert not load_experiment(TINY, ["model.backend=native"]).model.uses_autoep
    with pytest.raises(ValueError, match=r"model.backend='autoep'.*dropless.*model.moe.capacity_factor: remove them "
                                         r"\(or use model.backend='native'\)"):
        load_experiment(TINY, ["model.moe.capacity_factor=2.0"])
    with pytest.raises(ValueError, match=r"model.backend='autoep'.*dropless.*model.moe.capacity_factor, "
                                         r"model.moe.noisy_gate_policy: remove them"):
        load_experiment(TINY, [*AUTOEP, "model.moe.capacity_factor=2.0", "model.moe.noisy_gate_policy=RSample"])
    with pytest.raises(ValueError, match="model.family"):
        load_experiment(TINY, [*AUTOEP, "model.family=mixtral"])
    with pytest.raises(ValueError, match="checkpoint's config.json decides the family"):
        load_experiment(TINY, ["model.pretrained=models/x", "model.family=deepseek_v3"])


def test_seeded_init_and_autoep_layers_where_the_config_says():
    cfg = load_experiment(SMOKE, [*AUTOEP, "model.n_layers=3", "model.moe.first_dense_layers=1"])
    torch.manual_seed(0)
    a = build_scratch(cfg.model, vocab_size=100, seq_len=32, seed=5)
    state = torch.random.get_rng_state()
    b = build_scratch(cfg.model, vocab_size=100, seq_len=32, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG stream is untouched
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    a.convert()
    assert [layer.layer_id for layer in a.moe_layers()] == [1, 2]
    ids, labels = batch(100, seed=1)
    out = a(ids, labels_BS=labels, collect_expert_outputs=True)
    assert len(out.routing) == 2 and out.routing[0].expert_outputs_TKM.shape == (32, 2, 64)


def _objective(out) -> torch.Tensor:
    l_aux = torch.stack([r.l_aux for r in out.routing]).mean()
    ortho = torch.stack([orthogonality_loss(outputs_TKM=r.expert_outputs_TKM, kept_TK=r.kept_TK, mask_T=None,
                                            form="pairwise", eps=1e-6, reduction="mean") for r in out.routing]).mean()
    return out.lm_loss + 0.01 * l_aux + 0.1 * ortho


def _model_cfg():
    return load_experiment(SMOKE, [*AUTOEP, "model.moe.first_dense_layers=1", "model.n_layers=3"]).model


def _one_step(rank):
    """One DeepSpeed step (EP=2, ZeRO-2, SGD lr 1 after clipping) on this rank's half of the batch."""
    import deepspeed
    model = build_scratch(_model_cfg(), vocab_size=100, seq_len=32, seed=11)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "gradient_clipping": CLIP, "zero_optimization": ZERO2, "zero_allow_untested_optimizer": True,
          "expert_parallel": model.autoep_block(ep_size=2)}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds,
                                           optimizer=autoep.moe_optimizer(lambda g: torch.optim.SGD(g, lr=1.0)))
    model.attach_routing()
    ids, labels = batch(100, seed=7, shape=(4, 16))
    half = slice(2 * rank, 2 * rank + 2)
    loss = _objective(engine(ids[half], labels_BS=labels[half], collect_expert_outputs=True))
    engine.backward(loss)
    engine.step()
    return {"loss": loss.item(), "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _train(run_dir, *extra):
    from ds_moe_div.session import build
    from ds_moe_div.train import run

    cfg = load_experiment(SMOKE, [*AUTOEP, "model.moe.ep_size=2", f"train.run_dir={run_dir}", "train.steps=2",
                                  "train.log_interval=1", "train.eval_interval=2", "train.eval_batches=1",
                                  "train.save_interval=2", "train.heatmap_interval=2", "train.show_progress=false",
                                  *extra])
    ds = json.loads(DS_ZERO2.read_text())
    ds["scheduler"]["params"].update(warmup_num_steps=1, warmup_min_ratio=1.0)  # steps that move the weights
    state = build(cfg, ds)
    try:
        run(state)
    finally:
        state.close()  # releases the run dir for the next run in this process
    with torch.no_grad():
        return state.engine.module.logits(torch.arange(2, 34).view(2, 16))


def _on_ranks(rank, world_size, run_dir):
    return {"step": _one_step(rank), "logits": _train(run_dir)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("scratch") / "run"
    return run_on_ranks(_on_ranks, world_size=2, timeout=600, args=(str(run_dir),)), run_dir


@pytest.mark.slow
def test_ep2_zero2_step_equals_one_process(two_ranks):
    ranks, _ = two_ranks
    ref = build_scratch(_model_cfg(), vocab_size=100, seq_len=32, seed=11)
    ref.convert()
    ids, labels = batch(100, seed=7, shape=(4, 16))
    losses = [_objective(ref(ids[h], labels_BS=labels[h], collect_expert_outputs=True))
              for h in (slice(0, 2), slice(2, 4))]
    (0.5 * (losses[0] + losses[1])).backward()
    torch.nn.utils.clip_grad_norm_(list(ref.parameters()), CLIP)
    with torch.no_grad():
        for p in ref.parameters():
            p -= p.grad
    for rank, result in enumerate(ranks):
        assert result["step"]["loss"] == pytest.approx(losses[rank].item(), rel=1e-5)
    for name, value in ref.state_dict().items():
        if name.endswith("tokens_per_expert"):
            continue
        if name.endswith((".experts.w1", ".experts.w2", ".experts.w3")):
            got = torch.cat([r["step"]["state"][name] for r in ranks])
        else:
            got = ranks[0]["step"]["state"][name]
        assert (got - value).abs().max().item() <= 1e-5 * max(value.abs().max().item(), 1e-6), name


def _resumed_on_ranks(rank, world_size, run_dir):
    _train(run_dir, "train.steps=1", "train.save_interval=1")
    return _train(run_dir, "train.resume=true")


def _scalars(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_resume_continues_exactly_like_the_uninterrupted_run(two_ranks, tmp_path):
    """Step 1, checkpoint (experts in per-EP-rank files), resume, step 2: as the 2-step run of the fixture."""
    ranks, run_dir = two_ranks
    resumed = run_on_ranks(_resumed_on_ranks, world_size=2, timeout=600, args=(str(tmp_path / "run"),))
    assert (resumed[0] - ranks[0]["logits"]).abs().max().item() <= 1e-5
    full, again = _scalars(run_dir), _scalars(tmp_path / "run")
    for tag in ("train/lm_loss", "moe/divergence_unscaled", "moe/orthogonality_unscaled", "moe/variance_unscaled"):
        assert again[tag][2] == pytest.approx(full[tag][2], rel=1e-5, abs=1e-6), tag


def _scored_in_one_process(rank, world_size, run_dir):
    from ds_moe_div.evaluation.generation import generate
    from ds_moe_div.evaluation.loading import load_model_only

    loaded = load_model_only(run_dir)
    scorer = loaded.scorer()
    return {"logits": scorer.logits(torch.arange(2, 34).view(2, 16)),
            "generated": generate(scorer, "def add(a, b):", max_new_tokens=4)}


@pytest.mark.slow
def test_generation_and_scoring_load_the_checkpoint_in_one_process(two_ranks):
    ranks, run_dir = two_ranks
    [one] = run_on_ranks(_scored_in_one_process, world_size=1, timeout=300, args=(str(run_dir),))
    assert (one["logits"] - ranks[0]["logits"]).abs().max().item() <= 1e-5
    generated = one["generated"]
    assert len(generated.token_ids) <= 4 and generated.stop_reason in ("eos", "max_new_tokens")


@pytest.mark.slow
def test_trainer_run_logs_every_objective_evaluates_and_exports(two_ranks, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ranks, run_dir = two_ranks
    tags = set(_scalars(run_dir))
    for term in TERMS:
        assert {f"moe/{term}", f"moe/{term}_unscaled", f"moe/{term}/layer_0", f"moe/{term}/layer_1"} <= tags, term
    assert {"routing/d_inter/layer_0", "routing/mi/layer_1", "routing/expert_output_norm/mean"} <= tags
    assert json.loads((run_dir / "config.json").read_text())["model"]["backend"] == "autoep"

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    evaluated = run_command([sys.executable, "-m", "ds_moe_div", "eval", "--run-dir", str(run_dir), "--max-batches",
                             "1", "--permutation-seeds", "1", "--no-progress"],
                            cwd=tmp_path, env=env, timeout=300)
    assert evaluated.returncode == 0, evaluated.stdout[-4000:]
    report = json.loads(next((run_dir / "eval").rglob("report.json")).read_text())
    assert set(report["delta_ppl"]) >= {"layer_0", "layer_1"} and report["lm_loss"] > 0
    assert report["ablation"]["masked"] and report["ablation"]["keep_k"]  # AutoEP's routing override

    out = tmp_path / "hf"
    assert cli.main(["export", str(run_dir), str(out), "--max-shard-size", "100KB"]) == 0
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    assert reloaded.config.model_type == "qwen3_moe"
    with torch.no_grad():
        logits = reloaded(torch.arange(2, 34).view(2, 16)).logits
    assert (logits - ranks[0]["logits"]).abs().max().item() <= 1e-5
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    prompt = tokenizer("def add(a, b):", return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert reloaded.generation_config.eos_token_id == tokenizer.eos_token_id


def test_activation_checkpointing_gives_the_same_loss_gradients_and_records():
    grads, records = [], []
    for recompute in (False, True):
        cfg = load_experiment(SMOKE, [*AUTOEP, f"model.activation_checkpointing={str(recompute).lower()}"])
        model = build_scratch(cfg.model, vocab_size=100, seq_len=32, seed=2)
        model.convert()
        assert model.hf_model.is_gradient_checkpointing == recompute and model.training
        ids, labels = batch(100, seed=3)
        out = model(ids, labels_BS=labels, collect_expert_outputs=True)
        _objective(out).backward()
        records.append(len(out.routing))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert records == [2, 2]  # the recomputation adds no routing record
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_deepseek_v3_shape():
    cfg = load_experiment(TINY, [*AUTOEP, "model.family=deepseek_v3", "model.moe.first_dense_layers=1"])
    hf = scratch_config(cfg.model, vocab_size=300, seq_len=128)
    assert (hf.model_type, hf.n_routed_experts, hf.num_experts_per_tok, hf.first_k_dense_replace) == \
        ("deepseek_v3", 8, 2, 1)
    assert (hf.qk_rope_head_dim, hf.qk_nope_head_dim, hf.v_head_dim, hf.n_shared_experts, hf.n_group) == \
        (16, 16, 32, 0, 1)
    with pytest.raises(ValueError, match="layer_pattern='all'"):
        scratch_config(load_experiment(TINY, [*AUTOEP, "model.family=deepseek_v3",
                                              "model.moe.layer_pattern=every_other"]).model, vocab_size=300, seq_len=8)


def _loss_free_deepseek_v3(rank, world_size, run_dir):
    return _train(run_dir, "model.moe.ep_size=1", "model.family=deepseek_v3", "objectives.balance.method=loss_free",
                  "train.eval_interval=5")


@pytest.mark.slow
def test_loss_free_deepseek_v3_exports_its_bias_as_e_score_correction_bias(tmp_path):
    """Loss-Free Balancing's selection bias survives export only where the family has one: DeepSeek-V3."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    [logits] = run_on_ranks(_loss_free_deepseek_v3, world_size=1, timeout=300, args=(str(run_dir),))
    assert cli.main(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype=torch.float32).eval()
    biases = [b for n, b in reloaded.named_buffers() if n.endswith("e_score_correction_bias")]
    assert len(biases) == 2 and all(torch.count_nonzero(b) > 0 for b in biases)  # the trained Loss-Free bias
    with torch.no_grad():
        assert (reloaded(torch.arange(2, 34).view(2, 16)).logits - logits).abs().max().item() <= 1e-5
