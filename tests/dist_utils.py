"""Run a function on N real CPU processes over gloo and collect what each rank returns.

Used by every test of a computation that crosses ranks::

    results = run_on_ranks(my_fn, world_size=2, args=(x,))   # my_fn(rank, world_size, *args)

`my_fn` must be importable at module level (spawned processes re-import it). Each rank's return
value is pickled back; an exception on any rank fails the test with that rank's traceback.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from ds_moe_div.fileio import free_port


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: Sequence[Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch
    torch.set_num_threads(1)
    out = Path(out_dir) / f"rank{rank}.pkl"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        out.write_bytes(pickle.dumps(("ok", result)))
    except BaseException:  # noqa: BLE001 - the traceback is the test's report
        out.write_bytes(pickle.dumps(("error", traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable, *, world_size: int = 2, args: Sequence[Any] = (), timeout: float = 120.0) -> list:
    """Spawn `world_size` gloo processes running fn(rank, world_size, *args); return results by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), tmp, fn, tuple(args)),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"ranks did not finish within {timeout}s")
        results = []
        for rank in range(world_size):
            status, value = pickle.loads((Path(tmp) / f"rank{rank}.pkl").read_bytes())
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results


def run_command(cmd: list[str], *, cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run a command that may start a process tree (launcher + ranks); on timeout kill the whole group
    and fail the test with the output's tail."""
    import pytest

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[0]} timed out after {timeout}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")
