"""Commands and processes of one run: the deepspeed launcher for training, the eval command after it.

    <venv>/bin/deepspeed --num_gpus 2 --master_port <free> scripts/train.py \
        --deepspeed_config <run_dir>/sweep_ds_config.json --config <base> --override ... [--resume]
    python -m ds_moe_div eval --run-dir <run_dir> --split test --permutation-seeds 3 --max-batches N|all \
        --no-progress [--domain-column COLUMN]

On CPU the environment gets DS_ACCELERATOR=cpu and OMP_NUM_THREADS=1 (unless already set). With a GPU
slot the launcher gets `--include localhost:<gpu>` and the evaluation CUDA_VISIBLE_DEVICES=<gpu>. Output
of both is appended to <run_dir>/train.log. Processes stay in the sweep's process group, so a kill of the
group reaches them; on Ctrl-C or SIGTERM to the sweep, `Processes.terminate_all` ends every launcher and
its ranks.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ds_moe_div import fileio, rundir
from ds_moe_div.config_loader import apply_overrides
from ds_moe_div.distributed import deepspeed_executable
from ds_moe_div.ds_config import scheduler_has_length
from ds_moe_div.sweep.config import REPO_ROOT, EvalSpec
from ds_moe_div.sweep.plan import Plan, RunSpec

TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train.py"
def write_ds_config(plan: Plan, run: RunSpec) -> Path:
    """The sweep's DeepSpeed file, with a length-dependent scheduler's total_num_steps = the run's train.steps
    when the sweep says so (written out, so that the run dir records the schedule it trained with)."""
    ds = json.loads(plan.deepspeed_config.read_text())
    if plan.sweep.schedule_follows_steps and scheduler_has_length(ds):
        ds = apply_overrides(ds, [f"scheduler.params.total_num_steps={run.steps}"])
    return fileio.write_json(rundir.sweep_ds_config(run.run_dir), ds)


def train_command(plan: Plan, run: RunSpec, ds_config: Path, *, resume: bool, gpu: str | None,
                  port: int | str) -> list[str]:
    where = ["--include", f"localhost:{gpu}"] if gpu is not None else ["--num_gpus", str(plan.sweep.num_ranks)]
    cmd = [deepspeed_executable(), *where, "--master_port", str(port), str(TRAIN_SCRIPT),
           "--deepspeed_config", str(ds_config), "--config", str(plan.base_config)]
    for item in run.overrides:
        if resume and item.startswith("train.init_from="):
            continue  # resume continues this run's own checkpoint; the two settings exclude each other
        cmd += ["--override", item]
    return cmd + (["--resume"] if resume else [])


def eval_command(run: RunSpec, spec: EvalSpec) -> list[str]:
    cmd = [sys.executable, "-m", "ds_moe_div", "eval", "--run-dir", str(run.run_dir), "--split", spec.split,
           "--permutation-seeds", str(spec.permutation_seeds), "--max-batches",
           "all" if spec.max_batches is None else str(spec.max_batches), "--no-progress"]
    return cmd + (["--domain-column", spec.domain_column] if spec.domain_column else []) + list(spec.args)


def environment(*, on_cpu: bool, gpu: str | None = None, for_eval: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    if on_cpu:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
    if gpu is not None:
        if for_eval:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        else:
            env.pop("CUDA_VISIBLE_DEVICES", None)  # --include names the physical GPU
    return env


def gpu_slots(num_ranks: int) -> list[str | None]:
    """One slot per visible GPU when several are visible and a run needs one rank, else one slot."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count <= 1 or num_ranks != 1:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(count)]
    return ids[:count]


class Processes:
    """The child processes running now, so that an interrupted sweep can end them."""

    def __init__(self) -> None:
        self._live: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.stopping = False

    def run_logged(self, cmd: list[str], log_path: Path, env: dict, what: str) -> int:
        """Run `cmd`, appending its output to log_path; return its exit code."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {what}: {' '.join(cmd)}\n")
            log.flush()
            with self._lock:
                if self.stopping:
                    return -signal.SIGINT
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                self._live.add(proc)
            try:
                return proc.wait()
            finally:
                with self._lock:
                    self._live.discard(proc)

    def terminate_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM every running launcher and all its descendants (the local deepspeed runner does not
        forward signals to launch.py and the ranks), then SIGKILL what is left after grace_s."""
        import psutil  # a deepspeed dependency

        with self._lock:
            self.stopping = True
            live = list(self._live)
        descendants = []
        for proc in live:
            with contextlib.suppress(psutil.NoSuchProcess):
                descendants += psutil.Process(proc.pid).children(recursive=True)
        for p in [*live, *descendants]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + grace_s
        # Our own children are waited for through Popen (psutil would reap them and hide their exit codes).
        _, alive = psutil.wait_procs(descendants, timeout=grace_s)
        for proc in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in [*(proc for proc in live if proc.poll() is None), *alive]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.kill()
