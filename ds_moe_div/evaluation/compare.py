"""`python -m ds_moe_div compare`: several runs' evaluation reports side by side, the first one as the baseline.

    python -m ds_moe_div compare runs/baseline runs/ed_0.01 [--names baseline ed] [--split test]
        [--domain-column COL] [--out DIR]

Each argument is a run dir (its report.json under <run>/eval/ for that split and label column, the
highest step), an eval output dir, or a report.json. Prints the table and writes comparison.md and
comparison.csv to --out (default: <common parent of the runs>/comparison). Cells of the other runs show
their difference to the baseline; differing config values and measurement settings are listed first.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

from ds_moe_div import fileio, rundir
from ds_moe_div.cli import prog
from ds_moe_div.config_loader import flatten
from ds_moe_div.evaluation import training_curves
from ds_moe_div.evaluation.report import (
    SPECIALISATION_METRICS,
    fmt,
    table,
)

IGNORED_CONFIG_KEYS = ("train.run_dir", "train.show_progress", "train.resume", "train.init_from",
                       "train.resume_from")
SETTINGS = ("split", "domain_column", "tokens")


def differences(reports: list[dict]) -> list[tuple[str, list]]:
    """(key, values per run) of every config value or measurement setting that is not the same everywhere."""
    flat = [flatten(r["config"]) for r in reports]
    keys = sorted(set().union(*flat) - set(IGNORED_CONFIG_KEYS))
    rows = [(k, [f.get(k) for f in flat]) for k in keys]
    rows += [(f"eval.{k}", [r.get(k) for r in reports]) for k in SETTINGS]
    rows += [(f"eval.{k}", [r["eval"].get(k) for r in reports]) for k in ("max_batches", "micro_batch_size")]
    return [(k, values) for k, values in rows if any(v != values[0] for v in values)]


def _union(lists) -> list:
    seen = {}
    for items in lists:
        seen.update(dict.fromkeys(items))
    return list(seen)


def metric_rows(reports: list[dict]) -> list[tuple[str, str, list, list | None]]:
    """(csv key, label, value per run, std per run or None)."""
    rows = [("lm_loss", "held-out LM loss (nats)", [r["lm_loss"] for r in reports], None),
            ("ppl", "PPL", [r["ppl"] for r in reports], None)]
    for name in _union(r["per_domain"] for r in reports):
        rows.append((f"ppl/{name}", f"PPL {name}", [r["per_domain"].get(name, {}).get("ppl") for r in reports], None))
    for key in _union(r["delta_ppl"] for r in reports):
        entries = [r["delta_ppl"].get(key, {}) for r in reports]
        rows.append((f"delta_ppl/{key}", f"delta-PPL {key.replace('_', ' ')}", [e.get("mean") for e in entries],
                     [e.get("std") for e in entries]))
    layers = _union([k.removeprefix("layer_") for k in r["routing_matrices"]] for r in reports)
    for lid in layers:
        rows.append((f"routing/mi/layer_{lid}", f"I(D;E) layer {lid}",
                     [r["routing"].get(f"routing/mi/layer_{lid}") for r in reports], None))
    metrics = list(SPECIALISATION_METRICS) + [(f"entropy/{n}", f"H(E \\| {n})")
                                              for n in _union(r["domain_names"] for r in reports)]
    for tag, label in metrics:
        rows.append((f"routing/{tag}/mean", f"{label}, mean over layers",
                     [r["routing"].get(f"routing/{tag}/mean") for r in reports], None))
    from ds_moe_div.evaluation.task_report import compare_rows
    return rows + compare_rows(reports)


def _cell(value, std, base, is_base: bool) -> str:
    text = fmt(value) if std is None else f"{fmt(value, 3)} ± {fmt(std, 3)}"
    if is_base or value is None or base is None:
        return text
    return f"{text} ({value - base:+.4g})"


def markdown(names: list[str], reports: list[dict], paths: list[Path]) -> str:
    rows = [[label, *[_cell(v, None if stds is None else stds[i], values[0], i == 0) for i, v in enumerate(values)]]
            for _, label, values, stds in metric_rows(reports)]
    lines = ["# Comparison", "", f"Baseline: **{names[0]}**; other columns show (difference to the baseline).", ""]
    lines += [f"- {n}: `{p}` (step {r['step']}, {r['split']}, {fmt(r['tokens'])} tokens)"
              for n, r, p in zip(names, reports, paths)]
    diffs = differences(reports)
    if diffs:
        lines += ["", "What differs:", "",
                  table(["setting", *names], [[k, *[f"`{json.dumps(v)}`" for v in vs]] for k, vs in diffs])]
    lines += ["", table(["metric", *names], rows, "r"), ""]
    return "\n".join(lines)


def csv_text(names: list[str], reports: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["metric", *names, *[f"{n} - {names[0]}" for n in names[1:]]])
    for key, _, values, stds in metric_rows(reports):
        for suffix, vals in (("", values), ("/std", stds)):
            if vals is None:
                continue
            deltas = [None if v is None or vals[0] is None else v - vals[0] for v in vals[1:]]
            writer.writerow([key + suffix, *["" if v is None else repr(v) for v in [*vals, *deltas]]])
    return buffer.getvalue()


def compare(paths: list, *, names: list[str] | None = None, split: str = "test", column: str | None = None,
            out: Path | None = None) -> tuple[str, Path]:
    files = [rundir.resolve_report(p, split=split, column=column) for p in paths]
    reports = [json.loads(f.read_text()) for f in files]
    names = names or [Path(r["run_dir"]).name for r in reports]
    if len(names) != len(reports):
        raise ValueError(f"{len(names)} names for {len(reports)} runs")
    out = Path(out) if out else Path(os.path.commonpath([Path(p).resolve() for p in paths])) / "comparison"
    curve_lines, curve_rows = training_curves.comparison(names, [r["run_dir"] for r in reports], out)
    text = "\n".join([markdown(names, reports, files), *curve_lines])
    fileio.write_text(out / "comparison.md", text)
    fileio.write_text(out / "comparison.csv", csv_text(names, reports) + "".join(",".join(row) + "\n"
                                                                              for row in curve_rows))
    return text, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=prog("compare"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run dirs, eval dirs or report.json files; the first is the baseline")
    parser.add_argument("--names", nargs="+", help="column names (default: the run directory names)")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--domain-column", help="pick reports labelled by this column (default: each run's own)")
    parser.add_argument("--out", help="where comparison.md / .csv go (default <common parent>/comparison)")
    args = parser.parse_args(argv)
    try:
        text, out = compare(args.runs, names=args.names, split=args.split, column=args.domain_column, out=args.out)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"ds_moe_div compare: error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.csv'}")
    return 0
