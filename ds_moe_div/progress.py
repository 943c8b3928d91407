"""Progress on a terminal (a tqdm bar) or in a log (one plain line every `log_every` updates), and the
end-of-training summary.

    with progress.bar(total=300, initial=0, desc="train", unit="step", enabled=is_main, log_every=10) as bar:
        bar.set_postfix(lm="3.112"); bar.update(1)

Off a terminal (CI, `nohup`, the deepspeed launcher's captured output) tqdm's carriage-return redraws
pile up into one line of tens of KB; there `LineProgress` prints `train: step 20/300 (7%) lm=3.112 ...
elapsed 12s, eta 2m48s` every `log_every` updates and at the end instead. This module owns that choice.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from ds_moe_div import rundir


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LineProgress:
    """tqdm's small API (update, set_postfix, set_postfix_str, close, context manager) as log lines."""

    def __init__(self, *, total: int, initial: int = 0, desc: str, unit: str, log_every: int,
                 stream: TextIO | None = None) -> None:
        if log_every < 1:
            raise ValueError(f"log_every={log_every} must be >= 1")
        self.total, self.n, self.desc, self.unit, self.log_every = total, initial, desc, unit, log_every
        self.stream = stream
        self.postfix = ""
        self._started, self._initial, self._last_printed = time.perf_counter(), initial, None

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.n // self.log_every > before // self.log_every or (self.total and self.n >= self.total > before):
            self._print()

    def line(self) -> str:
        elapsed = time.perf_counter() - self._started
        done = self.n - self._initial
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = ""
        if self.total and 0 < done and self.n < self.total:
            eta = f", eta {_duration(elapsed / done * (self.total - self.n))}"
        total = f"/{self.total}" if self.total else ""
        postfix = f" {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {self.unit} {self.n}{total}{pct}{postfix} | elapsed {_duration(elapsed)}{eta}"

    def _print(self) -> None:
        if self._last_printed != self.n:
            print(self.line(), file=self.stream or sys.stderr, flush=True)
            self._last_printed = self.n

    def write(self, text: str) -> None:
        """A message line (tqdm.write's counterpart)."""
        print(text, file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(*, total: int, initial: int = 0, desc: str, unit: str, enabled: bool, log_every: int,
        stream: TextIO | None = None):
    """A tqdm bar on a terminal, a LineProgress elsewhere; a disabled tqdm (a no-op) when not `enabled`."""
    from tqdm import tqdm

    stream = stream or sys.stderr
    if enabled and not is_terminal(stream):
        return LineProgress(total=total, initial=initial, desc=desc, unit=unit, log_every=log_every, stream=stream)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                file=stream)


def wrap(iterable, *, total: int | None = None, desc: str, unit: str, enabled: bool, log_every: int | None = None,
         stream: TextIO | None = None):
    """Iterate `iterable` with a `bar` (log_every None: about every tenth of `total`, else every 10,000)."""
    every = log_every or (max(1, total // 10) if total else 10_000)
    with bar(total=total or 0, desc=desc, unit=unit, enabled=enabled, log_every=every, stream=stream) as b:
        for item in iterable:
            yield item
            b.update(1)


def training_summary(run_dir, *, steps: int, seconds: float, last: dict[str, float], split: str = "val") -> str:
    """What a finished training prints: the final losses and where everything is (paths from rundir)."""
    run_dir = Path(run_dir).resolve()
    lines = [f"Done: {steps} steps in {_duration(seconds)}."]
    train_loss = last.get("train/lm_loss")
    heldout = last.get(f"eval/{split}_lm_loss")
    if train_loss is not None:
        lines.append(f"  final train LM loss:     {train_loss:.4f} (mean of the last logging window)")
    if heldout is not None:
        lines.append(f"  final held-out LM loss:  {heldout:.4f} ({split} split)")
    lines += [f"  checkpoints: {rundir.checkpoint_root(run_dir)}",
              f"  TensorBoard: tensorboard --logdir {rundir.tensorboard_dir(run_dir)}",
              f"  config:      {rundir.config_path(run_dir)}"]
    return "\n".join(lines)
