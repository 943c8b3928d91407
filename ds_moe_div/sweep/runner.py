"""Run the planned runs: train (fresh or --resume), then evaluate; skip finished ones; keep going on failure.

    outcomes = execute(plan, select(plan), slots=gpu_slots(plan.sweep.num_ranks), on_cpu=True)

One run at a time on CPU (or when a run needs several GPUs); with several visible GPUs and num_ranks=1,
one run per GPU in parallel. A run starts only after the run it starts from (init_from) trained to
the end; if that one failed, the run is skipped and reported. A failed run never stops the others.
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from ds_moe_div import rundir
from ds_moe_div.fileio import free_port
from ds_moe_div.progress import bar as progress_bar
from ds_moe_div.sweep.launch import (
    Processes,
    environment,
    eval_command,
    train_command,
    write_ds_config,
)
from ds_moe_div.sweep.plan import (
    Plan,
    RunSpec,
    State,
    detect,
)


@dataclass(frozen=True)
class Outcome:
    run: RunSpec
    ok: bool  # trained and evaluated
    trained: bool  # its latest checkpoint is at train.steps (children may start from it)
    message: str
    seconds: float = 0.0


def eval_available() -> bool:
    """Whether this install has the `python -m ds_moe_div eval` command."""
    from ds_moe_div.cli import COMMANDS

    return "eval" in COMMANDS


def _set_aside_stale_logs(run_dir: Path) -> None:
    """A fresh start over the leftovers of an attempt that died before its first checkpoint: keep its
    TensorBoard events, but out of the way of the new curves."""
    tb = rundir.tensorboard_dir(run_dir)
    if tb.is_dir() and any(tb.iterdir()):
        tb.rename(tb.with_name(f"{tb.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))


def _train(plan: Plan, run: RunSpec, state: State, slot, procs: Processes, on_cpu: bool) -> str | None:
    """Train to train.steps; return an error message or None."""
    if state is State.FRESH:
        _set_aside_stale_logs(run.run_dir)
    ds_config = write_ds_config(plan, run)
    cmd = train_command(plan, run, ds_config, resume=state is State.RESUME, gpu=slot, port=free_port())
    log = rundir.train_log(run.run_dir)
    rc = procs.run_logged(cmd, log, environment(on_cpu=on_cpu, gpu=slot), "train")
    step = rundir.latest_step(run.run_dir)
    if rc != 0 or step != run.steps:
        return f"training failed (exit {rc}, latest checkpoint step {step} of {run.steps}); see {log}"
    return None


def _evaluate(plan: Plan, run: RunSpec, slot, procs: Processes, on_cpu: bool) -> str | None:
    env = environment(on_cpu=on_cpu, gpu=slot, for_eval=True)
    log = rundir.train_log(run.run_dir)
    rc = procs.run_logged(eval_command(run, plan.eval), log, env, "eval")
    if rc != 0:
        hint = "" if eval_available() else " (this install has no `python -m ds_moe_div eval` command yet)"
        return (f"evaluation failed (exit {rc}){hint}; see {log}. The checkpoint is kept: "
                "rerun the sweep to evaluate it")
    if rundir.find_report(run.run_dir, split=plan.eval.split, column=plan.eval.domain_column, step=run.steps) is None:
        return (f"evaluation exited 0 but wrote no {plan.eval.split} report for step {run.steps} under "
                f"{rundir.eval_dir(run.run_dir, '')}")
    return None


def process(plan: Plan, run: RunSpec, slot, procs: Processes, on_cpu: bool) -> Outcome:
    """Bring one run to 'finished' from whatever state its run dir is in."""
    start = time.monotonic()
    status = detect(run, plan.eval)
    if status.state is State.FINISHED:
        return Outcome(run, True, True, "already finished: skipped")
    if status.state is State.CONFLICT:
        return Outcome(run, False, False, f"left alone: {status.detail}")
    try:
        if status.state in (State.FRESH, State.RESUME):
            error = _train(plan, run, status.state, slot, procs, on_cpu)
            if error:
                return Outcome(run, False, False, error, time.monotonic() - start)
        error = _evaluate(plan, run, slot, procs, on_cpu)
    except OSError as e:
        return Outcome(run, False, rundir.latest_step(run.run_dir) == run.steps, f"{type(e).__name__}: {e}",
                       time.monotonic() - start)
    seconds = time.monotonic() - start
    verb = {State.FRESH: "trained", State.RESUME: "resumed"}.get(status.state, "already trained")
    if error:
        return Outcome(run, False, True, f"{verb}; {error}", seconds)
    return Outcome(run, True, True, f"{verb} and evaluated in {seconds:.0f} s", seconds)


def _blocked_by(run: RunSpec, outcomes: dict[str, Outcome], keys: set[str]) -> str | None:
    """'wait' while the parent has no outcome yet, a message when it failed, None when it may start
    (also when the parent is not among the runs: the trainer then reports a missing checkpoint)."""
    if run.parent is None or run.parent not in keys:
        return None
    parent = outcomes.get(run.parent)
    if parent is None:
        return "wait"
    return None if parent.trained else f"skipped: {run.parent}, which it starts from, did not finish training"


def _result(future: Future, run: RunSpec) -> Outcome:
    """The run's outcome; an unexpected error in the sweep's own code fails that run, not the sweep."""
    try:
        return future.result()
    except Exception as e:  # noqa: BLE001 - reported with the run; the other runs go on
        return Outcome(run, False, False, f"sweep error: {type(e).__name__}: {e}")


def execute(plan: Plan, runs: list[RunSpec], *, slots: list, on_cpu: bool, progress: bool = True) -> list[Outcome]:
    """Process `runs` (dependency-ordered, see plan.select) on `slots`; one Outcome per run, in run order."""
    procs, outcomes, pending, running = Processes(), {}, list(runs), {}
    free, keys = list(slots), {run.key for run in runs}
    bar = progress_bar(total=len(runs), desc=f"sweep {plan.sweep.name}", unit="run", enabled=progress, log_every=1)

    def finish(outcome: Outcome) -> None:
        outcomes[outcome.run.key] = outcome
        bar.update(1)
        bar.write(f"[{len(outcomes)}/{len(runs)}] {outcome.run.key}: {'ok' if outcome.ok else 'FAILED'} - "
                  f"{outcome.message}")

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        try:
            while pending or running:
                for run in list(pending):
                    blocked = _blocked_by(run, outcomes, keys)
                    if blocked == "wait" or (blocked is None and not free):
                        continue
                    pending.remove(run)
                    if blocked is not None:
                        finish(Outcome(run, False, False, blocked))
                        continue
                    slot = free.pop(0)
                    future: Future = pool.submit(process, plan, run, slot, procs, on_cpu)
                    running[future] = (slot, run)
                    bar.set_postfix_str(run.key)
                if not running:
                    continue
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    slot, run = running.pop(future)
                    free.append(slot)
                    finish(_result(future, run))
        except KeyboardInterrupt:
            procs.terminate_all()
            raise
        finally:
            bar.close()
    return [outcomes[run.key] for run in runs]
