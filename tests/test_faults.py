"""Faults end to end: kills, Ctrl-C, a full disk, non-finite losses, bad data, a second run on one run dir.

Two ranks through the real launcher where the property crosses ranks (one shared uninterrupted reference
run; then SIGINT, SIGKILL of one rank during a save, SIGKILL of the whole group, each followed by
--resume: bit-identical losses and final tensors);
single-process runs for the rest. Faults are injected at exact points with the documented hook
`DS_MOE_DIV_FAULT` (ds_moe_div/faults.py) or by monkeypatching inside the rank. Together ~2-3 minutes
on 2 cores.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ds_moe_div import rundir
from tests.dist_utils import run_on_ranks
from tests.test_training import DS_ZERO2, SMOKE, launch, scalars

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(smoke_reference) -> Path:
    """The uninterrupted 2-rank smoke run (6 steps, checkpoints at 3 and 6), logged every step; shared
    with tests/test_training.py (tests/conftest.py)."""
    return smoke_reference[0]


def _launch_with_fault(tmp_path, fault: str | None, *args):
    env = {"DS_MOE_DIV_FAULT": fault} if fault else {}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return launch(tmp_path, "train.run_dir=run", "train.log_interval=1", *args)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _tensors(obj, prefix=""):
    """Every tensor in a (nested) checkpoint object, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    found = {}
    for key, value in items:
        found.update(_tensors(value, f"{prefix}/{key}"))
    return found


def _checkpoint_tensors(tag_dir: Path) -> dict:
    found = {}
    for path in sorted(tag_dir.glob("*.pt")):
        found.update(_tensors(torch.load(path, map_location="cpu", weights_only=False), path.name))
    return found


def _purge_steps(log_dir: Path) -> list[int]:
    """Steps of the SessionLog.START events (SummaryWriter(purge_step=...)) in a TensorBoard folder."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    return sorted(e.step for path in log_dir.glob("events.out.tfevents.*") for e in EventFileLoader(str(path)).Load()
                  if e.HasField("session_log") and e.session_log.status == SessionLog.START)


def test_sigint_and_kills_then_resume_is_bit_identical(reference, tmp_path):
    """2 ranks through the launcher: Ctrl-C (SIGINT to the launcher's process group) after step 2 - both
    ranks finish the step, save it, exit; resume, SIGKILL rank 1 while the tag of step 3 is being
    written - latest stays on step 2; resume, SIGKILL the whole group (launcher and ranks) after step 5;
    resume again (from step 3) to the end. Every logged value of every step and every tensor of the final
    checkpoint (weights, experts, optimizer states) equal the uninterrupted run's, and each resumed
    TensorBoard writer purges the steps past its checkpoint."""
    interrupted = _launch_with_fault(tmp_path, "step@2:rank0:int-group")
    assert interrupted.returncode != 0
    assert interrupted.stdout.count("stopped by SIGINT after step 2; checkpoint global_step2 written") == 2
    root = rundir.checkpoint_root(tmp_path / "run")
    assert rundir.latest_tag(root) == "global_step2" and rundir.is_complete(root, "global_step2")
    assert not list(root.glob("zero_to_*.py"))

    rank_killed = _launch_with_fault(tmp_path, "save@3:rank1", "--resume")
    assert rank_killed.returncode != 0 and "resuming from global_step2" in rank_killed.stdout
    assert rundir.latest_tag(root) == "global_step2" and not rundir.is_complete(root, "global_step3")

    group_killed = _launch_with_fault(tmp_path, "step@5:rank0:kill-group", "--resume")
    assert group_killed.returncode != 0 and "resuming from global_step2" in group_killed.stdout
    assert rundir.latest_tag(root) == "global_step3" and rundir.is_complete(root, "global_step3")

    final = _launch_with_fault(tmp_path, None, "--resume")
    assert final.returncode == 0, final.stdout[-6000:]
    assert "resuming from global_step3" in final.stdout

    ref, got = scalars(reference / "tensorboard"), scalars(tmp_path / "run" / "tensorboard")
    compared = 0
    for tag, values in ref.items():
        if tag == "train/tokens_per_s":
            continue
        assert got[tag] == values, tag  # exact
        compared += len(values)
    assert compared > 100 and sorted(got["train/lm_loss"]) == [1, 2, 3, 4, 5, 6]
    assert _purge_steps(tmp_path / "run" / "tensorboard") == [3, 3, 4]  # checkpoint step + 1 per resume
    want, have = _checkpoint_tensors(reference / "checkpoints" / "global_step6"), _checkpoint_tensors(root / "global_step6")
    assert want.keys() == have.keys() and len(want) > 20
    for key, tensor in want.items():
        assert torch.equal(tensor, have[key]), key


class Killed(Exception):
    """Stands for SIGKILL inside a rank: nothing after the injection point runs."""


def _crash_points(rank, world_size, tmp):
    """One process: train 6 steps (checkpoint at 3), then try to save step 6 three times: killed while
    the tag is written, on a full disk, killed right after `latest` moved."""
    from collections import namedtuple

    from ds_moe_div import checkpoint, faults
    from ds_moe_div.config import load_experiment
    from ds_moe_div.runlock import RunLock, RunLockedError
    from ds_moe_div.session import build
    from ds_moe_div.train import train_step

    run_dir = Path(tmp) / "r"
    # log_interval 6: no logging window ends inside these 6 steps (this loop never flushes it)
    cfg = load_experiment(SMOKE, [f"train.run_dir={run_dir}", "train.show_progress=false", "train.log_interval=6"])
    state = build(cfg, json.loads(DS_ZERO2.read_text()))
    out = {"pid": os.getpid()}
    try:
        RunLock(run_dir).acquire()
    except RunLockedError as e:
        out["second_lock"] = str(e)
    losses = []
    for _ in range(6):
        losses.append(float(train_step(state.engine, state.train_iter, state.composer, state.window, step=state.step)))
        state.step += 1
        if state.step == 3:
            state.save()
    out["losses"] = losses
    root = rundir.checkpoint_root(run_dir)
    before = {p.name: p.read_bytes() for p in (root / "global_step3").iterdir()}

    def crash_at(point):
        def inject(where, *, step, rank):
            if where == point:
                raise Killed(where)
        return inject

    real_inject = faults.inject
    faults.inject = crash_at("save")  # DeepSpeed's files are written, the trainer's not yet
    with pytest.raises(Killed):
        state.save()
    faults.inject = real_inject
    out["killed_while_writing"] = (rundir.latest_tag(root), rundir.resume_tag(run_dir)[0],
                                   rundir.is_complete(root, "global_step6"),
                                   (root / "global_step6" / "mp_rank_00_model_states.pt").is_file())

    usage = namedtuple("usage", "total used free")
    real_save, real_usage = torch.save, checkpoint.shutil.disk_usage
    calls = []

    def disk_full(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 4544 vs 4434; "
                           "basic_ios::clear: iostream error")

    # (1) the disk fills up during the save: torch's serializer fails without saying why, and then
    # (second look at the disk) there is no space left
    free = iter([10**11])
    torch.save, checkpoint.shutil.disk_usage = disk_full, (lambda path: usage(10**12, 10**12, next(free, 0)))
    try:
        state.save()
    except checkpoint.DiskFullError as e:
        out["disk_full"] = (str(e), e.exit_code, len(calls))
    # (2) the disk is already too full for another checkpoint of the last one's size: refused up front
    calls.clear()
    checkpoint.shutil.disk_usage = lambda path: usage(10**12, 10**12, 1000)
    try:
        state.save()
    except checkpoint.DiskFullError as e:
        out["disk_full_before"] = (str(e), e.exit_code, len(calls))
    finally:
        torch.save, checkpoint.shutil.disk_usage = real_save, real_usage
    out["after_disk_full"] = (rundir.latest_tag(root), (root / "global_step6").exists(),
                              {p.name: p.read_bytes() for p in (root / "global_step3").iterdir()} == before)

    faults.inject = crash_at("latest")
    with pytest.raises(Killed):
        state.save()
    faults.inject = real_inject
    out["killed_after_latest"] = (rundir.latest_tag(root), rundir.resume_tag(run_dir)[0])
    return out


def _resume_losses(rank, world_size, run_dir, tag, steps):
    from ds_moe_div.config import load_experiment
    from ds_moe_div.session import build
    from ds_moe_div.train import train_step

    cfg = load_experiment(SMOKE, [f"train.run_dir={run_dir}", "train.show_progress=false", f"train.resume_from={tag}",
                                  "train.log_interval=6"])
    state = build(cfg, json.loads(DS_ZERO2.read_text()))
    start, losses = state.step, []
    while state.step < steps:
        losses.append(float(train_step(state.engine, state.train_iter, state.composer, state.window, step=state.step)))
        state.step += 1
    return start, losses


def test_kills_during_a_save_and_a_full_disk_keep_a_resumable_run(tmp_path):
    out = run_on_ranks(_crash_points, world_size=1, args=(str(tmp_path),), timeout=300)[0]
    assert f"in use by another run (pid {out['pid']} on host" in out["second_lock"]
    # killed while global_step6 was being written: latest stays, the partial tag is ignored
    assert out["killed_while_writing"] == ("global_step3", "global_step3", False, True)
    expected = (f"no space left on {tmp_path / 'r' / 'checkpoints'} while saving global_step6; the last complete "
                f"checkpoint is global_step3")
    message, code, writes = out["disk_full"]
    assert code == 4 and message.startswith(expected) and writes >= 1, message
    message, code, writes = out["disk_full_before"]
    assert code == 4 and message.startswith(expected) and "MiB free" in message and writes == 0, message
    assert out["after_disk_full"] == ("global_step3", False, True)
    # killed right after latest moved: the tag was complete before, so the run resumes from it
    assert out["killed_after_latest"] == ("global_step6", "global_step6")
    start, losses = run_on_ranks(_resume_losses, world_size=1, timeout=300,
                                 args=(str(tmp_path / "r"), "global_step3", 6))[0]
    assert start == 3 and losses == out["losses"][3:]  # bit-identical


def _main_exit(rank, world_size, tmp, argv):
    from ds_moe_div.train import main

    return main(argv)


def _bad_data_starts(rank, world_size, tmp):
    """build() with each kind of bad data: refused (ValueError/DataError) before DeepSpeed starts; the run
    dir holds nothing but its lock file."""
    import gzip

    from ds_moe_div.config import load_experiment
    from ds_moe_div.session import build

    tmp = Path(tmp)
    good = [json.dumps({"text": f"document {i} " * 20, "domain": "ab"[i % 2]}) for i in range(40)]
    (tmp / "empty.jsonl").write_text("")
    with gzip.open(tmp / "full.jsonl.gz", "wt") as f:
        f.write("\n".join(good) + "\n")
    (tmp / "truncated.jsonl.gz").write_bytes((tmp / "full.jsonl.gz").read_bytes()[:-30])
    (tmp / "utf8.jsonl").write_bytes(("\n".join(good[:20]) + "\n").encode() + b'{"text": "bad \xff", "domain": "a"}\n')
    (tmp / "nolabel.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(40)) + "\n")
    (tmp / "labels.json").write_text(json.dumps({"ab": ["a"]}))
    (tmp / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    (tmp / "ok.jsonl").write_text("\n".join(good) + "\n")
    cases = {"empty": ["data.corpus=" + str(tmp / "empty.jsonl")],
             "truncated": ["data.corpus=" + str(tmp / "truncated.jsonl.gz")],
             "invalid_utf8": ["data.corpus=" + str(tmp / "utf8.jsonl")],
             "missing_domain_column": ["data.corpus=" + str(tmp / "nolabel.jsonl")],
             "unknown_label": ["data.corpus=" + str(tmp / "ok.jsonl"), f"data.label_map={tmp / 'labels.json'}"],
             "corrupt_tokenizer": ["data.corpus=" + str(tmp / "ok.jsonl"), f"data.tokenizer.path={tmp / 'tokenizer.json'}"]}
    out = {}
    for name, overrides in cases.items():
        run_dir = tmp / f"run_{name}"
        cfg = load_experiment(SMOKE, [f"train.run_dir={run_dir}", "train.show_progress=false",
                                      f"data.corpus_dir={tmp / ('cache_' + name)}", *overrides])
        try:
            build(cfg, json.loads(DS_ZERO2.read_text()))
            out[name] = ("started", [])
        except (ValueError, OSError, EOFError) as e:
            out[name] = (f"{type(e).__name__}: {e}", sorted(p.name for p in run_dir.iterdir()))
    return out


def test_bad_data_is_refused_before_step_1(tmp_path):
    out = run_on_ranks(_bad_data_starts, world_size=1, args=(str(tmp_path),), timeout=300)[0]
    expected = {"empty": "empty.jsonl: no rows", "truncated": "a truncated .gz?",
                "invalid_utf8": "utf8.jsonl:21: invalid UTF-8", "missing_domain_column": "no column 'domain'",
                "unknown_label": "label 'b' is not in the label map",
                "corrupt_tokenizer": "tokenizer.json: not a loadable tokenizer.json"}
    assert out.keys() == expected.keys()
    for name, (message, written) in out.items():
        assert message.startswith("DataError: ") and expected[name] in message, (name, message)
        assert written == ["run.lock"], (name, written)  # nothing but the run dir's lock


def test_non_finite_training_stops_and_never_saves_non_finite_weights(tmp_path):
    """An absurd (finite, accepted) learning rate blows the weights up: the run stops after
    train.max_nonfinite_steps bad steps with exit code 3, and no checkpoint holds the non-finite weights."""
    ds = json.loads(DS_ZERO2.read_text())
    ds["optimizer"]["params"]["lr"] = 1e30
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds))
    run_dir = tmp_path / "r"
    argv = ["--deepspeed_config", str(ds_path), "--config", str(SMOKE), "--override", f"train.run_dir={run_dir}",
            "--override", "train.max_nonfinite_steps=2", "--override", "train.save_interval=1",
            "--override", "train.steps=8"]
    code = run_on_ranks(_main_exit, world_size=1, args=(str(tmp_path), argv), timeout=300)[0]
    assert code == 3
    for tag in rundir.complete_tags(rundir.checkpoint_root(run_dir)):
        for key, tensor in _checkpoint_tensors(rundir.checkpoint_root(run_dir) / tag).items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), (tag, key)


def _resume_on_one_rank(rank, world_size, run_dir):
    from ds_moe_div.config import load_experiment
    from ds_moe_div.session import build

    cfg = load_experiment(SMOKE, [f"train.run_dir={run_dir}", "train.show_progress=false", "train.resume=true"])
    state = build(cfg, json.loads(DS_ZERO2.read_text()))
    try:
        return state.step
    finally:
        state.close()


def test_resuming_a_2_rank_run_on_1_rank_reshards_it(reference, tmp_path):
    """The smoke run (from scratch, on the default AutoEP path) resumes on another world size through
    DeepSpeed's universal checkpoint (exactness: tests/test_reshard.py); DeepSpeed's native MoE layers are
    refused instead, naming both shapes (test_reshard.py::test_native_moe_checkpoints_are_refused_...)."""
    import shutil

    from ds_moe_div import rundir

    shutil.copytree(reference, tmp_path / "run", ignore=shutil.ignore_patterns("run.lock"))
    step = run_on_ranks(_resume_on_one_rank, world_size=1, args=(str(tmp_path / "run"),), timeout=300)[0]
    assert step == 6 and rundir.universal_dir(rundir.latest_tag_dir(tmp_path / "run")).is_dir()
