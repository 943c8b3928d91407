"""The run directory: its layout, and every lookup in it. Readers and writers of a run's files go through
these names and functions; no other module spells a file or folder name of the layout.

    <run_dir>/
        config.json                      the resolved experiment config (config.resumed_step<N>.json on resume)
        ds_config.json                   the DeepSpeed config the engine ran with
        tensorboard/                     training scalars, images, histograms
        run.lock                         held (flock) by rank 0 for the whole run: holder pid, host, start
        checkpoints/latest               the newest complete tag's name, moved last and atomically
        checkpoints/<tag>/               DeepSpeed's files, run_config.json ({config, architecture, step,
                                         shape}), tokenizer.json, rng_rank<r>.pt, and `complete`, written
                                         after everything else (a tag without it is ignored)
        checkpoints/<tag>/universal/     DeepSpeed's universal checkpoint of the tag, made once (reshard.py)
                                         when a resume runs on another world size or ep_size, with
                                         source_complete.json (the tag's `complete` it was made from)
        eval/<tag>[-<split>][-by-<column>][-as-trained]/
                                         report.json, report.md, figures/*.png, tensorboard/
        train.log, sweep_ds_config.json  written by `sweep`
"""
from __future__ import annotations

import json
import re
from pathlib import Path

CONFIG = "config.json"
DS_CONFIG = "ds_config.json"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "complete"
LOCK = "run.lock"
RUN_CONFIG = "run_config.json"
UNIVERSAL = "universal"
UNIVERSAL_SOURCE = "source_complete.json"
TOKENIZER = "tokenizer.json"
EVAL = "eval"
REPORT = "report.json"
REPORT_MD = "report.md"
FIGURES = "figures"
TRAIN_LOG = "train.log"
SWEEP_DS_CONFIG = "sweep_ds_config.json"


class CheckpointError(RuntimeError):
    pass


# ---- run dir --------------------------------------------------------------------------------------------------


def config_path(run_dir, step: int = 0) -> Path:
    """Where the resolved experiment config is written: config.json, or config.resumed_step<N>.json."""
    return Path(run_dir) / (CONFIG if step == 0 else f"config.resumed_step{step}.json")


def ds_config_path(run_dir) -> Path:
    return Path(run_dir) / DS_CONFIG


def tensorboard_dir(run_dir) -> Path:
    """The TensorBoard folder of a run dir (or of an eval output dir)."""
    return Path(run_dir) / TENSORBOARD


def lock_path(run_dir) -> Path:
    return Path(run_dir) / LOCK


def train_log(run_dir) -> Path:
    return Path(run_dir) / TRAIN_LOG


def sweep_ds_config(run_dir) -> Path:
    return Path(run_dir) / SWEEP_DS_CONFIG


# ---- checkpoints ----------------------------------------------------------------------------------------------


def checkpoint_root(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_path(root) -> Path:
    return Path(root) / LATEST


def latest_tag(root) -> str | None:
    """The tag named by <root>/latest (root: a checkpoints/ dir), or None when the file is missing, empty,
    unreadable or names no directory of `root` (a kill during its write)."""
    try:
        tag = latest_path(root).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not tag or "/" in tag or tag.startswith(".") or not (Path(root) / tag).is_dir():
        return None
    return tag


def complete_marker(tag_dir) -> Path:
    return Path(tag_dir) / COMPLETE


def tag_step(tag: str) -> int | None:
    match = re.fullmatch(r"global_step(\d+)", tag)
    return int(match.group(1)) if match else None


def checkpoint_tags(root) -> list[str]:
    """Every tag directory under `root`, complete or not, oldest step first."""
    root = Path(root)
    tags = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    return sorted(tags, key=lambda t: (tag_step(t) is None, tag_step(t) or 0, t))


def is_complete(root, tag: str) -> bool:
    """A tag whose writer finished: it holds the `complete` marker. In a run written before markers existed
    (no tag has one), the tag `latest` names counts when its run_config.json is there."""
    tag_dir = Path(root) / tag
    if complete_marker(tag_dir).is_file():
        return True
    legacy = not any(complete_marker(Path(root) / t).is_file() for t in checkpoint_tags(root))
    return legacy and latest_tag(root) == tag and run_config_path(tag_dir).is_file()


def complete_tags(root) -> list[str]:
    """The complete tags under `root`, oldest step first."""
    return [t for t in checkpoint_tags(root) if is_complete(root, t)]


def resume_tag(run_dir, requested: str | None = None) -> tuple[str, str | None]:
    """The tag a resume loads, and a note when it is not the one `latest` names (None otherwise).
    `requested`: that tag, which must be complete; else `latest` when complete, else the newest complete
    tag. CheckpointError when there is none."""
    root = checkpoint_root(run_dir)
    complete = complete_tags(root)
    if requested is not None:
        if requested not in complete:
            state = "is incomplete (its writer was interrupted)" if (root / requested).is_dir() else "does not exist"
            raise CheckpointError(f"checkpoint tag {requested!r} {state} in {root}; complete tags: "
                                  f"{', '.join(complete) or 'none'}")
        return requested, None
    latest = latest_tag(root)
    if latest is not None and latest in complete:
        return latest, None
    if not complete:
        raise CheckpointError(f"--resume was given but {root} holds no complete checkpoint"
                              f"{' (tags found: ' + ', '.join(checkpoint_tags(root)) + ')' if checkpoint_tags(root) else ''}"
                              f"; drop --resume to start a new run")
    raw = latest_path(root).read_text(errors="replace").strip() if latest_path(root).is_file() else None
    why = ("is missing" if raw is None else "is empty" if not raw else
           f"names {raw!r}, which is incomplete" if (root / raw).is_dir() else f"names {raw!r}, which does not exist")
    return complete[-1], f"{latest_path(root)} {why}; resuming from {complete[-1]}, the newest complete checkpoint"


def latest_tag_dir(run_dir) -> Path | None:
    root = checkpoint_root(run_dir)
    tag = latest_tag(root)
    return None if tag is None else root / tag


def tag_dir(run_dir, tag: str) -> Path:
    return checkpoint_root(run_dir) / tag


def run_dir_of(tag_dir) -> Path:
    """The run dir that holds the checkpoint tag dir `tag_dir`."""
    return Path(tag_dir).parent.parent


def run_config_path(tag_dir) -> Path:
    return Path(tag_dir) / RUN_CONFIG


def tokenizer_path(tag_dir) -> Path:
    return Path(tag_dir) / TOKENIZER


def rng_path(tag_dir, rank: int) -> Path:
    return Path(tag_dir) / f"rng_rank{rank}.pt"


def universal_dir(tag_dir) -> Path:
    """The tag's DeepSpeed universal checkpoint (resharding; moved into place whole, so present = complete)."""
    return Path(tag_dir) / UNIVERSAL


def universal_source_path(tag_dir) -> Path:
    """In the tag's universal checkpoint: the tag's `complete` marker it was converted from."""
    return universal_dir(tag_dir) / UNIVERSAL_SOURCE


def lora_state_path(tag_dir, rank: int) -> Path:
    """A LoRA run's trainable state of one rank (adapters, optimizer...; ds_moe_div/hf/lora_checkpoint.py)."""
    return Path(tag_dir) / f"lora_state_rank{rank}.pt"


def lora_base_path(tag_dir) -> Path:
    """The base model a LoRA checkpoint adapts: its directory and digest."""
    return Path(tag_dir) / "lora_base.json"


def resolve_checkpoint(path) -> tuple[Path, str]:
    """Accept a run dir, its checkpoints/ dir, or one tag dir; return (checkpoints root, tag)."""
    p = Path(path)
    for root in (checkpoint_root(p), p):
        tag = latest_tag(root)
        if tag is not None and is_complete(root, tag):
            return root, tag
        complete = complete_tags(root)
        if complete:  # `latest` empty or naming an interrupted tag: the newest complete one
            return root, complete[-1]
    if run_config_path(p).is_file():
        return p.parent, p.name
    raise CheckpointError(f"no checkpoint at {p}: expected a run dir, its {CHECKPOINTS}/ dir (with a '{LATEST}' "
                          f"file) or a checkpoint tag dir")


def read_run_config(tag_dir) -> dict:
    """A checkpoint's run_config.json: {"config": resolved experiment config, "architecture", "step"}."""
    path = run_config_path(tag_dir)
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is missing or corrupt ({e}); the checkpoint was not written completely: "
                              f"use another tag") from None
    model = saved.get("config", {}).get("model") if isinstance(saved, dict) else None
    if isinstance(model, dict) and "backend" not in model and model.get("pretrained") is None:
        model["backend"] = "native"  # written before from-scratch models defaulted to the AutoEP layer
    return saved


def latest_step(run_dir) -> int | None:
    """Step of the run's latest checkpoint (run_config.json, else the global_step<N> tag), or None."""
    tag_dir = latest_tag_dir(run_dir)
    if tag_dir is None:
        return None
    try:
        return int(json.loads(run_config_path(tag_dir).read_text())["step"])
    except (OSError, ValueError, KeyError):
        match = re.fullmatch(r"global_step(\d+)", tag_dir.name)
        return int(match.group(1)) if match else None


# ---- evaluation reports ---------------------------------------------------------------------------------------


def eval_dir(run_dir, name: str) -> Path:
    return Path(run_dir) / EVAL / name


def report_path(out_dir) -> Path:
    return Path(out_dir) / REPORT


def report_md_path(out_dir) -> Path:
    return Path(out_dir) / REPORT_MD


def figure_path(out_dir, name: str) -> Path:
    return Path(out_dir) / FIGURES / f"{name}.png"


def find_report(run_dir, *, split: str, column: str | None = None, step: int | None = None) -> Path | None:
    """The report of <run_dir>/eval/*/ for `split` and label `column` (None: the run's own domain_column),
    at checkpoint `step` (None: the highest step). Among equals, true-label reports win (a shuffled-label
    run may also hold an --as-trained-labels one), then the newest. Unreadable reports are skipped."""
    found = []
    for path in (Path(run_dir) / EVAL).glob(f"*/{REPORT}"):
        try:
            report = json.loads(path.read_text())
            own = report.get("config", {}).get("data", {}).get("domain_column")
            key = (report["step"], str(report.get("labels", "true")).startswith("true"), path.stat().st_mtime)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        wanted = column or own  # a report without its config (hand-written) matches any column
        if report.get("split") != split or (wanted is not None and report.get("domain_column") != wanted):
            continue
        if step is None or report["step"] == step:
            found.append((*key, path))
    return max(found)[-1] if found else None


def resolve_report(path, *, split: str, column: str | None = None) -> Path:
    """A report.json, an eval output dir, or a run dir (its find_report) -> the report.json path."""
    p = Path(path)
    if p.is_file():
        return p
    if report_path(p).is_file():
        return report_path(p)
    found = find_report(p, split=split, column=column)
    if found is None:
        raise FileNotFoundError(f"no {split!r} report under {p / EVAL}; run `python -m ds_moe_div eval --run-dir {p}` "
                                f"(with --split {split}) first, or pass a {REPORT}")
    return found
