"""Run a sweep: every (variant, seed) through the deepspeed launcher, evaluate, compare.

    python -m ds_moe_div sweep ds_configs/sweeps/objectives.json [--quick] [--dry-run] [--only VARIANT ...]
    python -m ds_moe_div sweep ds_configs/sweeps/objectives.json --aggregate-only   # tables + plots only
    python -m ds_moe_div sweep ds_configs/sweeps/objectives.json --aggregate-only \
        --runs-csv docs/results/objectives/runs.csv      # tables from a committed runs.csv, next to it

Finished runs are skipped, interrupted ones resumed (rerunning the same command continues a sweep);
a failed run is reported and the others go on; the exit code is 1 when any run failed. Outputs in the
sweep's output_dir: <variant>/seed<k>/ (run dirs, with train.log), comparison.md, comparison.csv,
runs.csv, effects.md, effects.csv (paired effects of the sweep's contrasts, sweep/effects.py),
loss_curves.png, delta_ppl_per_layer.png, heatmaps.png. With --runs-csv no run dir is read: comparison.md,
comparison.csv, effects.md and effects.csv are rebuilt next to that file from its rows (the figures there
are kept). See ds_moe_div/sweep/config.py for the file format.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

from ds_moe_div import rundir
from ds_moe_div.cli import prog
from ds_moe_div.config_loader import ConfigError
from ds_moe_div.sweep.aggregate import collect, read_runs_csv, summarise, write_tables
from ds_moe_div.sweep.config import load_sweep
from ds_moe_div.sweep.effects import effects, write_effects
from ds_moe_div.sweep.launch import eval_command, train_command
from ds_moe_div.sweep.plan import Plan, State, build_plan, detect, select
from ds_moe_div.sweep.plots import plot_all


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog("sweep"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="sweep file (ds_configs/sweeps/*.json)")
    parser.add_argument("--quick", action="store_true", help="the sweep's small 'quick' version (CPU, minutes)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print one line per run (variant, seed, state, run dir); run nothing")
    parser.add_argument("--verbose", action="store_true", help="with --dry-run: also each run's commands")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants (and those they start from)")
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild the tables and plots")
    parser.add_argument("--runs-csv", type=Path, metavar="FILE",
                        help="with --aggregate-only: rebuild the tables from this runs.csv, next to it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.runs_csv is not None and not args.aggregate_only:
        parser.error("--runs-csv goes with --aggregate-only (it rebuilds tables, it runs nothing)")
    return args


# The dry run's state column: new (nothing trained), partial (a checkpoint before train.steps), trained
# (needs its evaluation), done (trained and evaluated), conflict (left alone, see the detail).
STATE_LABELS = {State.FRESH: "new", State.RESUME: "partial", State.NEEDS_EVAL: "trained", State.FINISHED: "done",
                State.CONFLICT: "conflict"}


def plan_lines(plan: Plan, runs) -> list[str]:
    """One line per run: variant, seed, state, run dir (relative to the sweep's output_dir), and the step or
    the conflict when there is one."""
    rows = []
    for run in runs:
        status = detect(run, plan.eval)
        note = status.detail if status.state in (State.RESUME, State.CONFLICT) else ""
        rows.append((run.variant, str(run.seed), STATE_LABELS[status.state], _shown(run.run_dir, plan.output_dir), note))
    header = ("variant", "seed", "state", "run dir", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + (f"  {row[4]}" if row[4] else "")
            for row in [header, *rows]]


def _shown(path: Path, base: Path | None = None) -> str:
    """`path` relative to `base` (default: the cwd) when it lies inside, else absolute."""
    path, base = Path(path).resolve(), Path(base).resolve() if base is not None else Path.cwd()
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def print_plan(plan: Plan, runs, *, verbose: bool = False) -> None:
    print(f"sweep {plan.sweep.name}{' (quick)' if plan.quick else ''}: {len(runs)} runs -> {plan.output_dir}\n"
          f"  base config: {plan.base_config}\n  deepspeed:   {plan.deepspeed_config} ({plan.sweep.num_ranks} ranks)\n")
    print("\n".join(line.rstrip() for line in plan_lines(plan, runs)))
    if not verbose:
        print("\n(--verbose also prints each run's train and eval commands)")
        return
    for run in runs:
        status = detect(run, plan.eval)
        print(f"\n{run.key}: {status.state.value} - {status.detail}")
        if status.state in (State.FRESH, State.RESUME):
            cmd = train_command(plan, run, rundir.sweep_ds_config(run.run_dir), resume=status.state is State.RESUME,
                                gpu=None, port="<free>")
            print("  train: " + shlex.join(cmd))
        if status.state in (State.FRESH, State.RESUME, State.NEEDS_EVAL):
            print("  eval:  " + shlex.join(eval_command(run, plan.eval)))


def regenerate_command(plan: Plan, runs_csv: Path | None) -> str:
    cmd = ["python", "-m", "ds_moe_div", "sweep", _shown(plan.sweep_file), "--aggregate-only"]
    cmd += ["--quick"] if plan.quick else []
    cmd += ["--runs-csv", _shown(runs_csv)] if runs_csv is not None else []
    return shlex.join(cmd)


def write_comparison(plan: Plan, runs_csv: Path | None = None) -> list[Path]:
    """Tables and plots over every run of the plan that has an eval report, or over the rows of runs_csv
    (tables only, written next to it)."""
    ranks = plan.sweep.num_ranks
    if runs_csv is None:
        results, out_dir = collect(list(plan.runs), plan.eval, num_ranks=ranks), plan.output_dir
    else:
        results = read_runs_csv(runs_csv, list(plan.runs), plan.eval, num_ranks=ranks)
        out_dir = Path(runs_csv).resolve().parent
    reference = plan.sweep.reference_variant if plan.sweep.reference_variant in plan.variants else None
    summaries = summarise(results, variants=plan.variants, reference=reference)
    if runs_csv is None:
        figures = plot_all(results, summaries, plan.variants, out_dir)
    else:  # no curves or heatmaps in a runs.csv: keep the figures already there
        figures = [out_dir / n for n in ("loss_curves.png", "delta_ppl_per_layer.png", "heatmaps.png")
                   if (out_dir / n).is_file()]
    title = plan.sweep.name + (" (quick)" if plan.quick else "")
    contrasts = [(v, r) for v, r in plan.sweep.contrast_pairs() if v in plan.variants and r in plan.variants]
    found, pairings = effects(results, contrasts=contrasts, endpoints=plan.sweep.endpoints)
    paths = write_tables(summaries, results, out_dir, title=title, split=plan.eval.split, reference=reference,
                         figures=[f.name for f in figures], write_runs=runs_csv is None)
    paths += write_effects(found, pairings, results, out_dir, title=title, endpoints=plan.sweep.endpoints,
                           command=regenerate_command(plan, runs_csv))
    return paths + (figures if runs_csv is None else [])


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        plan = build_plan(load_sweep(args.sweep), args.sweep, quick=args.quick)
        runs = select(plan, args.only)
        if args.runs_csv is not None:
            if not args.runs_csv.is_file():
                raise ValueError(f"--runs-csv {args.runs_csv}: no such file")
            paths = write_comparison(plan, args.runs_csv)
            print("\n".join(f"  {p}" for p in paths))
            return 0
    except (ConfigError, ValueError) as e:
        print(f"ds_moe_div.sweep: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(plan, runs, verbose=args.verbose)
        return 0
    failed = []
    if not args.aggregate_only:
        from ds_moe_div.sweep.launch import gpu_slots
        from ds_moe_div.sweep.runner import eval_available, execute

        if not eval_available():
            print("warning: this install has no `python -m ds_moe_div eval` command: runs are trained, their evaluation "
                  "fails; rerun the sweep once it exists to evaluate them", file=sys.stderr)
        import torch

        on_main_thread = threading.current_thread() is threading.main_thread()
        # `kill` ends the runs in flight too, as Ctrl-C does.
        previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
        try:
            outcomes = execute(plan, runs, slots=gpu_slots(plan.sweep.num_ranks),
                               on_cpu=not torch.cuda.is_available(), progress=not args.no_progress)
        except KeyboardInterrupt:
            print("\ninterrupted: the runs in flight were stopped; rerun the same command to resume them",
                  file=sys.stderr)
            return 130
        finally:
            if on_main_thread:
                signal.signal(signal.SIGTERM, previous)
        failed = [o for o in outcomes if not o.ok]
    paths = write_comparison(plan)
    print("\n" + "\n".join(f"  {p}" for p in paths))
    for outcome in failed:
        print(f"FAILED {outcome.run.key}: {outcome.message}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed; rerun the same command to retry them "
              "(finished runs are skipped)", file=sys.stderr)
    return 1 if failed else 0
