"""What the trainer checks after every optimizer step, for all ranks at once: a non-finite loss (or a step
the optimizer skipped for non-finite gradients) and a stop signal, in ONE all-reduce of two flags (and
one host read of them) per step.

    guard = RunGuard(max_nonfinite_steps=5)
    with guard.signals:
        loss = train_step(...); step += 1
        stop = guard.after_step(loss, step=step)   # raises NonFiniteLossError after N bad steps in a row
        if guard.may_save(engine): save()
"""
from __future__ import annotations

import torch

from ds_moe_div.agreement import any_rank
from ds_moe_div.interrupt import StopSignals
from ds_moe_div.nonfinite import NonFiniteCounter, parameters_nonfinite, step_nonfinite


class RunGuard:
    def __init__(self, *, max_nonfinite_steps: int) -> None:
        self.counter = NonFiniteCounter(max_nonfinite_steps)
        self.signals = StopSignals()
        self.stop_signal: int | None = None  # agreed over ranks
        self.last_saved: str | None = None

    def after_step(self, loss: torch.Tensor | None, *, step: int, applied: bool = True) -> bool:
        """Record this step's loss; True when a stop signal reached any rank (stop after this step).
        `applied=False`: the optimizer skipped the step (DeepSpeed found non-finite gradients), which counts
        as a non-finite step too."""
        nonfinite, stop = any_rank([step_nonfinite(loss) | (not applied), self.signals.received is not None])
        if stop and self.stop_signal is None:
            import signal
            self.stop_signal = self.signals.received or signal.SIGINT
        self.counter.update(nonfinite, step=step, last_saved=self.last_saved)
        return stop

    def may_save(self, module: torch.nn.Module) -> bool:
        """Whether this step's state may become a checkpoint: the last loss was finite and no rank holds a
        non-finite parameter (one all-reduce, only at checkpoint steps)."""
        (bad,) = any_rank([parameters_nonfinite(module)])
        return self.counter.last_finite and not bad


def step_applied(engine) -> bool:
    """Whether the optimizer applied the last step, for `RunGuard.after_step`. DeepSpeed skips a step whose
    gradients are non-finite; with fp16's dynamic loss scaling such skips are part of finding the scale,
    so they do not count there (a NaN loss still does)."""
    return engine.was_step_applied() or engine.fp16_enabled()
