"""Checkpoints through `engine.save_checkpoint`, with the trainer's client state beside DeepSpeed's.

Layout (its names are owned by rundir.py): <run_dir>/checkpoints/<tag>/ holds DeepSpeed's files,
`run_config.json` (the resolved experiment config, the architecture facts that must match to load, the
tokenizer's digest among them, and the shape: world size and ep_size), `tokenizer.json` (the tokenizer
the run was trained with), `rng_rank<r>.pt` (each rank's RNG) and the `complete` marker.
The client state (step, data position, composer state) rides in DeepSpeed's own model-state file.

Crash safety: everything is written into the tag first (DeepSpeed with save_latest=False, then the
trainer's files, then `complete` once every rank is done); `latest` moves last, atomically (fileio). A
kill at any moment leaves `latest` on a complete tag; a resume falls back to the newest complete tag when
`latest` is empty or names an interrupted one (rundir.resume_tag). DeepSpeed's `zero_to_fp32.py` is
removed from the checkpoints: it cannot read these MoE checkpoints (the project's loading / `export` can).
A full disk during a save ends the run with DiskFullError (exit code 4), the previous checkpoint intact.
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ds_moe_div import faults, fileio, rundir
from ds_moe_div.agreement import any_rank
from ds_moe_div.distributed import rng_state, set_rng_state
from ds_moe_div.hf import lora_checkpoint
from ds_moe_div.rundir import CheckpointError, checkpoint_root, resolve_checkpoint

# DeepSpeed copies these next to the tags; zero_to_fp32 fails on MoE checkpoints ("... is not a model state
# checkpoint"), so neither is left there (the project's loading / `export` gives consolidated weights).
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
DISK_FULL_EXIT_CODE = 4


class DiskFullError(RuntimeError):
    exit_code = DISK_FULL_EXIT_CODE

# Model-config keys that decide parameter shapes; anything else (capacity, ep_size...) may change.
ARCH_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "tie_embeddings", "moe.num_experts",
             "moe.layer_pattern", "moe.first_dense_layers", "moe.use_residual")



def check_run_dir(run_dir, *, resume: bool) -> None:
    """Refuse to start a fresh run over existing checkpoints, or to resume from none."""
    root = checkpoint_root(run_dir)
    complete = rundir.complete_tags(root)
    if complete and not resume:
        raise CheckpointError(f"{run_dir} already holds checkpoints (newest complete: {complete[-1]}); pass --resume "
                              f"to continue it, or choose another train.run_dir. Nothing was changed.")
    if resume and not complete:
        tags = rundir.checkpoint_tags(root)
        raise CheckpointError(f"--resume was given but {root} holds no checkpoint"
                              f"{' that was written completely (incomplete: ' + ', '.join(tags) + ')' if tags else ''}"
                              f"; drop --resume to start a new run")


def architecture(model_cfg: dict, vocab_size: int, *, tokenizer: Path | None = None) -> dict:
    """The facts a checkpoint must share with the model that loads it; with `tokenizer` (the data's
    tokenizer.json) also its digest, so that weights never meet token ids they were not trained on."""
    flat = {"vocab_size": vocab_size}
    for key in ARCH_KEYS[1:]:
        node = model_cfg
        for part in key.split("."):
            node = node[part]
        flat[key] = node
    if tokenizer is not None:
        flat["tokenizer_sha256"] = tokenizer_digest(tokenizer)
    return flat


def tokenizer_digest(path: Path) -> str:
    """sha256 of the tokenizer's canonical JSON (key order and whitespace do not count)."""
    canonical = json.dumps(json.loads(Path(path).read_text(encoding="utf-8")), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_architecture(saved: dict, current: dict, where: Path) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in ARCH_KEYS
             if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {where} does not match the model: " + "; ".join(diffs) +
                              ". Use the checkpoint's model settings (see its run_config.json) or another checkpoint.")
    theirs, ours = saved.get("tokenizer_sha256"), current.get("tokenizer_sha256")
    if theirs and ours and theirs != ours:  # checkpoints written before the digest was recorded carry none
        raise CheckpointError(
            f"checkpoint {where} was trained with another tokenizer (sha256 {theirs[:12]}) than this config's data "
            f"uses ({ours[:12]}): the corpus, its split or the tokenizer settings changed since, so token ids would "
            f"not mean what the weights learned. Set data.tokenizer.path={rundir.tokenizer_path(where)} to reuse the "
            f"checkpoint's tokenizer, or restore the data it was trained on.")


def save(engine, run_dir, *, step: int, client: dict, run_config: dict, arch: dict, rank: int,
         tokenizer: Path | None = None, shape: dict | None = None) -> Path:
    """Write the tag of `step` completely, then move `latest` to it (module docstring). `shape`:
    {"world_size", "ep_size"} the run trains with (checked on resume)."""
    root = checkpoint_root(run_dir)
    tag = f"global_step{step}"
    tag_dir = root / tag
    previous = rundir.resume_tag(run_dir)[0] if rundir.complete_tags(root) else None
    # Refused before a byte is written when the last checkpoint would not fit again: every rank stops
    # together here, where a failure inside DeepSpeed's save could leave the other ranks waiting.
    (short,) = any_rank([rank == 0 and previous is not None and not _fits(root, root / previous)])
    if short:
        raise DiskFullError(f"no space left on {root} while saving {tag}; the last complete checkpoint is {previous} "
                            f"(kept; {_free_text(root)} free, it took {_size(root / previous) / 2**20:.1f} MiB). Free "
                            f"space and continue with --resume")
    error = None
    if rank == 0:  # an older tag of this step (a resume from an earlier tag) is incomplete from now on
        rundir.complete_marker(tag_dir).unlink(missing_ok=True)
        shutil.rmtree(rundir.universal_dir(tag_dir), ignore_errors=True)  # converted from the older write
    try:
        _save_engine(engine, root, tag, {"ds_moe_div": client}, rank)
        faults.inject("save", step=step, rank=rank)
        _write_trainer_files(tag_dir, step=step, run_config=run_config, arch=arch, rank=rank, tokenizer=tokenizer,
                             shape=shape)
    except (OSError, RuntimeError) as e:
        if not _is_disk_full(e, root):
            raise
        error = e
    (failed,) = any_rank([error is not None])
    if failed:
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)  # frees the space the partial tag took
        raise DiskFullError(f"no space left on {root} while saving {tag}; the last complete checkpoint is "
                            f"{previous or 'none'} (kept; the partial {tag} was removed). Free space and continue "
                            f"with --resume") from error
    if dist.is_initialized():
        dist.barrier()  # every rank's files are in the tag
    if rank == 0:
        fileio.write_json(rundir.complete_marker(tag_dir), {"step": step, "written": time.strftime("%Y-%m-%dT%H:%M:%S")})
        fileio.write_text(rundir.latest_path(root), tag)
    faults.inject("latest", step=step, rank=rank)
    if dist.is_initialized():
        dist.barrier()
    return tag_dir


def _write_trainer_files(tag_dir: Path, *, step: int, run_config: dict, arch: dict, rank: int,
                         tokenizer: Path | None, shape: dict | None) -> None:
    with fileio.atomic_path(rundir.rng_path(tag_dir, rank)) as tmp:
        torch.save(rng_state(), tmp)
    if rank != 0:
        return
    if tokenizer is not None:
        with fileio.atomic_path(rundir.tokenizer_path(tag_dir)) as tmp:
            shutil.copyfile(tokenizer, tmp)
    for script in RECOVERY_SCRIPTS:
        (tag_dir / script).unlink(missing_ok=True)
        (tag_dir.parent / script).unlink(missing_ok=True)
    fileio.write_json(rundir.run_config_path(tag_dir), {"config": run_config, "architecture": arch, "step": step,
                                                        "shape": shape})


DISK_FULL_TEXT = ("No space left", "iostream error", "basic_ios::clear", "PytorchStreamWriter failed",
                  "unexpected pos", "file write failed")
LOW_SPACE_BYTES = 256 * 2**20


def _size(tag_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(tag_dir).rglob("*") if p.is_file())


def _fits(root: Path, previous: Path) -> bool:
    """Room for another checkpoint the size of `previous` (plus 5%)."""
    try:
        return shutil.disk_usage(root).free >= 1.05 * _size(previous)
    except OSError:
        return True  # cannot tell: try, and catch a failure


def _free_text(root: Path) -> str:
    try:
        return f"{shutil.disk_usage(root).free / 2**20:.0f} MiB"
    except OSError:
        return "unknown"


def _is_disk_full(error: BaseException, root: Path) -> bool:
    """ENOSPC, or torch's serializer failing (its message never says why) while the disk is nearly full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if not any(marker in text for marker in DISK_FULL_TEXT):
        return False
    if "No space left" in text:
        return True
    try:
        return shutil.disk_usage(root).free < LOW_SPACE_BYTES
    except OSError:
        return False


def saved_shape(tag_dir: Path) -> dict:
    """{"world_size", "ep_size"} a tag was written with (older tags: counted from their RNG files)."""
    saved = rundir.read_run_config(tag_dir)
    shape = saved.get("shape") or {}
    ep = shape.get("ep_size", saved.get("config", {}).get("model", {}).get("moe", {}).get("ep_size", 1))
    world = shape.get("world_size") or len(list(Path(tag_dir).glob("rng_rank*.pt")))
    return {"world_size": world, "ep_size": ep}


def check_shape(tag_dir: Path, current: dict) -> None:
    """Refuse, before DeepSpeed reads a byte, to resume on another world size or ep_size."""
    saved = saved_shape(tag_dir)
    if saved["world_size"] == current["world_size"] and saved["ep_size"] == current["ep_size"]:
        return
    raise CheckpointError(
        f"checkpoint {tag_dir} was saved by {saved['world_size']} rank(s) with model.moe.ep_size={saved['ep_size']}, "
        f"but this run has {current['world_size']} rank(s) with ep_size={current['ep_size']}: the optimizer and "
        f"expert states of DeepSpeed's native MoE layers (model.backend='native') cannot be resharded (models on "
        f"DeepSpeed's AutoEP layer, from scratch with model.backend='autoep' or imported with model.pretrained, are "
        f"resharded by --resume). Resume with {saved['world_size']} rank(s) and "
        f"model.moe.ep_size={saved['ep_size']}, or start a new run from its weights only with "
        f"train.init_from={rundir.run_dir_of(tag_dir)} (no --resume; optimizer state and data position restart)")


def load(engine, path, *, arch: dict, rank: int, module_only: bool, tag: str | None = None,
         shape: dict | None = None) -> dict:
    """Load a checkpoint into `engine`. `module_only`: weights only (a new run from these weights);
    else the full state (resume), returning the client state and restoring this rank's RNG. `tag`: this
    tag of the run dir `path` (None: resolve_checkpoint); `shape`: this run's world size and ep_size,
    which a resume must share with the checkpoint."""
    from deepspeed.runtime.zero.utils import ZeRORuntimeException  # not a RuntimeError

    root, tag = (checkpoint_root(path), tag) if tag is not None else resolve_checkpoint(path)
    tag_dir = root / tag
    check_architecture(rundir.read_run_config(tag_dir)["architecture"], arch, tag_dir)
    if not module_only and shape is not None:
        check_shape(tag_dir, shape)
    lora_checkpoint.check_base(getattr(engine, "module", None), tag_dir)
    try:
        loaded, client = _load_engine(engine, root, tag, module_only, rank)
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, ZeRORuntimeException) as e:
        raise CheckpointError(f"cannot load checkpoint {tag_dir}: {type(e).__name__}: {e}. The files may be "
                              f"truncated or from another model; use another tag (see {root})") from e
    if loaded is None:
        raise CheckpointError(f"DeepSpeed found no loadable checkpoint in {tag_dir}")
    if module_only:
        return {}
    rng_file = rundir.rng_path(tag_dir, rank)
    if not rng_file.is_file():
        raise CheckpointError(f"{rng_file} is missing: resume with the same number of ranks the run was saved with")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client["ds_moe_div"]


def _save_engine(engine, root: Path, tag: str, client: dict, rank: int) -> None:
    """DeepSpeed's checkpoint, or a LoRA run's trainable state only (hf/lora_checkpoint.py)."""
    if lora_checkpoint.is_lora(getattr(engine, "module", None)):
        lora_checkpoint.save(engine, root / tag, client=client, rank=rank)
    else:
        engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)


def _load_engine(engine, root: Path, tag: str, module_only: bool, rank: int):
    if lora_checkpoint.is_lora(getattr(engine, "module", None)):
        return tag, lora_checkpoint.load(engine, root / tag, rank=rank, module_only=module_only)
    return engine.load_checkpoint(str(root), tag=tag, load_module_only=module_only,
                                  load_optimizer_states=not module_only, load_lr_scheduler_states=not module_only)
