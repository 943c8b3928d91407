"""`python -m ds_moe_div train` on a tiny imported chat model (tokenizer without pad token, EOS <|im_end|>,
ChatML template) with instruction data: a few steps with the divergence objective (domain labels per
example), routing statistics and a held-out evaluation, `eval` on the test split's response tokens and `generate` with the checkpoint's tokenizer; then a tokenizer bigger than the embedding is
refused before anything is written."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.dist_utils import run_command
from tests.instruction_fixtures import instruction_rows, make_chat_dir, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
pytest.importorskip("transformers")


def _scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _train(tmp_path, run_dir, *extra):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "ds_moe_div", "train", "--deepspeed_config", str(ROOT / "ds_configs/ds_zero2_cpu.json")]
    for override in (f"model.pretrained={tmp_path / 'chat'}", f"data.corpus={tmp_path / 'sft.jsonl'}",
                     "data.format=instruction", "data.seq_len=64", "data.val_fraction=0.1", "data.test_fraction=0.1",
                     f"data.cache_dir={tmp_path / 'cache'}", f"train.run_dir={run_dir}", "train.steps=3",
                     "train.log_interval=1", "train.eval_interval=3", "train.eval_batches=1", "train.save_interval=3",
                     "train.heatmap_interval=3", "train.show_progress=false", "objectives.divergence.coef=0.01", *extra):
        cmd += ["--override", override]
    return run_command(cmd, cwd=tmp_path, env=env, timeout=300)


def test_train_on_instruction_data_with_the_checkpoint_tokenizer(tmp_path):
    make_chat_dir(tmp_path / "chat")
    write_jsonl(tmp_path / "sft.jsonl", instruction_rows(48))
    run_dir = tmp_path / "run"
    trained = _train(tmp_path, run_dir)
    assert trained.returncode == 0, trained.stdout[-3000:]
    scalars = _scalars(run_dir / "tensorboard")
    assert sorted(scalars["train/lm_loss"]) == [1, 2, 3]
    assert all(0 < v < 20 for v in scalars["train/lm_loss"].values())
    assert scalars["eval/val_lm_loss"][3] > 0 and "moe/divergence_unscaled" in scalars
    assert any(tag.startswith("routing/") for tag in scalars)
    (manifest,) = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("manifest.json")]
    assert manifest["eos_from"] == "tokenizer_config.json eos_token '<|im_end|>'"
    assert manifest["pad_id"] == manifest["eos_id"] and manifest["domain_names"] == ["code", "math"]
    assert manifest["stats"]["scored_tokens"]["train"] > 0
    assert json.loads((run_dir / "config.json").read_text())["data"]["format"] == "instruction"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    evaluated = run_command([sys.executable, "-m", "ds_moe_div", "eval", "--run-dir", str(run_dir), "--max-batches",
                             "1", "--permutation-seeds", "1", "--no-progress"], cwd=tmp_path, env=env, timeout=300)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:]
    report = json.loads(next((run_dir / "eval").rglob("report.json")).read_text())
    assert report["tokens"] == manifest["stats"]["scored_tokens"]["test"] > 0  # held-out loss on responses only
    generated = run_command([sys.executable, "-m", "ds_moe_div", "generate", str(run_dir), "--prompt", "What is 2?",
                             "--max-new-tokens", "4"], cwd=tmp_path, env=env, timeout=300)
    assert generated.returncode == 0 and "--- prompt 0" in generated.stdout, generated.stdout[-3000:]

    from tokenizers import Tokenizer  # a tokenizer with more ids than the embedding: refused, nothing written
    big = Tokenizer.from_file(str(tmp_path / "chat" / "tokenizer.json"))
    rows = json.loads((tmp_path / "chat" / "config.json").read_text())["vocab_size"]
    big.add_tokens([f"extra{i}" for i in range(rows + 1 - big.get_vocab_size())])
    (tmp_path / "big").mkdir()
    big.save(str(tmp_path / "big" / "tokenizer.json"))
    refused = _train(tmp_path, tmp_path / "run_big", f"data.tokenizer.path={tmp_path / 'big' / 'tokenizer.json'}")
    assert refused.returncode == 2
    assert f"has token ids up to {rows} ({rows + 1} rows) but" in refused.stdout
    assert f"embeds only {rows} tokens" in refused.stdout
    assert not (tmp_path / "run_big" / "checkpoints").exists()
