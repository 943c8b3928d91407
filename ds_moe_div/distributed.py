"""Process-level distributed set-up: init, rank facts, CPU threads, seeds, and which group reduces what.

Model code never imports this module; the trainer passes groups into the functions that need them.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ds_moe_div.fileio import free_port


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def ep_rank(self, ep_size: int) -> int:
        """Index within the expert-parallel group: DeepSpeed builds `ep_size_N` groups from consecutive ranks."""
        return self.rank % ep_size


def init_distributed() -> RankInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU); works for a plain 1-process run too."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    on_cpu = get_accelerator().device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else get_accelerator().communication_backend_name())
    info = RankInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ["LOCAL_RANK"]),
                    local_world_size=_local_world_size())
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(info.local_rank)
    elif info.world_size > 1:
        unlink_shm_buffer(info.rank)
    return info


def shm_buffer_path(rank: int) -> Path:
    """DeepSpeed's CPU shared-memory all-reduce buffer of `rank` (shm.cpp: name_uid_addr_port_rank)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                               f"{os.environ['MASTER_PORT']}_{rank}")


def unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed 0.19.8 never unlinks the 67 MB buffer each rank creates in /dev/shm, so every CPU
    launch leaks 67 MB per rank until the machine runs out of memory (a sweep of 30 runs: 4 GB). Each
    rank maps all peers' buffers inside deepspeed.init_distributed; after a barrier the names are no
    longer needed, and unlinking them frees the memory when the processes exit."""
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        shm_buffer_path(rank).unlink()


def _local_world_size() -> int:
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE; a bare process is alone.
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if key in os.environ:
            return int(os.environ[key])
    return 1 if "WORLD_SIZE" not in os.environ else int(os.environ["WORLD_SIZE"])


def deepspeed_executable() -> str:
    local = Path(sys.executable).parent / "deepspeed"
    found = str(local) if local.is_file() else shutil.which("deepspeed")
    if found is None:
        raise FileNotFoundError("the deepspeed launcher is not installed next to this Python nor on PATH; "
                                "install deepspeed (bash scripts/setup_env.sh)")
    return found


def set_cpu_threads(info: RankInfo) -> None:
    """One share of the cores per local rank: several ranks each using every core run ~5x slower."""
    if "OMP_NUM_THREADS" not in os.environ and info.local_world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


@contextlib.contextmanager
def main_rank_first(info: RankInfo):
    """Rank 0 runs the body first (e.g. builds a cache), then the others (which find it built)."""
    if not info.is_main:
        dist.barrier()
    yield
    if info.is_main and info.world_size > 1:
        dist.barrier()


def divergence_group(scope: str, moe_layer):
    """Group over which per-domain routing sums are all-reduced for the divergence loss.

    global: the whole data-parallel world (no tensor/pipeline parallelism here, so DP = world);
    expert_parallel: the layer's DeepSpeed expert-parallel group; micro_batch: no reduction.
    """
    if scope == "micro_batch":
        return None
    if scope == "expert_parallel":
        return moe_layer.expert_parallel_group()
    return dist.group.WORLD


def all_reduce_sum(values: torch.Tensor, group=None) -> torch.Tensor:
    """Sum a flat tensor over the group (in place, returned); a no-op without torch.distributed."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(values, group=group)
    return values
