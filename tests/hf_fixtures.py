"""Tiny random Hugging Face checkpoints shared by the tests/test_hf_*.py modules (one per family, per session)."""
from __future__ import annotations

import copy

import pytest
import torch

from ds_moe_div.hf.families import SUPPORTED
from ds_moe_div.hf.load import load_pretrained
from ds_moe_div.hf.model import PretrainedMoELM
from ds_moe_div.hf.tiny import make_tiny

pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {f: make_tiny(family=f, out_dir=root / f, seed=3) for f in SUPPORTED}


def reference_and_ours(path) -> tuple[object, PretrainedMoELM]:
    """(plain transformers model with eager experts, our converted copy of the same weights)."""
    hf = load_pretrained(path)
    hf.set_experts_implementation("eager")
    ours = PretrainedMoELM(copy.deepcopy(hf), source=str(path))
    ours.convert()
    return hf, ours


def batch(vocab_size: int, *, seed: int = 0, shape=(2, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, next-token labels) avoiding the special ids 0 and 1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab_size, (shape[0], shape[1] + 1), generator=gen)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
