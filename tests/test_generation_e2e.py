"""An EP=2 checkpoint (2 gloo ranks) in one process: the same token NLL as the 2-rank model, and the
`generate` command on it (greedy twice = the same text; sampling follows its seed).

    .venv/bin/python -m pytest tests/test_generation_e2e.py -q      (~1 minute on 2 cores)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.dist_utils import run_command, run_on_ranks
from tests.train_utils import train_smoke

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2

pytestmark = pytest.mark.slow


def _batch():
    import torch

    ids = (torch.arange(2 * 32).view(2, 32) * 7919) % 500 + 2
    return ids, torch.roll(ids, -1, dims=1)


def _train_ep2(rank, world_size, run_dir):
    import torch

    state = train_smoke(run_dir, steps=STEPS, overrides=["model.moe.ep_size=2"])
    state.engine.eval()
    ids, labels = _batch()  # the same batch on both ranks: each rank's experts serve both
    with torch.no_grad():
        return state.engine(ids, labels_BS=labels).token_nll_BS.tolist()


def _one_process(rank, world_size, run_dir):
    import torch

    from ds_moe_div.evaluation.loading import load_model_only

    loaded = load_model_only(run_dir)
    ids, labels = _batch()
    with torch.no_grad():
        nll = loaded.model(ids, labels_BS=labels).token_nll_BS.tolist()
    return {"nll": nll, "ep_size": loaded.cfg.model.moe.ep_size, "step": loaded.step}


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "run"
    nll = run_on_ranks(_train_ep2, world_size=2, args=(str(path),), timeout=300)
    return path, nll


def test_an_ep2_checkpoint_loads_into_one_process_with_the_same_outputs(ep2_run):
    path, nll = ep2_run
    assert nll[0] == nll[1]
    [loaded] = run_on_ranks(_one_process, world_size=1, args=(str(path),), timeout=300)
    assert loaded["ep_size"] == 1 and loaded["step"] == STEPS
    flat = [v for row in nll[0] for v in row]
    assert [v for row in loaded["nll"] for v in row] == pytest.approx(flat, rel=1e-5, abs=1e-6)


def _generate(path: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "ds_moe_div", "generate", str(path), "--prompt", "def add(a, b):",
           "--max-new-tokens", "12", *args]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = run_command(cmd, cwd=path.parent, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout[proc.stdout.index("--- prompt 0"):]


def test_generate_command_is_deterministic(ep2_run):
    path, _ = ep2_run
    greedy = _generate(path)
    assert greedy == _generate(path) and "def add(a, b):" in greedy
    assert greedy.split("\n")[0].endswith("new tokens)")
    sampled = _generate(path, "--temperature", "1.0", "--seed", "3")
    assert sampled == _generate(path, "--temperature", "1.0", "--seed", "3")
    bad = run_command([sys.executable, "-m", "ds_moe_div", "generate", str(path), "--prompt", "x", "--top-p", "0"],
                      cwd=path.parent, env=dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT)), timeout=180)
    assert bad.returncode == 2 and "top_p=0.0" in bad.stdout
