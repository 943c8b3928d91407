"""Checkpoints through `engine.save_checkpoint`, with the trainer's client state beside DeepSpeed's.

Layout (its names are owned by rundir.py): <run_dir>/checkpoints/<tag>/ holds DeepSpeed's files,
`run_config.json` (the resolved experiment config and the architecture facts that must match to load,
the tokenizer's digest among them), `tokenizer.json` (the tokenizer the run was trained with) and `rng_rank<r>.pt` (each rank's RNG).
The client state (step, data position, composer state) rides in DeepSpeed's own model-state file.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from ds_moe_div import fileio, rundir
from ds_moe_div.distributed import rng_state, set_rng_state
from ds_moe_div.rundir import CheckpointError, checkpoint_root, latest_tag, resolve_checkpoint

# Model-config keys that decide parameter shapes; anything else (capacity, ep_size...) may change.
ARCH_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "tie_embeddings", "moe.num_experts",
             "moe.layer_pattern", "moe.first_dense_layers", "moe.use_residual")



def check_run_dir(run_dir, *, resume: bool) -> None:
    """Refuse to start a fresh run over existing checkpoints, or to resume from none."""
    tag = latest_tag(checkpoint_root(run_dir))
    if tag is not None and not resume:
        raise CheckpointError(f"{run_dir} already holds checkpoints (latest: {tag}); pass --resume to continue it, "
                              f"or choose another train.run_dir. Nothing was changed.")
    if tag is None and resume:
        raise CheckpointError(f"--resume was given but {checkpoint_root(run_dir)} holds no checkpoint ('latest' "
                              f"file missing); drop --resume to start a new run")


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
         tokenizer: Path | None = None) -> Path:
    root = checkpoint_root(run_dir)
    tag = f"global_step{step}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"ds_moe_div": client})
    tag_dir = root / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), rundir.rng_path(tag_dir, rank))
    if rank == 0:
        if tokenizer is not None:
            with fileio.atomic_path(rundir.tokenizer_path(tag_dir)) as tmp:
                shutil.copyfile(tokenizer, tmp)
        fileio.write_json(rundir.run_config_path(tag_dir), {"config": run_config, "architecture": arch, "step": step})
    return tag_dir


def load(engine, path, *, arch: dict, rank: int, module_only: bool) -> dict:
    """Load a checkpoint into `engine`. `module_only`: weights only (a new run from these weights);
    else the full state (resume), returning the client state and restoring this rank's RNG."""
    root, tag = resolve_checkpoint(path)
    tag_dir = root / tag
    check_architecture(rundir.read_run_config(tag_dir)["architecture"], arch, tag_dir)
    try:
        loaded, client = engine.load_checkpoint(str(root), tag=tag, load_module_only=module_only,
                                                load_optimizer_states=not module_only,
                                                load_lr_scheduler_states=not module_only)
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
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
