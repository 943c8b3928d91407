"""Resume an AutoEP model's checkpoint on another cluster shape (world size, `model.moe.ep_size`).

Imported Hugging Face MoEs (`model.pretrained`) and from-scratch models on the default path
(`model.backend: "autoep"`) run DeepSpeed's AutoEP layers, whose checkpoints DeepSpeed can reshard: `ds_to_universal` merges every rank's ZeRO optimizer shards and expert files into a
"universal" checkpoint, which an engine with `"checkpoint": {"load_universal": true}` loads at any world
size and ep_size, Adam moments included. `--resume` does this by itself when the shape differs:

    plan = reshard.plan(cfg, world_size=info.world_size)   # None: same shape, native MoE, or no resume
    ds = reshard.with_universal(ds, plan)                  # before deepspeed.initialize (when plan)
    client = reshard.load(engine, plan, arch=arch, rank=rank, global_batch=loader.global_batch)

The conversion runs once per tag, on rank 0, into `<tag>/universal/` (rundir.universal_dir), built under a
temporary name and renamed whole (fileio.atomic_dir), so a kill leaves no half-converted directory and a
later resume (or the other ranks) reuse it; it records the tag's `complete` marker, so a tag written again
(a resume from an earlier tag that reaches the same step) is converted again. What the project keeps
beside DeepSpeed's state:

- persistent buffers (Loss-Free Balancing's `expert_bias`, DeepSeek-V3's `e_score_correction_bias`): a
  universal load restores parameters only, so they are copied from the tag's model-state file;
- the client state (step, composer: calibrated `auto` coefficients) as saved;
- the data position: the number of sequences consumed in the current epoch is kept, expressed in the new
  global batch (micro-batch x world size), which must divide it (natural sampling; balanced sampling draws
  its epoch order per global batch size, so it must stay the same);
- RNG: ranks that existed load their own saved state; new ranks keep the run's seeded state;
- the routing-statistics window is not part of any checkpoint (same as a same-shape resume): it starts
  empty at the resumed step (empty anyway when save_interval is a multiple of log_interval).

Native DeepSpeed-MoE checkpoints (`model.backend: "native"`) cannot be resharded: checkpoint.check_shape
refuses them.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ds_moe_div import checkpoint, fileio, rundir
from ds_moe_div.distributed import set_rng_state
from ds_moe_div.rundir import CheckpointError

MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass(frozen=True)
class Reshard:
    tag_dir: Path
    saved: dict  # {"world_size", "ep_size"} the tag was written with
    current: dict  # this run's

    def describe(self) -> str:
        return (f"{self.tag_dir.name} was saved by {self.saved['world_size']} rank(s) with ep_size="
                f"{self.saved['ep_size']}; this run has {self.current['world_size']} rank(s) with ep_size="
                f"{self.current['ep_size']}")


def plan(cfg, *, world_size: int) -> Reshard | None:
    """The resharding a resume of `cfg` needs: None unless it resumes a model on DeepSpeed's AutoEP layer
    (imported, or from scratch with model.backend "autoep", the default) whose tag was saved with another
    world size or ep_size. (A LoRA run's checkpoint is its own per-rank trainable state,
    hf/lora_checkpoint.py, not a DeepSpeed checkpoint: it is not resharded here.)"""
    train = cfg.train
    if not train.resuming or not cfg.model.uses_autoep or cfg.model.lora is not None:
        return None
    tag, _ = rundir.resume_tag(train.run_dir, train.resume_from)
    tag_dir = rundir.tag_dir(train.run_dir, tag)
    saved = checkpoint.saved_shape(tag_dir)
    current = {"world_size": world_size, "ep_size": cfg.model.moe.ep_size}
    if saved["world_size"] == current["world_size"] and saved["ep_size"] == current["ep_size"]:
        return None
    return Reshard(tag_dir=tag_dir, saved=saved, current=current)


def with_universal(ds: dict, reshard: Reshard) -> dict:
    """`ds` with DeepSpeed's universal-checkpoint loading switched on (ZeRO stage 1 or 2 only: without a ZeRO
    optimizer DeepSpeed would load neither the weights nor the optimizer state of a universal checkpoint)."""
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage not in (1, 2):
        raise CheckpointError(f"{reshard.describe()}: resharding goes through DeepSpeed's universal checkpoint, "
                              f"which loads only into a ZeRO stage 1 or 2 optimizer, but this DeepSpeed config has "
                              f"zero_optimization.stage={stage}: use stage 1 or 2 (e.g. ds_configs/ds_zero2_cpu.json), "
                              f"or resume with the shape it was saved with")
    return {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}


def convert(tag_dir: Path, *, rank: int) -> Path:
    """`<tag>/universal/`, converted by rank 0 if it is not there yet (every rank returns once it is)."""
    target = rundir.universal_dir(tag_dir)
    error = None
    if rank == 0 and not _current(Path(tag_dir)):
        try:
            shutil.rmtree(target, ignore_errors=True)  # made from an older write of this tag
            _convert(Path(tag_dir), target)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = e
    failed = torch.tensor([error is not None], dtype=torch.int32)
    if dist.is_initialized():
        dist.all_reduce(failed)  # the other ranks wait here while rank 0 converts
    if failed.item():
        raise CheckpointError(f"converting {tag_dir} to DeepSpeed's universal checkpoint failed"
                              f"{f': {type(error).__name__}: {error}' if error else ' on rank 0'}; resume with the "
                              f"shape it was saved with, or start a new run from its weights with "
                              f"train.init_from={rundir.run_dir_of(tag_dir)}") from error
    return target


def _source(tag_dir: Path) -> str:
    """What identifies this write of the tag: its `complete` marker (step and time written)."""
    marker = rundir.complete_marker(tag_dir)
    return marker.read_text() if marker.is_file() else ""


def _current(tag_dir: Path) -> bool:
    """The tag's universal dir holds the conversion of the tag as it is now (not of an earlier write)."""
    try:
        return rundir.universal_source_path(tag_dir).read_text() == _source(tag_dir)
    except OSError:
        return False


def _convert(tag_dir: Path, target: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    for stale in tag_dir.glob(f".{target.name}.*.tmp"):  # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    if not any(tag_dir.glob("*optim_states.pt")):
        raise RuntimeError(f"{tag_dir} holds no ZeRO optimizer files (it was written without ZeRO, stage 0); "
                           f"DeepSpeed's universal checkpoint needs a ZeRO stage 1 or 2 checkpoint")
    noise = io.StringIO()
    try:
        with fileio.atomic_dir(target) as tmp, contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            ds_to_universal.main(Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                                           num_merge_workers=1, keep_temp_folder=False, strict=True,
                                           inject_missing_state=False))
            fileio.write_text(tmp / rundir.universal_source_path(tag_dir).name, _source(tag_dir))
    except Exception as e:
        raise RuntimeError(f"{e}\n{noise.getvalue()[-2000:]}") from e
    finally:
        (tag_dir / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer to the temporary name


def load(engine, reshard: Reshard, *, arch: dict, rank: int, global_batch: int) -> dict:
    """Load `reshard.tag_dir` into `engine` (built with with_universal) at this run's shape; restore the
    persistent buffers and this rank's RNG; return the client state with the data position expressed in
    this run's `global_batch` (micro-batch x world size)."""
    tag_dir = reshard.tag_dir
    checkpoint.check_architecture(rundir.read_run_config(tag_dir)["architecture"], arch, tag_dir)
    if rank == 0:
        print(f"ds_moe_div: resharding: {reshard.describe()}; loading it through DeepSpeed's universal checkpoint "
              f"({rundir.universal_dir(tag_dir)})", flush=True)
    universal = convert(tag_dir, rank=rank)
    try:
        loaded, client = engine.load_checkpoint(str(tag_dir), tag=universal.name, load_module_only=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
    except Exception as e:
        raise CheckpointError(f"cannot load the universal checkpoint {universal}: {type(e).__name__}: {e}. Delete "
                              f"that directory to convert {tag_dir.name} again") from e
    if loaded is None:
        raise CheckpointError(f"DeepSpeed found no loadable checkpoint in {universal}")
    restore_buffers(engine.module, tag_dir)
    rng_file = rundir.rng_path(tag_dir, rank)
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    state = dict(client["ds_moe_div"])
    state["loader"] = loader_position(state["loader"], global_batch=global_batch, where=tag_dir)
    return state


def restore_buffers(module: torch.nn.Module, tag_dir: Path) -> list[str]:
    """Copy the persistent buffers of `module` from the tag's model-state file (a universal load restores
    parameters only); returns their names. A buffer missing from the file is an error."""
    saved = torch.load(Path(tag_dir) / MODEL_STATES, map_location="cpu", weights_only=False)["module"]
    params = {name for name, _ in module.named_parameters()}
    names = []
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if name in params or name.endswith("tokens_per_expert"):  # AutoEP's per-step counter
                continue
            if name not in saved or saved[name].shape != value.shape:
                raise CheckpointError(f"{tag_dir / MODEL_STATES} lacks buffer {name} {tuple(value.shape)}: the "
                                      f"checkpoint is from another model")
            value.copy_(saved[name])
            names.append(name)
    return names


def loader_position(state: dict, *, global_batch: int, where: Path) -> dict:
    """The saved loader state with its position (steps of the saved global batch into the epoch) in steps
    of `global_batch`: the same sequences come next."""
    saved = int(state["global_batch_size"])
    if saved == global_batch:
        return state
    consumed = int(state["step"]) * saved
    if state.get("sampling") == "balanced":
        raise CheckpointError(f"{where} was trained with data.sampling=balanced and a global batch of {saved} "
                              f"sequences (micro-batch x world size), this run has {global_batch}: balanced "
                              f"sampling draws its order per global batch size. Set train.micro_batch_size to "
                              f"{saved} / world size (and train.gradient_accumulation_steps to keep the "
                              f"optimizer's batch)")
    if consumed % global_batch:
        raise CheckpointError(f"{where} stopped {consumed} sequences into epoch {state['epoch']}, which is not a whole "
                              f"number of this run's global batch ({global_batch} = micro-batch x world size): "
                              f"choose train.micro_batch_size so that it is")
    return {**state, "step": consumed // global_batch, "global_batch_size": global_batch}

