"""Decisions every rank must take together (stop, skip a save, refuse a start): flags OR-ed over all ranks
with one small all-reduce, on the device the process group's backend reduces on."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def reduce_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flags: Sequence[bool | torch.Tensor]) -> list[bool]:
    """Each flag (a bool or a 0-d tensor) OR-ed over all ranks: ONE all-reduce (MAX) and one host read."""
    device = reduce_device()
    values = torch.stack([torch.as_tensor(f, device=device).reshape(()).to(device=device, dtype=torch.float32)
                          for f in flags])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]
