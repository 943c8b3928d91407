"""Run safety without training: which tag a resume picks (complete tags only, `latest` empty or garbage),
the run-dir lock, the shape check, disk-full detection, the non-finite counter, stop signals, the fault
hook's syntax. The end-to-end fault tests are in tests/test_faults.py."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

from ds_moe_div import checkpoint, faults, rundir
from ds_moe_div.checkpoint import CheckpointError, check_run_dir, check_shape
from ds_moe_div.guard import RunGuard
from ds_moe_div.interrupt import Interrupted, StopSignals
from ds_moe_div.nonfinite import NonFiniteCounter, NonFiniteLossError
from ds_moe_div.runlock import RunLock, RunLockedError


def make_tag(run_dir, step, *, complete=True, latest=False, shape=None):
    tag_dir = rundir.tag_dir(run_dir, f"global_step{step}")
    tag_dir.mkdir(parents=True)
    (tag_dir / "run_config.json").write_text(json.dumps({"config": {"model": {"moe": {"ep_size": 1}}}, "step": step,
                                                         "architecture": {}, "shape": shape}))
    if complete:
        (tag_dir / "complete").write_text("{}")
    if latest:
        (rundir.checkpoint_root(run_dir) / "latest").write_text(tag_dir.name)
    return tag_dir


def test_resume_takes_latest_when_complete_else_the_newest_complete_tag(tmp_path):
    make_tag(tmp_path, 3)
    make_tag(tmp_path, 6, latest=True)
    make_tag(tmp_path, 9, complete=False)  # a kill while writing it: latest never moved
    assert rundir.resume_tag(tmp_path) == ("global_step6", None)
    assert rundir.resume_tag(tmp_path, "global_step3") == ("global_step3", None)
    latest = rundir.checkpoint_root(tmp_path) / "latest"
    for content, why in (("", "is empty"), ("glob", "names 'glob', which does not exist"),
                         ("global_step9", "names 'global_step9', which is incomplete"), (None, "is missing")):
        if content is None:
            latest.unlink()
        else:
            latest.write_text(content)
        tag, note = rundir.resume_tag(tmp_path)
        assert tag == "global_step6" and why in note and "newest complete checkpoint" in note
        assert checkpoint.resolve_checkpoint(tmp_path) == (rundir.checkpoint_root(tmp_path), "global_step6")
    with pytest.raises(CheckpointError, match="'global_step9' is incomplete .* complete tags: global_step3, global_step6"):
        rundir.resume_tag(tmp_path, "global_step9")
    with pytest.raises(CheckpointError, match="'global_step7' does not exist"):
        rundir.resume_tag(tmp_path, "global_step7")


def test_a_tag_from_before_markers_counts_when_latest_names_it(tmp_path):
    make_tag(tmp_path, 5, complete=False, latest=True)
    assert rundir.resume_tag(tmp_path) == ("global_step5", None)


def test_run_dir_check_counts_complete_tags_only(tmp_path):
    """A run killed while writing its first checkpoint cannot be resumed; it may start afresh."""
    make_tag(tmp_path, 3, complete=False)
    with pytest.raises(CheckpointError, match="holds no checkpoint that was written completely .incomplete: "
                                              "global_step3."):
        check_run_dir(tmp_path, resume=True)
    check_run_dir(tmp_path, resume=False)
    make_tag(tmp_path, 2)
    with pytest.raises(CheckpointError, match="already holds checkpoints .newest complete: global_step2.; pass "
                                              "--resume"):
        check_run_dir(tmp_path, resume=False)


def test_second_lock_is_refused_naming_the_holder_and_released_on_exit(tmp_path):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {os.getpid()} on host .*\); wait"):
        RunLock(tmp_path).acquire()
    lock.release()
    RunLock(tmp_path).acquire().release()


def test_lock_of_a_killed_process_is_stale(tmp_path):
    """A holder killed with SIGKILL never releases: the kernel does, so the next run starts."""
    code = ("import os, signal, sys; from ds_moe_div.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); sys.stdin.readline(); os.kill(os.getpid(), signal.SIGKILL)")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.communicate("go\n", timeout=60)
    assert holder.returncode == -signal.SIGKILL
    RunLock(tmp_path).acquire().release()


def test_resuming_on_another_shape_is_refused_before_loading(tmp_path):
    tag_dir = make_tag(tmp_path, 4, shape={"world_size": 2, "ep_size": 2})
    check_shape(tag_dir, {"world_size": 2, "ep_size": 2})
    with pytest.raises(CheckpointError, match=r"saved by 2 rank\(s\) with model.moe.ep_size=2, but this run has 1 "
                                              r"rank\(s\) with ep_size=1.*Resume with 2 rank\(s\) and "
                                              r"model.moe.ep_size=2, or .* train.init_from="):
        check_shape(tag_dir, {"world_size": 1, "ep_size": 1})
    legacy = make_tag(tmp_path, 8)  # no shape recorded: counted from the RNG files
    for r in range(2):
        (legacy / f"rng_rank{r}.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"saved by 2 rank\(s\) with model.moe.ep_size=1"):
        check_shape(legacy, {"world_size": 4, "ep_size": 1})


def test_disk_full_is_recognised_from_errno_or_torch_text_and_free_space(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    assert checkpoint._is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:820] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed; basic_ios::clear: iostream error")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10**12, 10**12, 4096))
    assert checkpoint._is_disk_full(torch_error, tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10**12, 10**9, 10**11))
    assert not checkpoint._is_disk_full(torch_error, tmp_path)  # plenty of space: some other failure
    assert not checkpoint._is_disk_full(RuntimeError("shape mismatch"), tmp_path)


def test_non_finite_counter_stops_after_n_consecutive_steps():
    counter = NonFiniteCounter(3)
    for step, bad in enumerate([True, True, False, True, True], start=1):
        counter.update(bad, step=step)
    assert not counter.last_finite
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* for 3 consecutive steps \(4..6; "
                                                 r"train.max_nonfinite_steps=3\).*last complete checkpoint is "
                                                 r"global_step3"):
        counter.update(True, step=6, last_saved="global_step3")


def test_guard_never_saves_non_finite_weights():
    guard = RunGuard(max_nonfinite_steps=2)
    module = torch.nn.Linear(2, 2)
    assert not guard.after_step(torch.tensor(1.0), step=1) and guard.may_save(module)
    guard.after_step(torch.tensor(float("nan")), step=2)
    assert not guard.may_save(module)  # the last loss was not finite
    guard.after_step(torch.tensor(2.0), step=3)
    with torch.no_grad():
        module.weight[0, 0] = float("inf")
    assert not guard.may_save(module)
    with pytest.raises(NonFiniteLossError):
        guard.after_step(torch.tensor(float("inf")), step=4)
        guard.after_step(torch.tensor(float("nan")), step=5)


def test_stop_signals_are_recorded_and_restored():
    before = signal.getsignal(signal.SIGINT)
    guard = RunGuard(max_nonfinite_steps=5)
    with guard.signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.after_step(torch.tensor(1.0), step=7) and guard.stop_signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM
    stopped = Interrupted(signal.SIGINT, 7, "global_step7")
    assert stopped.exit_code == 130 and "after step 7; checkpoint global_step7 written" in str(stopped)


def test_fault_hook_syntax():
    assert faults.parse("step@5:rank1,save@6:int, latest@9:int-group,step@2:kill-group") == [
        ("step", 5, 1, "kill"), ("save", 6, None, "int"), ("latest", 9, None, "int-group"),
        ("step", 2, None, "kill-group")]
    for bad in ("step5", "jump@3", "step@3:rank", "save@x"):
        with pytest.raises(ValueError, match="DS_MOE_DIV_FAULT"):
            faults.parse(bad)


def test_skipped_steps_count_as_non_finite_except_under_fp16_loss_scaling():
    from types import SimpleNamespace

    from ds_moe_div.guard import step_applied

    def engine(applied, fp16):
        return SimpleNamespace(was_step_applied=lambda: applied, fp16_enabled=lambda: fp16)

    assert step_applied(engine(True, False)) and not step_applied(engine(False, False))
    assert step_applied(engine(False, True))  # dynamic loss scaling skips steps by design
    guard = RunGuard(max_nonfinite_steps=2)
    guard.after_step(torch.tensor(1.0), step=1, applied=False)
    with pytest.raises(NonFiniteLossError, match="gradients were non-finite"):
        guard.after_step(torch.tensor(1.0), step=2, applied=False)


def test_resume_from_flag_sets_the_config():
    from pathlib import Path

    from ds_moe_div.train import load_configs, parse_args

    ds = str(Path(__file__).resolve().parents[1] / "ds_configs" / "ds_zero2_cpu.json")
    cfg, _ = load_configs(parse_args(["--deepspeed_config", ds, "--resume-from", "global_step3"]))
    assert cfg.train.resume_from == "global_step3" and cfg.train.resuming and not cfg.train.resume
    cfg, _ = load_configs(parse_args(["--deepspeed_config", ds, "--resume"]))
    assert cfg.train.resuming and cfg.train.resume_from is None


def test_another_ep_size_alone_is_refused_and_deepspeeds_zero_exception_is_reported(tmp_path):
    from types import SimpleNamespace

    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    tag_dir = make_tag(tmp_path, 4, shape={"world_size": 2, "ep_size": 2}, latest=True)
    with pytest.raises(CheckpointError, match=r"saved by 2 rank\(s\) with model.moe.ep_size=2, but this run has 2 "
                                              r"rank\(s\) with ep_size=1"):
        check_shape(tag_dir, {"world_size": 2, "ep_size": 1})

    def load_checkpoint(*args, **kwargs):
        raise ZeRORuntimeException("The checkpoint being loaded used a DP world size of 2 but ...")

    engine = SimpleNamespace(load_checkpoint=load_checkpoint)
    with pytest.raises(CheckpointError, match="cannot load checkpoint .* ZeRORuntimeException"):
        checkpoint.load(engine, tmp_path, arch={}, rank=0, module_only=True)
