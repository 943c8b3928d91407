"""The monitor: TensorBoard on rank 0, our scalars also to DeepSpeed's own monitors (csv_monitor, wandb,
comet) of the user's ds_config, DeepSpeed's TensorBoard refused, one HParams entry per run."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from ds_moe_div.ds_config import DeepSpeedConfigError
from ds_moe_div.monitor import Monitor, check_ds_monitor, run_hparams

ROOT = Path(__file__).resolve().parents[1]


class FakeMaster:
    enabled = True

    def __init__(self):
        self.events = []

    def write_events(self, events):
        self.events += events


def _accumulator(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_scalars_go_to_tensorboard_and_to_deepspeeds_monitors(tmp_path):
    master = FakeMaster()
    monitor = Monitor(tmp_path, enabled=True, ds_monitor=master)
    monitor.scalars({"train/lm_loss": 3.5, "routing/mi/mean": math.nan}, step=4)
    monitor.close()
    assert master.events == [("train/lm_loss", 3.5, 4)]  # NaN is not a value a CSV row or W&B can take
    assert [e.value for e in _accumulator(tmp_path).Scalars("train/lm_loss")] == [3.5]
    silent = FakeMaster()
    Monitor(tmp_path / "other", enabled=False, ds_monitor=silent).scalars({"a": 1.0}, step=1)  # rank != 0
    assert silent.events == [] and not (tmp_path / "other").exists()


def test_deepspeed_tensorboard_is_refused_and_other_monitors_are_listed():
    with pytest.raises(DeepSpeedConfigError, match='remove the "tensorboard" section'):
        check_ds_monitor({"tensorboard": {"enabled": True, "output_path": "tb"}})
    assert check_ds_monitor({"tensorboard": {"enabled": False}, "csv_monitor": {"enabled": True},
                             "wandb": {"enabled": False}}) == ["csv_monitor"]
    assert check_ds_monitor({}) == []


def test_one_hparams_entry_in_the_runs_own_event_file(tmp_path):
    config = {"model": {"d_model": 64, "moe": {"num_experts": 4}}, "objectives": {"divergence": {"coef": 0.03}},
              "data": {"include_labels": ["math"], "label_map": None}, "train": {"seed": 1, "run_dir": "r"}}
    hparams = run_hparams(config)
    assert hparams == {"model.d_model": 64, "model.moe.num_experts": 4, "objectives.divergence.coef": 0.03,
                       "data.include_labels": '["math"]', "data.label_map": "none", "train.seed": 1}
    monitor = Monitor(tmp_path, enabled=True)
    monitor.hparams(hparams, ("train/lm_loss",))
    monitor.scalars({"train/lm_loss": 2.0}, step=1)
    monitor.close()
    assert len(list(tmp_path.iterdir())) == 1  # no sub-run folder, one event file
    content = _accumulator(tmp_path).PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    from tensorboard.plugins.hparams import plugin_data_pb2
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["objectives.divergence.coef"].number_value == 0.03


def _train_with_csv_monitor(rank, world_size, tmp):
    from ds_moe_div.config import load_experiment
    from ds_moe_div.session import build
    from ds_moe_div.train import run

    cfg = load_experiment(ROOT / "ds_configs/experiments/smoke.json",
                          [f"train.run_dir={tmp}/run", "train.steps=2", "train.log_interval=1",
                           "train.eval_interval=2", "train.save_interval=2", "train.heatmap_interval=2"])
    ds = json.loads((ROOT / "ds_configs/ds_zero2_cpu.json").read_text())
    ds["csv_monitor"] = {"enabled": True, "output_path": f"{tmp}/csv", "job_name": "job"}
    return run(build(cfg, ds))


@pytest.mark.slow
def test_csv_monitor_of_the_ds_config_receives_every_scalar(tmp_path):
    from tests.dist_utils import run_on_ranks

    last = run_on_ranks(_train_with_csv_monitor, world_size=1, args=(str(tmp_path),), timeout=300)[0]
    job = tmp_path / "csv" / "job"
    for tag, steps in (("train/lm_loss", [1, 2]), ("moe/divergence_unscaled", [1, 2]), ("eval/val_lm_loss", [2]),
                       ("routing/load/layer_0/expert_0", [2])):
        rows = list(csv.reader((job / (tag.replace("/", "_") + ".csv")).open()))
        assert [int(r[0]) for r in rows[1:]] == steps, tag
    rows = list(csv.reader((job / "train_lm_loss.csv").open()))
    assert float(rows[-1][1]) == pytest.approx(last["train/lm_loss"])
    assert (job / "Train_Samples_lr.csv").is_file()  # DeepSpeed's own events, same sink
    tags = _accumulator(tmp_path / "run" / "tensorboard").Tags()
    assert "routing/load/layer_1/expert_3" in tags["scalars"] and "routing/load_bars" in tags["images"]
    assert len(list((tmp_path / "run" / "tensorboard").iterdir())) == 1  # one TensorBoard event file
