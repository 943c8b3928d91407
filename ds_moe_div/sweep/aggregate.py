"""Collect each run's eval report and TensorBoard curves; tabulate mean ± std over seeds per variant.

    results = collect(plan.runs, plan.eval)
    summary = summarise(results, variants=plan.variants, reference="baseline")
    write_tables(summary, results, out_dir, title="objectives")   # comparison.md, comparison.csv, runs.csv

    results = read_runs_csv(path, plan)     # the same records from a committed runs.csv (no run dirs)

Metrics per run (from RUN/eval/<tag>/report.json of its final checkpoint): lm_loss, ppl, ppl/<domain>,
tokens, delta_ppl/all_layers and delta_ppl/layer_<i> (means over permutations), every routing/<...>/mean,
the last train/lm_loss and eval/val_lm_loss from TensorBoard, and the nats forms of effects.py
(lm_loss/<domain>, delta_logppl/layer_<i>). Std is the sample std over seeds (n-1); "Δ vs <reference>"
is the mean ± sd of the per-seed differences to the reference variant's run of the same seed, given only
where effects.pair pairs every seed (same held-out tokens), else blank with the reason: comparison.md,
effects.md and runs.csv therefore agree.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ds_moe_div import fileio, rundir
from ds_moe_div.evaluation.report import mean_std, table
from ds_moe_div.sweep.config import EvalSpec
from ds_moe_div.sweep.effects import derived_metrics, held_out_fields, pair
from ds_moe_div.sweep.plan import RunSpec

CURVE_TAGS = ("train/lm_loss", "eval/val_lm_loss")
MAX_DOMAIN_COLUMNS = 12
HEADLINE = (("lm_loss", "LM loss"), ("ppl", "PPL"), ("delta_ppl/all_layers", "ΔPPL (all layers)"),
            ("routing/mi/mean", "MI"), ("routing/max_violation/mean", "MaxVio"), ("routing/purity/mean", "purity"))


@dataclass
class RunResult:
    variant: str
    seed: int
    run_dir: Path
    report: dict | None = None
    report_path: Path | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    held_out_sha256: str | None = None  # from the eval report (or runs.csv)
    held_out: dict | None = None  # effects.held_out_fields of the planned config
    from_csv: bool = False  # metrics read from a runs.csv row, not from a report

    @property
    def evaluated(self) -> bool:
        return self.report is not None or self.from_csv


@dataclass
class VariantSummary:
    variant: str
    seeds: list[int]
    mean: dict[str, float]
    std: dict[str, float]
    delta_to_reference: tuple[float, float] | None = None  # (mean, std) of per-seed lm_loss differences
    delta_reason: str = ""  # why there is no delta_to_reference (effects.pair's refusal)


def read_scalars(tb_dir: Path, tags=CURVE_TAGS) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag, sorted by step; a step logged twice (a resumed run) keeps its last value."""
    if not tb_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    available = set(acc.Tags().get("scalars", ()))
    curves = {}
    for tag in tags:
        if tag in available:
            by_step = {e.step: e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.wall_time)}
            curves[tag] = sorted(by_step.items())
    return curves


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metrics_of(report: dict) -> dict[str, float]:
    """The flat numeric metrics of one eval report (missing parts are left out)."""
    metrics = {k: v for k in ("lm_loss", "ppl", "tokens") if (v := _number(report.get(k))) is not None}
    settings = report.get("eval") or {}
    for key in ("global_batches", "split_global_batches"):
        if (v := _number(settings.get(key))) is not None:
            metrics[f"held_out/{key}"] = v
    for domain, values in (report.get("per_domain") or {}).items():
        if (v := _number((values or {}).get("ppl"))) is not None:
            metrics[f"ppl/{domain}"] = v
    delta = report.get("delta_ppl") or {}
    for layer in sorted((k for k in delta if k.startswith("layer_")), key=lambda k: int(k.split("_")[1])):
        if (v := _number((delta[layer] or {}).get("mean"))) is not None:
            metrics[f"delta_ppl/{layer}"] = v
    if (v := _number((delta.get("all_layers") or {}).get("mean"))) is not None:
        metrics["delta_ppl/all_layers"] = v
    for key, value in (report.get("routing") or {}).items():
        if (v := _number(value)) is not None:
            metrics[key] = v
    from ds_moe_div.evaluation.task_report import flat_metrics
    metrics.update(flat_metrics(report))  # tasks/... accuracies, ablation/... and keep_k/...
    return metrics


def _held_out_of(run: RunSpec, spec: EvalSpec, num_ranks: int | None) -> dict:
    return held_out_fields(run.config, split=spec.split, max_batches=spec.max_batches, num_ranks=num_ranks)


def collect(runs: list[RunSpec], spec: EvalSpec, *, num_ranks: int | None = None) -> list[RunResult]:
    results = []
    for run in runs:
        result = RunResult(run.variant, run.seed, run.run_dir, curves=read_scalars(rundir.tensorboard_dir(run.run_dir)),
                           held_out=_held_out_of(run, spec, num_ranks))
        report_path = rundir.find_report(run.run_dir, split=spec.split, column=spec.domain_column, step=run.steps)
        if report_path is not None:
            result.report, result.report_path = json.loads(report_path.read_text()), report_path
            result.metrics = derived_metrics(metrics_of(result.report))
            result.held_out_sha256 = result.report.get("held_out_sha256") or None
        for tag, name in (("train/lm_loss", "final/train_lm_loss"), ("eval/val_lm_loss", "final/val_lm_loss")):
            if result.curves.get(tag) and result.report is not None:
                result.metrics[name] = result.curves[tag][-1][1]
        results.append(result)
    return results


_TEXT_COLUMNS = ("variant", "seed", "run_dir", "held_out_sha256")


def read_runs_csv(path: Path, runs: list[RunSpec], spec: EvalSpec, *, num_ranks: int | None = None) -> list[RunResult]:
    """The records of a runs.csv (as write_tables writes it), matched to the planned runs; a planned run
    without a row counts as not evaluated, a row without a planned run is an error."""
    planned = {(r.variant, r.seed): r for r in runs}
    found = {}
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            key = (row.get("variant"), int(row.get("seed") or -1))
            if key not in planned:
                raise ValueError(f"{path}:{line}: run {key[0]}/seed{key[1]} is not in the sweep's plan; "
                                 "aggregate it with the sweep file it was run from")
            metrics = {k: float(v) for k, v in row.items() if k not in _TEXT_COLUMNS and v not in (None, "")}
            found[key] = RunResult(key[0], key[1], Path(row.get("run_dir") or planned[key].run_dir),
                                   metrics=derived_metrics(metrics), held_out_sha256=row.get("held_out_sha256") or None,
                                   held_out=_held_out_of(planned[key], spec, num_ranks), from_csv=True)
    return [found.get(key) or RunResult(run.variant, run.seed, run.run_dir, held_out=_held_out_of(run, spec, num_ranks))
            for key, run in planned.items()]


def summarise(results: list[RunResult], *, variants, reference: str | None) -> list[VariantSummary]:
    """One summary per variant that has at least one evaluated run, in `variants` order."""
    reported = [r for r in results if r.evaluated]
    summaries = []
    for variant in variants:
        runs = [r for r in reported if r.variant == variant]
        if not runs:
            continue
        keys = list(dict.fromkeys(k for r in runs for k in r.metrics))
        stats = {k: mean_std([r.metrics[k] for r in runs if k in r.metrics]) for k in keys}
        delta, reason = None, ""
        if reference is not None and variant != reference:
            pairing = pair(runs, [r for r in reported if r.variant == reference], variant=variant, reference=reference)
            reason = pairing.reason
            diffs = [r.metrics["lm_loss"] - ref.metrics["lm_loss"] for r in runs for ref in reported
                     if ref.variant == reference and ref.seed == r.seed] if not reason else []
            delta = mean_std(diffs) if len(diffs) == len(runs) and diffs else None
        summaries.append(VariantSummary(variant, [r.seed for r in runs], {k: v[0] for k, v in stats.items()},
                                        {k: v[1] for k, v in stats.items()}, delta, reason))
    return summaries


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None or math.isnan(mean):
        return ""
    return f"{mean:.4g}" if std is None or math.isnan(std) else f"{mean:.4g} ± {std:.2g}"


def _by_metric(summaries: list[VariantSummary], metrics: list[str]) -> list[list[str]]:
    return [[s.variant, str(len(s.seeds))] + [_cell(s.mean.get(m), s.std.get(m)) for m in metrics] for s in summaries]


def markdown(summaries: list[VariantSummary], results: list[RunResult], *, title: str, split: str,
             reference: str | None, figures: list[str] = ()) -> str:
    missing = [f"{r.variant}/seed{r.seed}" for r in results if not r.evaluated]
    text = [f"# Sweep {title}\n", f"Held-out split `{split}`; mean ± sample std over seeds (column n). "
            f"{len(results) - len(missing)} of {len(results)} runs evaluated."
            + (f" Not evaluated yet: {', '.join(missing)}." if missing else "") + "\n"]
    header = ["variant", "n", "LM loss", f"Δ LM loss vs {reference}"] + [label for _, label in HEADLINE[1:]]
    rows = [[s.variant, str(len(s.seeds)), _cell(s.mean.get("lm_loss"), s.std.get("lm_loss")),
             _cell(*s.delta_to_reference) if s.delta_to_reference else ""]
            + [_cell(s.mean.get(m), s.std.get(m)) for m, _ in HEADLINE[1:]] for s in summaries]
    text += ["## LM loss, specialisation and routing\n", table(header, rows) + "\n"]
    unpaired = [f"- {s.variant}: {s.delta_reason}" for s in summaries if s.delta_reason]
    if unpaired:
        text += [f"No Δ vs {reference} (a paired difference needs every seed on the same held-out tokens):\n"]
        text += unpaired + [""]
    text += ["Paired effects with intervals, p-values and MDE: [effects.md](effects.md).\n"]
    domains = list(dict.fromkeys(k for s in summaries for k in s.mean if k.startswith("ppl/")))
    if len(domains) > MAX_DOMAIN_COLUMNS:
        note = (f"{len(domains)} domains: see comparison.csv (set the sweep's eval.domain_column to compare "
                "every run on one label scheme).\n")
        text += ["## Per-domain PPL\n", note]
    elif domains:
        note = ("A variant evaluated with another label scheme (e.g. subdomain labels) has its own columns; "
                "blanks are domains it does not have.\n")
        text += ["## Per-domain PPL\n", note,
                 table(["variant", "n"] + [d[4:] for d in domains], _by_metric(summaries, domains)) + "\n"]
    layers = list(dict.fromkeys(k for s in summaries for k in s.mean if k.startswith("delta_ppl/layer_")))
    if layers:
        text += ["## Router-permutation ΔPPL per MoE layer\n",
                 table(["variant", "n"] + [k.split("/")[1] for k in layers] + ["all layers"],
                       _by_metric(summaries, layers + ["delta_ppl/all_layers"])) + "\n"]
    text += _other_metrics(summaries)
    text += [f"![{Path(f).stem}]({f})\n" for f in figures]
    return "\n".join(text)


def _other_metrics(summaries: list[VariantSummary]) -> list[str]:
    """Task accuracy, expert ablation, and every other routing/<metric>/mean: the union over variants."""
    shown = {key for key, _ in HEADLINE}
    sections = [("Downstream tasks and expert ablation", ("tasks/", "ablation/", "keep_k/")),
                ("Other routing metrics (mean over layers)", ("routing/",))]
    text = []
    for title, prefixes in sections:
        keys = [k for k in dict.fromkeys(k for s in summaries for k in s.mean) if k.startswith(prefixes)
                and k not in shown and (not k.startswith("routing/") or k.endswith("/mean"))
                and not k.startswith("routing/entropy/")]  # one per domain: in comparison.csv
        if keys:
            text += [f"## {title}\n", table(["variant", "n", *keys], _by_metric(summaries, keys)) + "\n"]
    return text


def _csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


to_csv = _csv  # the one CSV writer of the sweep tables (effects.py uses it too)


def write_tables(summaries: list[VariantSummary], results: list[RunResult], out_dir: Path, *, title: str,
                 split: str, reference: str | None, figures: list[str] = (), write_runs: bool = True) -> list[Path]:
    """comparison.md, comparison.csv (one row per variant) and runs.csv (one row per evaluated run; not
    with write_runs=False, when the results were read from it)."""
    rows = []
    for s in summaries:
        row = {"variant": s.variant, "n": len(s.seeds), "seeds": " ".join(map(str, s.seeds))}
        if s.delta_to_reference:
            row.update({"delta_lm_loss_vs_reference_mean": s.delta_to_reference[0],
                        "delta_lm_loss_vs_reference_std": s.delta_to_reference[1]})
        for key in s.mean:
            row.update({f"{key}_mean": s.mean[key], f"{key}_std": s.std[key]})
        rows.append(row)
    per_run = [{"variant": r.variant, "seed": r.seed, "run_dir": str(r.run_dir),
                "held_out_sha256": r.held_out_sha256 or "", **r.metrics} for r in results if r.evaluated]
    paths = [out_dir / "comparison.md", out_dir / "comparison.csv", out_dir / "runs.csv"]
    fileio.write_text(paths[0], markdown(summaries, results, title=title, split=split, reference=reference,
                                    figures=figures))
    fileio.write_text(paths[1], _csv(rows))
    if write_runs:
        fileio.write_text(paths[2], _csv(per_run))
    return paths if write_runs else paths[:2]
