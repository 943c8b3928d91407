"""The one communication pattern of the losses: global sums over a process group whose gradient is the
local one, scaled so that DeepSpeed's gradient averaging yields the gradient of the global-batch loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def straight_through_sums(grad_parts: list[Tensor], plain_parts: list[Tensor],
                           group: dist.ProcessGroup | None) -> tuple[list[Tensor], list[Tensor]]:
    """Sums over the ranks of `group` with ONE all-reduce (SUM) of all parts, detached, in one buffer.

    `grad_parts` come back straight-through: global.detach() + N * (local - local.detach()), i.e. the
    value of the global sum with N times the gradient of the local one, which DeepSpeed's averaging over
    the N ranks turns into the gradient of the global sum. `plain_parts` come back as plain global sums
    (in the dtype of the first grad part). None or a group of size 1: everything unchanged.
    """
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        return grad_parts, plain_parts
    parts = [*grad_parts, *plain_parts]
    flat = torch.cat([part.detach().reshape(-1).to(grad_parts[0].dtype) for part in parts])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    sums = [chunk.view(part.shape) for chunk, part in zip(flat.split([p.numel() for p in parts]), parts)]
    grads = [total + world * (local - local.detach()) for total, local in zip(sums, grad_parts)]
    return grads, sums[len(grad_parts):]
