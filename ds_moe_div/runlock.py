"""An exclusive lock on a run directory for the whole run, so that two runs never write one run dir.

Rank 0 takes `fcntl.flock(LOCK_EX | LOCK_NB)` on <run_dir>/run.lock (rundir.lock_path) and records its pid,
host and start time in it; the kernel releases the lock when the process ends, however it ends, so a
lock left by a dead (even SIGKILLed) process is stale by construction and the next run takes it. The file
is never deleted (deleting a flock'ed file lets two processes lock two different files). A second run
is refused, on every rank, with a message naming the holder.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ds_moe_div import rundir
from ds_moe_div.rundir import CheckpointError


class RunLockedError(CheckpointError):
    pass


class RunLock:
    def __init__(self, run_dir) -> None:
        self.path = rundir.lock_path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(f"run dir {self.path.parent} is in use by another run ({self.holder()}); wait for "
                                 f"it to finish, stop it, or choose another train.run_dir. Nothing was changed.") from None
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def holder(self) -> str:
        try:
            info = json.loads(Path(self.path).read_text())
            return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def lock_run_dir(run_dir, *, is_main: bool) -> RunLock | None:
    """Rank 0 takes the lock; every rank learns whether it got it (one all-reduce) and all raise
    RunLockedError if not. Returns the held lock on rank 0, None elsewhere."""
    from ds_moe_div.agreement import any_rank

    lock, error = None, None
    if is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockedError as e:
            error = e
    (refused,) = any_rank([error is not None])
    if refused:
        raise error or RunLockedError(f"run dir {run_dir} is in use by another run (see rank 0's message)")
    return lock
