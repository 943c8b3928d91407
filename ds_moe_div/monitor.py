"""One rank-aware monitor: rank 0 writes TensorBoard (scalars, images, histograms, text, hparams) and hands
the scalars to DeepSpeed's own monitors; every other rank gets a no-op.

Tags: `train/<name>` (lm_loss, loss, lr, tokens_per_s, grad_norm), `eval/<name>`,
`moe/<term>` (scaled, the part added to the loss), `moe/<term>_unscaled`, `moe/<term>/layer_<i>`
(unscaled), `moe/<term>_coef`, `routing/<metric>/layer_<i>`, `routing/load/layer_<i>/expert_<j>`.

DeepSpeed's monitor sections of the user's ds_config (`csv_monitor`, `wandb`, `comet`) are honoured for
the scalars: the engine builds a `deepspeed.monitor.monitor.MonitorMaster` from them (and logs its own
`Train/Samples/...` events there); `Monitor(..., ds_monitor=engine.monitor)` writes every scalar of ours
to it as (tag, value, step). Images, histograms, text and hparams stay in our TensorBoard folder. DeepSpeed's
own `tensorboard` section is refused (`check_ds_monitor`): it would be a second TensorBoard writer.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

DS_SCALAR_MONITORS = ("csv_monitor", "wandb", "comet")
# The scalars the HParams tab shows next to each run's hyperparameters (their latest values).
HPARAM_METRICS = ("train/lm_loss", "eval/val_lm_loss", "routing/mi/mean", "routing/load_cv/mean")


def check_ds_monitor(ds: Mapping, *, tensorboard_dir: Path | None = None) -> list[str]:
    """The enabled DeepSpeed monitors of `ds` that receive our scalars. Raises DeepSpeedConfigError when
    DeepSpeed's TensorBoard monitor is enabled: ds_moe_div already writes TensorBoard, two writers would
    mean two event files with overlapping tags."""
    from ds_moe_div.ds_config import DeepSpeedConfigError

    tb = ds.get("tensorboard") or {}
    if isinstance(tb, Mapping) and tb.get("enabled"):
        where = f" ({tensorboard_dir})" if tensorboard_dir is not None else ""
        raise DeepSpeedConfigError(
            f'the DeepSpeed config enables "tensorboard": ds_moe_div writes TensorBoard itself, to the run\'s '
            f'tensorboard/ folder{where}, with every scalar, image and histogram; remove the "tensorboard" section '
            f'(or set "enabled": false). For other sinks of the same scalars use "csv_monitor", "wandb" or "comet"')
    return [name for name in DS_SCALAR_MONITORS if isinstance(ds.get(name), Mapping) and ds[name].get("enabled")]


def run_hparams(config: Mapping) -> dict:
    """The hyperparameters of a resolved experiment config (a dict) for TensorBoard's HParams tab: every
    model, objective and data setting and the train seed/steps, flattened (`objectives.divergence.coef`);
    None becomes "none" and lists their JSON text (the tab takes numbers, strings and booleans)."""
    import json

    from ds_moe_div.config_loader import flatten

    keep = ("model.", "objectives.", "data.", "train.seed", "train.steps", "train.init_from")
    out = {}
    for key, value in flatten(config).items():
        if not key.startswith(keep):
            continue
        if value is None:
            value = "none"
        elif isinstance(value, (list, tuple, dict)):
            value = json.dumps(value)
        out[key] = value
    return out


class Monitor:
    def __init__(self, log_dir: Path, *, enabled: bool, ds_monitor=None, purge_step: int | None = None) -> None:
        """`ds_monitor`: DeepSpeed's MonitorMaster (`engine.monitor`); its enabled sinks get the scalars.
        `purge_step`: TensorBoard hides this folder's earlier events at steps >= it (a resumed run
        passes checkpoint step + 1, so the steps a killed run logged past its checkpoint show once)."""
        self.log_dir = Path(log_dir)
        self._writer = None
        self._ds = ds_monitor if ds_monitor is not None and getattr(ds_monitor, "enabled", False) else None
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
        if self._ds is not None:
            self._ds.write_events([(tag, float(value), step) for tag, value in values.items()
                                   if math.isfinite(float(value))])

    def text(self, tag: str, body: str, step: int = 0) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, body, step)

    def hparams(self, hparams: Mapping, metric_tags: tuple[str, ...]) -> None:
        """One HParams-tab entry for this run, written into this run's own event file: the tab then shows
        the latest value of each scalar tag in `metric_tags` next to the hyperparameters."""
        if self._writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        experiment, start, end = hparams_summary(dict(hparams), {tag: 0.0 for tag in metric_tags})
        writer = self._writer._get_file_writer()  # add_hparams would open a second run (a sub-folder)
        for summary in (experiment, start, end):
            writer.add_summary(summary)

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
