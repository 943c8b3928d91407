"""Checkpoint guards that run before any load: run-dir state, path resolution, architecture match."""
import json

import pytest

from ds_moe_div.checkpoint import CheckpointError, architecture, check_architecture, check_run_dir, resolve_checkpoint
from ds_moe_div.config import ModelConfig
from ds_moe_div.config_loader import to_dict


def make_checkpoint(run_dir, tag="global_step5"):
    root = run_dir / "checkpoints"
    (root / tag).mkdir(parents=True)
    (root / tag / "run_config.json").write_text("{}")
    (root / "latest").write_text(tag)
    return root


def test_fresh_start_over_checkpoints_is_refused_and_resume_needs_one(tmp_path):
    check_run_dir(tmp_path / "new", resume=False)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        check_run_dir(tmp_path / "new", resume=True)
    make_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="pass --resume.*Nothing was changed"):
        check_run_dir(tmp_path, resume=False)
    check_run_dir(tmp_path, resume=True)


def test_checkpoint_path_forms(tmp_path):
    root = make_checkpoint(tmp_path)
    assert resolve_checkpoint(tmp_path) == (root, "global_step5")
    assert resolve_checkpoint(root) == (root, "global_step5")
    assert resolve_checkpoint(root / "global_step5") == (root, "global_step5")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path / "elsewhere")


def test_architecture_mismatch_names_every_differing_key(tmp_path):
    saved = architecture(to_dict(ModelConfig()), 4096)
    current = architecture(to_dict(ModelConfig(d_model=256, n_layers=6)), 4096)
    with pytest.raises(CheckpointError, match="d_model: checkpoint 128 vs config 256; n_layers: checkpoint 4 vs "
                                              "config 6"):
        check_architecture(saved, current, tmp_path)
    # Capacity and ep_size do not change parameter shapes: loading across them is allowed.
    moe_only = architecture(to_dict(ModelConfig()) | {"moe": to_dict(ModelConfig().moe) | {"ep_size": 2}}, 4096)
    check_architecture(saved, moe_only, tmp_path)


def test_tokenizer_digest_ignores_formatting_and_a_changed_tokenizer_is_refused(tmp_path):
    model = to_dict(ModelConfig())
    vocab = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}, "added_tokens": []}
    (tmp_path / "a.json").write_text(json.dumps(vocab))
    (tmp_path / "a_pretty.json").write_text(json.dumps(vocab, indent=4, sort_keys=True))
    vocab["model"]["merges"] = [["a", "b"]]
    (tmp_path / "b.json").write_text(json.dumps(vocab))
    saved = architecture(model, 4096, tokenizer=tmp_path / "a.json")
    check_architecture(saved, architecture(model, 4096, tokenizer=tmp_path / "a_pretty.json"), tmp_path)
    check_architecture(architecture(model, 4096), saved, tmp_path)  # a checkpoint from before the digest: no check
    with pytest.raises(CheckpointError, match=r"trained with another tokenizer .* Set data.tokenizer.path="
                                              rf"{tmp_path}/tokenizer.json"):
        check_architecture(saved, architecture(model, 4096, tokenizer=tmp_path / "b.json"), tmp_path)
