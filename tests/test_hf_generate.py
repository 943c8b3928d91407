"""`generate` and `eval --tasks cloze` on a run of an imported Hugging Face MoE (DeepSeek-V3, Loss-Free
balancing, trained 2 steps on 2 ranks with EP=2; generated and scored in one process with EP=1):
greedy is deterministic, stops at EOS, and equals transformers' greedy `generate` on the exported model;
the cloze task gives an accuracy in [0, 1]."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests import hf_fixtures
from tests.dist_utils import run_command, run_on_ranks

tiny_dirs = hf_fixtures.tiny_dirs  # session fixture
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
ROOT = Path(__file__).resolve().parents[1]
DS_ZERO2 = ROOT / "ds_configs" / "ds_zero2_cpu.json"
PROMPT = [5, 9, 17, 33, 2, 40]


def _train(rank, world_size, pretrained, run_dir):
    from ds_moe_div.config import load_experiment
    from ds_moe_div.session import build
    from ds_moe_div.train import run

    cfg = load_experiment(None, [f"model.pretrained={pretrained}", "model.moe.ep_size=2", "data.seq_len=32",
                                 f"data.cache_dir={run_dir}/cache", f"train.run_dir={run_dir}", "train.steps=2",
                                 "train.log_interval=1", "train.eval_interval=2", "train.eval_batches=1",
                                 "train.save_interval=2", "train.show_progress=false",
                                 "objectives.balance.method=loss_free"])
    ds = json.loads(DS_ZERO2.read_text())
    ds["scheduler"]["params"].update(warmup_num_steps=1, warmup_min_ratio=1.0)
    run(build(cfg, ds))


def _generate(rank, world_size, run_dir, export_dir):
    import torch

    from ds_moe_div import cli
    from ds_moe_div.evaluation.generation import generate
    from ds_moe_div.evaluation.loading import load_model_only
    from ds_moe_div.hf.load import load_pretrained

    loaded = load_model_only(run_dir)
    scorer = loaded.scorer()
    first = generate(scorer, PROMPT, max_new_tokens=6)
    again = generate(scorer, PROMPT, max_new_tokens=6)
    # EOS = the 3rd greedy token: generation must stop just before its first occurrence.
    eos = first.token_ids[2]
    stopped = generate(_with_eos(scorer, eos), PROMPT, max_new_tokens=6)
    assert cli.main(["export", str(run_dir), str(export_dir)]) == 0
    hf = load_pretrained(export_dir)
    hf.set_experts_implementation("eager")
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                             pad_token_id=loaded.pad_id, min_new_tokens=6)[0, len(PROMPT):].tolist()
    return {"first": first.token_ids, "again": again.token_ids, "reason": first.stop_reason,
            "stopped": stopped.token_ids, "stopped_reason": stopped.stop_reason, "eos": eos,
            "theirs": theirs, "ids": (loaded.pad_id, loaded.eos_id), "step": loaded.step,
            "type": type(loaded.model).__name__}


def _with_eos(scorer, eos):
    import copy
    other = copy.copy(scorer)
    other.eos_id = eos
    return other


@pytest.fixture(scope="module")
def run_dir(tiny_dirs, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_generate") / "run"
    run_on_ranks(_train, world_size=2, timeout=600, args=(str(tiny_dirs["deepseek_v3"]), str(directory)))
    return directory


def test_greedy_generation_on_an_imported_run_matches_transformers(run_dir, tmp_path):
    out = run_on_ranks(_generate, world_size=1, timeout=600, args=(str(run_dir), str(tmp_path / "hf")))[0]
    assert out["type"] == "PretrainedMoELM" and out["step"] == 2
    assert out["ids"] == (0, 1)  # the checkpoint tokenizer's <|pad|>, <|eos|>
    assert out["first"] == out["again"] and len(out["first"]) == 6 and out["reason"] == "max_new_tokens"
    assert out["stopped_reason"] == "eos"
    assert out["stopped"] == out["first"][:out["first"].index(out["eos"])]
    assert out["theirs"] == out["first"]


def test_generate_cli_and_cloze_task_on_an_imported_run(run_dir):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    gen = run_command([sys.executable, "-m", "ds_moe_div", "generate", str(run_dir), "--prompt", "The router",
                       "--prompt", "The router", "--max-new-tokens", "5"], cwd=run_dir.parent, env=env, timeout=300)
    assert gen.returncode == 0, gen.stdout[-4000:]
    heads = [line.split(")")[0].split("(")[1] for line in gen.stdout.splitlines() if line.startswith("--- prompt ")]
    assert len(heads) == 2 and heads[0] == heads[1], gen.stdout[-4000:]  # greedy: same stop reason and length
    ev = run_command([sys.executable, "-m", "ds_moe_div", "eval", "--run-dir", str(run_dir), "--max-batches", "1",
                      "--permutation-seeds", "1", "--no-progress", "--tasks", "cloze", "--cloze-context-tokens", "5",
                      "--cloze-continuation-tokens", "3", "--ablation", "off"], cwd=run_dir.parent, env=env, timeout=300)
    assert ev.returncode == 0, ev.stdout[-4000:]
    cloze = json.loads(next((run_dir / "eval").rglob("report.json")).read_text())["tasks"]["cloze"]
    assert 0.0 <= cloze["acc"] <= 1.0 and cloze["items"] > 0
