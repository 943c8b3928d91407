"""Routing over training: MaxVio_global, I(D;E) and D_inter per layer against step, read from a run's
logged TensorBoard scalars; several runs side by side, and the RMSE between two runs' MaxVio curves.

    python -m ds_moe_div.evaluation.training_curves runs/a [runs/b ...] [--names a b] [--out DIR]

Tags read (written by the training window, metrics/accumulator.py): routing/<metric>/layer_<id> and
routing/<metric>/mean for metric in CURVES. `eval` adds the run's figure (figures/training_curves.png)
to its report; `compare` adds the runs' mean curves and the MaxVio_global RMSE of each run against the
first (the baseline), over the steps both logged (Guo et al. report it for each ablation vs the full method).
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ds_moe_div import fileio, rundir

CURVES = (("max_violation_global", "MaxVio_global"), ("mi", "I(D;E) (nats)"), ("d_inter", "D_inter (nats)"))
_LAYER = re.compile(r"^routing/(?P<metric>[a-z_]+)/(?P<which>layer_\d+|mean)$")

Curve = dict[int, float]  # step -> value


def read_scalars(run_dir) -> dict[str, Curve]:
    """Every scalar tag of the run's TensorBoard folder (empty if the run logged none)."""
    log_dir = rundir.tensorboard_dir(run_dir)
    if not log_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def routing_curves(scalars: dict[str, Curve]) -> dict[str, dict[str, Curve]]:
    """{metric: {"layer_<id>" | "mean": {step: value}}} for the metrics of CURVES that the run logged."""
    wanted = {name for name, _ in CURVES}
    out: dict[str, dict[str, Curve]] = {}
    for tag, curve in scalars.items():
        match = _LAYER.match(tag)
        if match and match["metric"] in wanted:
            out.setdefault(match["metric"], {})[match["which"]] = dict(sorted(curve.items()))
    return out


def curve_rmse(a: Curve, b: Curve) -> tuple[float | None, int]:
    """sqrt(mean over the steps both curves logged of (a - b)^2), and the number of those steps
    (None without a common step)."""
    steps = sorted(set(a) & set(b))
    if not steps:
        return None, 0
    return math.sqrt(sum((a[s] - b[s]) ** 2 for s in steps) / len(steps)), len(steps)


def run_figure(curves: dict[str, dict[str, Curve]], title: str):
    """One row of panels (CURVES), a line per layer and the layer mean dashed; None if nothing was logged."""
    if not curves:
        return None
    fig, axes = _panels(title)
    for ax, (metric, label) in zip(axes, CURVES):
        for which, curve in sorted(curves.get(metric, {}).items(), key=lambda kv: (kv[0] == "mean", kv[0])):
            style = {"linestyle": "--", "color": "black"} if which == "mean" else {}
            ax.plot(list(curve), list(curve.values()), label=which.replace("_", " "), **style)
        _label(ax, label)
    return fig


def compare_figure(runs: dict[str, dict[str, dict[str, Curve]]]):
    """Each run's layer-mean curve per panel; None if no run logged any."""
    if not any(runs.values()):
        return None
    fig, axes = _panels("routing over training (mean over layers)")
    for ax, (metric, label) in zip(axes, CURVES):
        for name, curves in runs.items():
            curve = curves.get(metric, {}).get("mean", {})
            if curve:
                ax.plot(list(curve), list(curve.values()), label=name)
        _label(ax, label)
    return fig


def _panels(title: str):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5 * len(CURVES), 3.6), layout="constrained")
    axes = fig.subplots(1, len(CURVES))
    fig.suptitle(title)
    return fig, axes


def _label(ax, label: str) -> None:
    ax.set_xlabel("step")
    ax.set_title(label)
    if ax.get_lines():
        ax.legend(fontsize=7)


def comparison(names: Sequence[str], run_dirs: Sequence, out_dir: Path) -> tuple[list[str], list[list[str]]]:
    """For `compare`: the markdown section (figure + RMSE table) and csv rows (`metric, <value per run>`,
    the baseline's cell empty) of the MaxVio_global RMSE of each run against the first and its number of
    steps. Writes <out_dir>/figures/training_curves.png when any run logged curves."""
    runs = {name: routing_curves(read_scalars(d)) for name, d in zip(names, run_dirs)}
    fig = compare_figure(runs)
    if fig is None:
        return [], []
    path = fileio.write_figure(fig, rundir.figure_path(out_dir, "training_curves"), dpi=120)
    base = runs[names[0]].get("max_violation_global", {}).get("mean", {})
    lines = ["## Routing over training", "", f"![training curves]({path.relative_to(out_dir)})", "",
             f"RMSE of the layer-mean MaxVio_global curve against **{names[0]}**, over the steps both logged:", "",
             "| run | RMSE | steps |", "| --- | ---: | ---: |"]
    rmse_row, steps_row = ["training/max_violation_global_rmse", ""], ["training/max_violation_global_rmse_steps", ""]
    for name in names[1:]:
        rmse, steps = curve_rmse(runs[name].get("max_violation_global", {}).get("mean", {}), base)
        lines.append(f"| {name} | {'n/a' if rmse is None else f'{rmse:.4g}'} | {steps} |")
        rmse_row.append("" if rmse is None else repr(rmse))
        steps_row.append(str(steps))
    return lines + [""], [rmse_row, steps_row]


def write_run_figure(run_dir, out_dir: Path) -> list[str]:
    """figures/training_curves.png of one run under out_dir (relative path in a list; [] if no curves)."""
    fig = run_figure(routing_curves(read_scalars(run_dir)), f"routing over training: {Path(run_dir).name}")
    if fig is None:
        return []
    return [str(fileio.write_figure(fig, rundir.figure_path(out_dir, "training_curves"), dpi=120).relative_to(out_dir))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (their tensorboard/ folders are read)")
    parser.add_argument("--names", nargs="+", help="names of the runs (default: directory names)")
    parser.add_argument("--out", help="output directory (default: the run dir for one run, else <first>/..)")
    args = parser.parse_args(argv)
    names = args.names or [Path(r).name for r in args.runs]
    if len(names) != len(args.runs):
        print(f"error: {len(names)} names for {len(args.runs)} runs", file=sys.stderr)
        return 2
    if len(args.runs) == 1:
        written = write_run_figure(args.runs[0], Path(args.out or args.runs[0]))
        print("\n".join(written) or "no routing curves logged (train.routing_stats off?)")
        return 0
    lines, _ = comparison(names, args.runs, Path(args.out or Path(args.runs[0]).parent / "comparison"))
    print("\n".join(lines) or "no routing curves logged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
