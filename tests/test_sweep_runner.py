"""Running: launch commands, the DeepSpeed file per run, scheduling with dependencies and failures,
interrupts that end the whole process tree, stale logs of a dead attempt."""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import replace

import psutil
import pytest

from ds_moe_div.sweep import runner
from ds_moe_div.sweep.config import load_sweep
from ds_moe_div.sweep.launch import Processes, eval_command, train_command, write_ds_config
from ds_moe_div.sweep.plan import build_plan
from tests.test_sweep_config import write_sweep
from tests.test_sweep_plan import VARIANTS, fake_checkpoint, fake_report


@pytest.fixture
def plan(tmp_path):
    path = write_sweep(tmp_path, variants=VARIANTS, seeds=[0, 1], base_overrides=["train.steps=6"])
    return build_plan(load_sweep(path), path)


def test_commands(plan, tmp_path):
    ft = plan.runs[1]
    ds_path = write_ds_config(plan, ft)
    assert json.loads(ds_path.read_text())["scheduler"]["params"]["total_num_steps"] == 6
    fresh = train_command(plan, ft, ds_path, resume=False, gpu=None, port=1234)
    assert fresh[1:5] == ["--num_gpus", "2", "--master_port", "1234"] and fresh[5].endswith("scripts/train.py")
    assert f"train.init_from={plan.runs[0].run_dir}" in fresh and "--resume" not in fresh
    resumed = train_command(plan, ft, ds_path, resume=True, gpu="3", port=1)
    assert resumed[1:3] == ["--include", "localhost:3"] and resumed[-1] == "--resume"
    assert not any(a.startswith("train.init_from=") for a in resumed)  # excluded by --resume
    assert eval_command(ft, plan.eval)[2:] == ["ds_moe_div", "eval", "--run-dir", str(ft.run_dir), "--split", "test",
                                               "--permutation-seeds", "3", "--max-batches", "all", "--no-progress"]
    spec = replace(plan.eval, max_batches=8, domain_column="domain")
    assert eval_command(ft, spec)[-5:] == ["--max-batches", "8", "--no-progress", "--domain-column", "domain"]


def fake_process(results: dict[str, bool], calls: list):
    def process(plan, run, slot, procs, on_cpu):
        calls.append((run.key, slot))
        ok = results.get(run.key, True)
        return runner.Outcome(run, ok, ok, "fake")
    return process


def test_a_failed_run_skips_its_children_and_the_sweep_goes_on(plan, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "process", fake_process({"pre/seed0": False}, calls))
    outcomes = runner.execute(plan, list(plan.runs), slots=[None], on_cpu=True, progress=False)
    by_key = {o.run.key: o for o in outcomes}
    assert not by_key["pre/seed0"].ok and not by_key["ft/seed0"].ok
    assert "did not finish training" in by_key["ft/seed0"].message
    assert ("ft/seed0", None) not in calls and ("ft/seed1", None) in calls
    assert [k for k, _ in calls] == [r.key for r in plan.runs if r.key != "ft/seed0"]


def test_parallel_slots_run_children_after_parents(plan, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "process", fake_process({}, calls))
    outcomes = runner.execute(plan, list(plan.runs), slots=["0", "1", "2"], on_cpu=False, progress=False)
    assert all(o.ok for o in outcomes) and {s for _, s in calls} <= {"0", "1", "2"}
    order = [k for k, _ in calls]
    assert order.index("pre/seed0") < order.index("ft/seed0") and order.index("pre/seed1") < order.index("ft/seed1")


def test_process_skips_finished_and_evaluates_trained_runs(plan, monkeypatch):
    base = plan.runs[3]
    fake_checkpoint(base, 6)
    fake_report(base, 6)
    outcome = runner.process(plan, base, None, None, True)
    assert outcome.ok and "skipped" in outcome.message
    ed = plan.runs[2]
    fake_checkpoint(ed, 6)
    commands = []

    class Procs:
        def run_logged(self, cmd, log_path, env, what):
            commands.append(what)
            return 2  # an eval command that does not exist yet

    outcome = runner.process(plan, ed, None, Procs(), True)
    assert commands == ["eval"] and not outcome.ok and outcome.trained
    assert "evaluation failed (exit 2)" in outcome.message and "rerun the sweep" in outcome.message


class FailingProcs:
    def __init__(self):
        self.commands = []

    def run_logged(self, cmd, log_path, env, what):
        self.commands.append(what)
        return 1


def test_a_fresh_start_sets_aside_the_logs_of_a_dead_attempt(plan):
    base = plan.runs[3]
    (base.run_dir / "tensorboard").mkdir(parents=True)
    (base.run_dir / "tensorboard" / "events.out.tfevents.1").write_text("old")
    procs = FailingProcs()
    outcome = runner.process(plan, base, None, procs, True)
    assert procs.commands == ["train"] and not outcome.ok and not outcome.trained
    assert "training failed (exit 1, latest checkpoint step None of 6)" in outcome.message
    assert not (base.run_dir / "tensorboard").exists()
    assert [p.name.split("-")[0] for p in base.run_dir.glob("tensorboard.stale-*")] == ["tensorboard.stale"]


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE  # a zombie waits for its reaper only
    except psutil.NoSuchProcess:
        return True


def test_terminate_all_ends_the_whole_process_tree(tmp_path):
    procs = Processes()
    script = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    codes = []
    thread = threading.Thread(target=lambda: codes.append(
        procs.run_logged([sys.executable, "-c", script], tmp_path / "log", {}, "test")))
    thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (procs._live and psutil.Process(next(iter(procs._live)).pid).children()):
        time.sleep(0.05)
    parent = psutil.Process(next(iter(procs._live)).pid)
    child = parent.children()[0]
    procs.terminate_all(grace_s=5)
    thread.join(10)
    assert codes == [-15] and gone(child) and gone(parent)  # SIGTERM
    assert procs.run_logged(["true"], tmp_path / "log", {}, "after") != 0  # nothing starts once stopping
    assert "=== " in (tmp_path / "log").read_text()


def test_an_error_in_the_sweep_code_fails_only_that_run(plan, monkeypatch):
    def process(plan, run, slot, procs, on_cpu):
        if run.key == "ed/seed0":
            raise RuntimeError("boom")
        return runner.Outcome(run, True, True, "fake")

    monkeypatch.setattr(runner, "process", process)
    outcomes = runner.execute(plan, list(plan.runs), slots=[None], on_cpu=True, progress=False)
    assert [o.ok for o in outcomes] == [o.run.key != "ed/seed0" for o in outcomes]
    assert "sweep error: RuntimeError: boom" in outcomes[2].message
