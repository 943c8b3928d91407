"""Gradient parity of DeepSpeed ZeRO-2 (bf16 or fp32) against a plain fp32 reference, with modules used twice.

DeepSpeed issue #8224: ZeRO-2 + bf16 computed wrong gradients on several ranks when a submodule is
used more than once in one step. `TwiceUsed` uses two parameters twice per forward: `shared` (one
Linear applied at two depths) and `embed.weight` (tied input embedding and output head). Each rank
runs one ZeRO-2 step on its shard of a fixed batch; `relative_errors` compares the full gradients
(`safe_get_full_grad`) with the fp32 gradient of the concatenated batch:

    err(p) = ||g_zero2(p) - g_ref(p)||_2 / ||g_ref(p)||_2

Runs on CPU (gloo, tests/test_bf16_parity.py) and on GPU (scripts/gpu_check.py). `dropped_use_error`
is the error a gradient would have if one of the two uses were lost: the size of the failure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, D_MODEL, SEQ, ROWS_PER_RANK = 64, 32, 16, 4


class TwiceUsed(nn.Module):
    """Tied embedding/head and one Linear applied twice: every parameter but the norm is used twice."""

    def __init__(self, vocab: int = VOCAB, d_model: int = D_MODEL) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.shared = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, ids_BS: torch.Tensor, targets_BS: torch.Tensor, drop_second_use: bool = False):
        h_BSM = self.embed(ids_BS)
        h_BSM = h_BSM + torch.tanh(self.shared(h_BSM))
        second = self.shared(self.norm(h_BSM))
        h_BSM = h_BSM + torch.tanh(second.detach() if drop_second_use else second)
        logits = F.linear(h_BSM, self.embed.weight)  # tied head: the embedding's second use
        return F.cross_entropy(logits.float().flatten(0, 1), targets_BS.flatten())


def make_model(seed: int) -> TwiceUsed:
    torch.manual_seed(seed)
    return TwiceUsed()


def make_batch(seed: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (world_size * ROWS_PER_RANK rows), identical on every rank."""
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, VOCAB, (world_size * ROWS_PER_RANK, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def reference_grads(seed: int, world_size: int, *, drop_second_use: bool = False) -> dict[str, torch.Tensor]:
    """fp32 gradients of the mean loss over the concatenated batch (= the mean of equal rank shards)."""
    model = make_model(seed)
    ids, targets = make_batch(seed, world_size)
    model(ids, targets, drop_second_use=drop_second_use).backward()
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for name, p in model.named_parameters()}


def ds_config(bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": ROWS_PER_RANK,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True,
                              "overlap_comm": False},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1_000_000,
    }


def zero2_grads(rank: int, world_size: int, *, seed: int, bf16: bool) -> dict[str, torch.Tensor]:
    """One ZeRO-2 backward on this rank's shard; returns every parameter's full fp32 gradient on CPU.

    torch.distributed must be initialised (world_size ranks); DeepSpeed picks the accelerator.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import safe_get_full_grad

    model = make_model(seed)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=ds_config(bf16))
    ids, targets = make_batch(seed, world_size)
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    device = get_accelerator().current_device_name()
    loss = engine(ids[rows].to(device), targets[rows].to(device))
    engine.backward(loss)
    grads = {name: safe_get_full_grad(p).detach().float().cpu() for name, p in engine.module.named_parameters()}
    engine.destroy()
    return grads


def relative_errors(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float((grads[name].float() - g).norm() / g.norm()) for name, g in ref.items()}


def dropped_use_error(seed: int, world_size: int) -> dict[str, float]:
    """Relative error of the reference gradient with the second use of `shared` lost (a #8224-like bug)."""
    full = reference_grads(seed, world_size)
    return relative_errors(reference_grads(seed, world_size, drop_second_use=True), full)
