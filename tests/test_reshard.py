"""`--resume` of an AutoEP model (imported, or from scratch on the default `model.backend: "autoep"`) on
another cluster shape: 2 ranks EP=2 -> 1 rank EP=1 and back.

Each direction: a run trains 2 steps on the saved shape (ZeRO-2, AdamW, Loss-Free Balancing, an `auto`
variance coefficient, routing statistics), saves, records the logits on a fixed batch and goes on to step
3 (the reference). A second run on the other shape resumes the step-2 tag (--resume-from): DeepSpeed's
universal checkpoint is made once inside the tag and loaded; its logits on the fixed batch, its Loss-Free
biases, calibrated coefficient and data position equal the reference's, and its step 3 (the same 4
sequences per optimizer step: micro-batch x accumulation x world size) gives the same loss and weights. Tolerances: logits and loss 1e-5
relative (only the order of float reductions differs between 1 and 2 ranks); step 3's weight update 5e-2
relative (see UPDATE_RTOL). The objective is shape-independent on purpose (token means: LM loss, routing-score
variance): a balance loss over each micro-batch would differ between shapes by definition.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ds_moe_div import rundir
from ds_moe_div.hf.tiny import make_tiny
from tests.dist_utils import run_on_ranks

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
DS_ZERO2 = ROOT / "ds_configs" / "ds_zero2_cpu.json"
SMOKE = ROOT / "ds_configs" / "experiments" / "smoke.json"
# `pretrained` = SCRATCH: the smoke-sized from-scratch model (qwen3_moe on AutoEP) instead of an imported one,
# with the objectives that depend on the cluster shape switched off (see the module docstring).
SCRATCH = "scratch"
SCRATCH_KEYS = ("objectives.z_loss.coef=0", "objectives.divergence.coef=0", "objectives.orthogonality.coef=0")
IDS = torch.arange(2, 50).view(3, 16)
# Step 3's AdamW update of each tensor, relative (Frobenius norm) to the reference's. Float reduction order
# (1 vs 2 ranks) changes it by <= 1e-3 for most tensors and by ~1.7e-2 for the routers, whose gradients are
# tiny differences (tiny.py draws confident, saturated routers) that Adam normalises; zeroed Adam moments
# after the load gave 0.8 (measured), so the check tells carried optimizer state from lost state.
UPDATE_RTOL = 5e-2


def _build(pretrained, run_dir, *, shape, extra=()):
    """A run of `shape` = (world size = ep_size, micro-batch, gradient accumulation steps)."""
    from ds_moe_div.config import load_experiment
    from ds_moe_div.session import build

    world_size, micro, gas = shape
    model = [*SCRATCH_KEYS, "model.backend=autoep"] if pretrained == SCRATCH else [f"model.pretrained={pretrained}"]
    cfg = load_experiment(SMOKE if pretrained == SCRATCH else None, [
        *model, f"model.moe.ep_size={world_size}", "data.seq_len=16",
        f"data.cache_dir={Path(run_dir).parent.parent / 'cache'}", f"train.run_dir={run_dir}", "train.steps=3",
        "train.log_interval=1", "train.eval_interval=100", "train.save_interval=100", "train.show_progress=false",
        f"train.micro_batch_size={micro}", f"train.gradient_accumulation_steps={gas}",
        "objectives.balance.method=loss_free", "objectives.balance.coef=0", "objectives.balance.gamma=0.01",
        "objectives.variance.coef=auto", *extra])
    ds = json.loads(DS_ZERO2.read_text())
    del ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    ds["scheduler"]["params"].update(warmup_num_steps=1, warmup_min_ratio=1.0)  # steps that move the weights
    return build(cfg, ds)


def _step(state) -> float:
    """One optimizer step; the loss averaged over micro-batches and ranks (each an equal share)."""
    from ds_moe_div.train import train_step

    loss = train_step(state.engine, state.train_iter, state.composer, state.window, step=state.step,
                      balancer=state.balancer).double()  # the sum over the rank's micro-batches
    state.step += 1
    state.window.reset()  # what maybe_log's flush does every log_interval (1) steps
    dist.all_reduce(loss)
    return loss.item() / (dist.get_world_size() * state.engine.gradient_accumulation_steps())


def _snapshot(state) -> dict:
    model = state.engine.module
    with torch.no_grad():
        logits = model.logits(IDS)  # every rank takes part in the all-to-all
    return {"logits": logits, "biases": [b.clone() for b in state.balancer.biases],
            "calibrated": dict(state.composer.calibrated), "step": state.step, "loader": state.loader.state_dict()}


def _full_state(state) -> dict:
    """Every parameter with all experts (gathered over the expert-parallel group)."""
    out = {}
    for name, p in state.engine.module.named_parameters():
        value = p.detach().clone()
        if name.endswith((".experts.w1", ".experts.w2", ".experts.w3")) and dist.get_world_size() > 1:
            parts = [torch.empty_like(value) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, value)
            value = torch.cat(parts)
        out[name] = value
    return out


def _update(before: dict, after: dict) -> dict:
    return {name: after[name] - value for name, value in before.items()}


def _reference(rank, world_size, pretrained, run_dir, shape):
    state = _build(pretrained, run_dir, shape=shape)
    try:
        for _ in range(2):
            _step(state)
        state.save()
        at_save, weights = _snapshot(state), _full_state(state)
        loss3 = _step(state)
        return {"at_save": at_save, "loss3": loss3, "update3": _update(weights, _full_state(state))}
    finally:
        state.close()


def _resumed(rank, world_size, pretrained, run_dir, shape):
    state = _build(pretrained, run_dir, shape=shape, extra=("train.resume_from=global_step2",))
    try:
        at_load, weights = _snapshot(state), _full_state(state)
        loss3 = _step(state)
        update3 = _update(weights, _full_state(state))
        state.save()  # a normal tag of the new shape
        return {"at_load": at_load, "loss3": loss3, "update3": update3, "at_save3": _snapshot(state)}
    finally:
        state.close()


def _continued(rank, world_size, pretrained, run_dir, shape):
    state = _build(pretrained, run_dir, shape=shape, extra=("train.resume=true",))
    try:
        return _snapshot(state)
    finally:
        state.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(family="mixtral", out_dir=tmp_path_factory.mktemp("tiny_hf") / "mixtral", seed=3)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = max(b.abs().max().item(), 1e-6)
    assert (a - b).abs().max().item() <= 1e-5 * scale, what


@pytest.fixture(scope="module")
def references(tiny, tmp_path_factory):
    """Reference runs by saved shape, made on first use: (run dir with the step-2 tag, the run's results)."""
    made = {}

    def get(shape, model):
        if (shape, model) not in made:
            run_dir = tmp_path_factory.mktemp("reference") / "run"
            [ref, *_] = run_on_ranks(_reference, world_size=shape[0], timeout=600, args=(model, str(run_dir), shape))
            made[shape, model] = run_dir, ref
        return made[shape, model]
    return get


@pytest.mark.slow
@pytest.mark.parametrize(("saved", "resumed", "scratch"), [
    ((2, 2, 1), (1, 4, 1), False),  # 2 ranks EP=2 -> 1 rank EP=1, same micro-batch per optimizer step
    ((2, 2, 1), (1, 2, 2), False),  # ... with gradient accumulation: the data position moves from step 2 to 4
    ((1, 4, 1), (2, 2, 1), False),  # 1 rank EP=1 -> 2 ranks EP=2
    ((2, 2, 1), (1, 4, 1), True),   # a from-scratch model on the default AutoEP path, 2 -> 1
], ids=["2to1", "2to1-gas2", "1to2", "scratch-2to1"])
def test_resume_on_another_world_size_and_ep_size_continues_the_run(tiny, references, tmp_path, saved, resumed,
                                                                     scratch):
    import shutil

    model = SCRATCH if scratch else str(tiny)
    reference_dir, ref = references(saved, model)
    run_dir = tmp_path / "runs" / "run"
    shutil.copytree(reference_dir, run_dir, ignore=shutil.ignore_patterns("run.lock"))
    tag_dir = rundir.tag_dir(run_dir, "global_step2")
    assert json.loads(rundir.run_config_path(tag_dir).read_text())["shape"] == {"world_size": saved[0],
                                                                                 "ep_size": saved[0]}
    [res, *_] = run_on_ranks(_resumed, world_size=resumed[0], timeout=600, args=(model, str(run_dir), resumed))
    assert rundir.universal_dir(tag_dir).is_dir()  # converted once, kept for the next resume
    assert not list(tag_dir.glob(".universal.*")) and not (tag_dir / "latest_universal").exists()
    before, after = ref["at_save"], res["at_load"]
    _close(after["logits"], before["logits"], "logits on the fixed batch")
    for got, want in zip(after["biases"], before["biases"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # Loss-Free biases carried
    assert any(b.abs().sum() > 0 for b in before["biases"])  # ... and they had moved
    assert after["calibrated"] == before["calibrated"] and "variance" in before["calibrated"]
    assert after["step"] == before["step"] == 2
    assert after["loader"]["global_batch_size"] == resumed[0] * resumed[1]
    assert after["loader"]["step"] * after["loader"]["global_batch_size"] == \
        before["loader"]["step"] * before["loader"]["global_batch_size"]  # the same sequences come next
    assert res["loss3"] == pytest.approx(ref["loss3"], rel=1e-5)
    for name, want in ref["update3"].items():  # AdamW moments carried: step 3 makes the same update
        error = ((res["update3"][name] - want).norm() / want.norm()).item()
        assert error <= UPDATE_RTOL, (name, error)
    # The resharded run saves ordinary tags of its own shape, which resume without resharding.
    saved3 = rundir.tag_dir(run_dir, "global_step3")
    assert rundir.is_complete(rundir.checkpoint_root(run_dir), "global_step3")
    assert json.loads(rundir.run_config_path(saved3).read_text())["shape"] == {"world_size": resumed[0],
                                                                                "ep_size": resumed[0]}
    if resumed == (1, 4, 1) and not scratch:  # one case is enough (one more process start)
        [again] = run_on_ranks(_continued, world_size=1, timeout=600, args=(model, str(run_dir), resumed))
        assert again["step"] == 3 and not rundir.universal_dir(saved3).exists()
        torch.testing.assert_close(again["logits"], res["at_save3"]["logits"], rtol=0, atol=0)


# ---- fast checks of the pieces --------------------------------------------------------------------------------


def _loader_state(step, global_batch, sampling="natural"):
    return {"epoch": 1, "step": step, "seed": 0, "sampling": sampling, "shuffle": True,
            "global_batch_size": global_batch, "num_sequences": 100}


def test_data_position_is_carried_in_sequences(tmp_path):
    from ds_moe_div.reshard import loader_position

    state = _loader_state(step=3, global_batch=4)
    assert loader_position(state, global_batch=4, where=tmp_path) == state
    moved = loader_position(state, global_batch=2, where=tmp_path)  # e.g. 2 ranks x 2 -> 1 rank x 2 (gas 2)
    assert (moved["step"], moved["global_batch_size"], moved["epoch"]) == (6, 2, 1)
    assert loader_position(state, global_batch=12, where=tmp_path)["step"] == 1
    with pytest.raises(rundir.CheckpointError, match="12 sequences into epoch 1.*not a whole number.*8"):
        loader_position(state, global_batch=8, where=tmp_path)
    with pytest.raises(rundir.CheckpointError, match="balanced.*train.micro_batch_size"):
        loader_position(_loader_state(step=3, global_batch=4, sampling="balanced"), global_batch=2, where=tmp_path)


def test_native_moe_checkpoints_are_refused_naming_the_autoep_way(tmp_path):
    from ds_moe_div import checkpoint, fileio

    tag_dir = tmp_path / "run" / "checkpoints" / "global_step2"
    fileio.write_json(rundir.run_config_path(tag_dir), {"config": {}, "architecture": {}, "step": 2,
                                                         "shape": {"world_size": 2, "ep_size": 2}})
    checkpoint.check_shape(tag_dir, {"world_size": 2, "ep_size": 2})
    with pytest.raises(rundir.CheckpointError) as error:
        checkpoint.check_shape(tag_dir, {"world_size": 1, "ep_size": 1})
    assert "saved by 2 rank(s) with model.moe.ep_size=2, but this run has 1 rank(s) with ep_size=1" in str(error.value)
    assert "model.backend='native'" in str(error.value) and "resharded by --resume" in str(error.value)


def test_a_converted_tag_is_reused_unless_rewritten_and_a_failed_conversion_leaves_nothing(tmp_path):
    from ds_moe_div import fileio
    from ds_moe_div.reshard import convert

    tag_dir = tmp_path / "global_step2"
    fileio.write_json(rundir.complete_marker(tag_dir), {"step": 2, "written": "2026-01-01T00:00:00"})
    universal = rundir.universal_dir(tag_dir)
    (universal / "zero").mkdir(parents=True)
    rundir.universal_source_path(tag_dir).write_text(rundir.complete_marker(tag_dir).read_text())
    assert convert(tag_dir, rank=0) == universal  # converted from this write of the tag: not converted again
    assert (universal / "zero").is_dir()
    # The tag written again (a resume from an earlier tag reached step 2 again): converted anew, which
    # fails here (no DeepSpeed files), leaving neither the stale conversion nor a half-made one.
    fileio.write_json(rundir.complete_marker(tag_dir), {"step": 2, "written": "2026-01-02T00:00:00"})
    with pytest.raises(rundir.CheckpointError, match="(?s)converting .*global_step2.*universal.*train.init_from="):
        convert(tag_dir, rank=0)
    assert sorted(p.name for p in tag_dir.iterdir()) == ["complete"]  # nor DeepSpeed's latest_universal


def test_resharding_needs_a_zero_optimizer(tmp_path):
    from ds_moe_div.reshard import Reshard, with_universal

    plan = Reshard(tag_dir=tmp_path / "global_step2", saved={"world_size": 2, "ep_size": 2},
                   current={"world_size": 1, "ep_size": 1})
    ds = {"zero_optimization": {"stage": 2}, "checkpoint": {"tag_validation": "Warn"}}
    assert with_universal(ds, plan)["checkpoint"] == {"tag_validation": "Warn", "load_universal": True}
    with pytest.raises(rundir.CheckpointError, match="global_step2 was saved by 2 rank.*zero_optimization.stage=0"):
        with_universal({"zero_optimization": {"stage": 0}}, plan)
