"""SIGINT / SIGTERM end a run cleanly: the current optimizer step finishes, every rank agrees at the same
step (guard.RunGuard's per-step all-reduce), a checkpoint of that step is written, and the process exits
with 128 + the signal number (130 for Ctrl-C). A second SIGINT interrupts at once (KeyboardInterrupt).

The deepspeed launcher answers Ctrl-C by sending SIGTERM to the ranks and killing them 30 s later:
SIGTERM is therefore handled like SIGINT.
"""
from __future__ import annotations

import signal


class Interrupted(Exception):
    def __init__(self, signum: int, step: int, saved: str | None) -> None:
        self.signum, self.step, self.saved = signum, step, saved
        self.exit_code = 128 + signum
        where = f"checkpoint {saved} written" if saved else "no checkpoint written (see above)"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {where}. Continue with "
                         f"--resume (same command)")


class StopSignals:
    """While entered, SIGINT and SIGTERM set `received` instead of killing the process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = self.received or signum

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
