"""One rank-aware TensorBoard monitor: rank 0 writes, every other rank gets a no-op.

Tags: `train/<name>` (lm_loss, loss, lr, tokens_per_s, grad_norm), `eval/<name>`,
`moe/<term>` (scaled, the part added to the loss), `moe/<term>_unscaled`, `moe/<term>/layer_<i>`
(unscaled), `moe/<term>_coef`, `routing/<metric>/layer_<i>`.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class Monitor:
    def __init__(self, log_dir: Path, *, enabled: bool, purge_step: int | None = None) -> None:
        """`purge_step`: TensorBoard hides this folder's earlier events at steps >= it (a resumed run
        passes checkpoint step + 1, so the steps a killed run logged past its checkpoint show once)."""
        self.log_dir = Path(log_dir)
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, body: str, step: int = 0) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, body, step)

    def histogram(self, tag: str, values, step: int) -> None:
        if self._writer is not None:
            self._writer.add_histogram(tag, values, step)

    def image(self, tag: str, figure, step: int) -> None:
        if self._writer is not None:
            self._writer.add_figure(tag, figure, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
