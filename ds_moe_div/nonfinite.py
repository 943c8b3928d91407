"""Non-finite losses: count consecutive optimizer steps whose loss is NaN/inf and stop the run after
`train.max_nonfinite_steps` of them; a checkpoint is written only from finite weights after a finite step.
"""
from __future__ import annotations

import torch

EXIT_CODE = 3


class NonFiniteLossError(RuntimeError):
    exit_code = EXIT_CODE


class NonFiniteCounter:
    """Consecutive non-finite steps; `update` raises NonFiniteLossError at `max_steps` of them."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.consecutive = 0
        self.first_step: int | None = None

    def update(self, nonfinite: bool, *, step: int, last_saved: str | None = None) -> None:
        if not nonfinite:
            self.consecutive, self.first_step = 0, None
            return
        self.consecutive += 1
        self.first_step = step if self.first_step is None else self.first_step
        if self.consecutive >= self.max_steps:
            raise NonFiniteLossError(
                f"the training loss or its gradients were non-finite (NaN or inf; DeepSpeed skips such steps) for "
                f"{self.consecutive} consecutive steps "
                f"({self.first_step}..{step}; train.max_nonfinite_steps={self.max_steps}); stopping. The last complete "
                f"checkpoint is {last_saved or 'none'} (non-finite weights are never saved). Lower the learning "
                f"rate or a loss coefficient, or check the data, then resume from it")

    @property
    def last_finite(self) -> bool:
        return self.consecutive == 0


def step_nonfinite(loss: torch.Tensor | None) -> torch.Tensor | bool:
    """A 0-d bool tensor (no host sync): this step's summed loss is NaN or inf. None (no loss): False."""
    return False if loss is None else ~torch.isfinite(loss.detach()).all()


def parameters_nonfinite(module: torch.nn.Module) -> torch.Tensor:
    """A 0-d bool tensor: some parameter of `module` (this rank's part of it) holds a NaN or inf."""
    flags = [~torch.isfinite(p.detach()).all() for p in module.parameters()]
    return torch.stack(flags).any() if flags else torch.tensor(False)
