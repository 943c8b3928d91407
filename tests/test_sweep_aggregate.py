"""Aggregation on hand-written eval reports and small TensorBoard event files: tables, CSV, plots."""
from __future__ import annotations

import csv
import json
import math

import pytest

from ds_moe_div.sweep.aggregate import collect, metrics_of, read_scalars, summarise
from ds_moe_div.sweep.cli import main, write_comparison
from ds_moe_div.sweep.config import load_sweep
from ds_moe_div.sweep.plan import build_plan
from tests.test_sweep_config import write_sweep
from tests.test_sweep_plan import fake_checkpoint

LOSS = {("a", 0): 3.0, ("a", 1): 3.2, ("b", 0): 2.9, ("b", 1): 3.0}


def report(step: int, loss: float, *, domains=("code", "math"), figures=None) -> dict:
    layers = {f"layer_{i}": {"mean": 0.1 * (i + 1) + loss / 100, "std": 0.01, "per_domain": {}} for i in range(2)}
    return {"checkpoint": "x", "step": step, "config": {}, "split": "test", "tokens": 1000, "lm_loss": loss,
            "ppl": math.exp(loss),
            "per_domain": {d: {"lm_loss": loss + i, "ppl": math.exp(loss + i), "tokens": 500} for i, d in enumerate(domains)},
            "delta_ppl": {**layers, "all_layers": {"mean": 0.5, "std": 0.1, "per_domain": {}}},
            "routing": {"routing/mi/mean": loss / 10, "routing/max_violation/mean": 0.3, "routing/purity/mean": 0.6,
                        "routing/mi/layer_0": 0.2, "routing/not_a_number": "n/a"},
            **({"figures": figures} if figures else {})}


def write_run(run, loss: float, *, with_report=True, heatmap: bool = False) -> None:
    from torch.utils.tensorboard import SummaryWriter

    fake_checkpoint(run, run.steps)
    with SummaryWriter(str(run.run_dir / "tensorboard")) as writer:
        for step in range(1, run.steps + 1):
            writer.add_scalar("train/lm_loss", loss + 1.0 / step, step)
        writer.add_scalar("eval/val_lm_loss", loss + 0.1, run.steps)
    if with_report:
        figures = None
        if heatmap:
            from matplotlib.figure import Figure

            (run.run_dir / "eval" / "final" / "figs").mkdir(parents=True, exist_ok=True)
            fig = Figure(figsize=(2, 2))
            fig.add_subplot(1, 1, 1).imshow([[0, 1], [1, 0]])
            fig.savefig(run.run_dir / "eval" / "final" / "figs" / "h0.png")
            figures = {"heatmap/layer_0": "figs/h0.png", "load/layer_0": "figs/h0.png"}
        path = run.run_dir / "eval" / "final" / "report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report(run.steps, loss, figures=figures)))


@pytest.fixture
def plan(tmp_path):
    path = write_sweep(tmp_path, variants={"a": [], "b": [], "c": []}, seeds=[0, 1], base_overrides=["train.steps=5"])
    plan = build_plan(load_sweep(path), path)
    for run in plan.runs:
        if run.variant != "c":
            write_run(run, LOSS[(run.variant, run.seed)], heatmap=run.seed == 0)
    return plan


def test_metrics_of_a_report_are_flat_and_numeric():
    metrics = metrics_of(report(5, 3.0))
    assert metrics["lm_loss"] == 3.0 and metrics["ppl/math"] == pytest.approx(math.exp(4.0))
    assert [k for k in metrics if k.startswith("delta_ppl/")] == ["delta_ppl/layer_0", "delta_ppl/layer_1",
                                                                     "delta_ppl/all_layers"]
    assert metrics["routing/mi/mean"] == 0.3 and "routing/not_a_number" not in metrics
    assert metrics_of({"step": 1}) == {}


def test_scalars_keep_the_last_value_of_a_step_logged_twice(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as w:
        for step in (1, 2, 3):
            w.add_scalar("train/lm_loss", 10.0 + step, step)
    with SummaryWriter(str(tmp_path)) as w:  # a resumed run logs steps 3 and 4 again
        for step in (3, 4):
            w.add_scalar("train/lm_loss", 20.0 + step, step)
    curve = read_scalars(tmp_path)["train/lm_loss"]
    assert [s for s, _ in curve] == [1, 2, 3, 4] and dict(curve)[3] == 23.0
    assert read_scalars(tmp_path / "missing") == {}


def test_summary_means_stds_and_paired_differences(plan):
    results = collect(list(plan.runs), plan.eval)
    assert [r.report is not None for r in results] == [True, True, False] * 2
    summaries = summarise(results, variants=plan.variants, reference="a")
    assert [s.variant for s in summaries] == ["a", "b"]  # c has no report yet
    a, b = summaries
    assert a.mean["lm_loss"] == pytest.approx(3.1) and a.std["lm_loss"] == pytest.approx(0.1414, abs=1e-4)
    assert b.delta_to_reference[0] == pytest.approx(-0.15) and a.delta_to_reference is None
    assert b.delta_to_reference[1] == pytest.approx(0.0707, abs=1e-4)
    assert a.mean["final/val_lm_loss"] == pytest.approx(3.2)


def test_written_tables_and_plots(plan):
    paths = write_comparison(plan)
    names = sorted(p.name for p in paths)
    assert names == ["comparison.csv", "comparison.md", "delta_ppl_per_layer.png", "effects.csv", "effects.md",
                     "heatmaps.png", "loss_curves.png", "runs.csv"]
    md = (plan.output_dir / "comparison.md").read_text()
    assert "| a | 2 | 3.1 ± 0.14 |" in md and "-0.15 ± 0.071" in md
    assert "Not evaluated yet: c/seed0, c/seed1" in md and "![loss_curves](loss_curves.png)" in md
    assert "| variant | n | code | math |" in md and "| variant | n | layer_0 | layer_1 | all layers |" in md
    rows = list(csv.DictReader((plan.output_dir / "comparison.csv").open()))
    assert [r["variant"] for r in rows] == ["a", "b"] and float(rows[1]["lm_loss_mean"]) == pytest.approx(2.95)
    assert float(rows[1]["delta_lm_loss_vs_reference_mean"]) == pytest.approx(-0.15)
    runs = list(csv.DictReader((plan.output_dir / "runs.csv").open()))
    assert len(runs) == 4 and {"variant", "seed", "lm_loss", "routing/purity/mean"} <= set(runs[0])
    for p in paths:
        assert p.stat().st_size > 0
    assert not list(plan.output_dir.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_heatmaps_are_skipped_when_no_report_lists_them(tmp_path):
    path = write_sweep(tmp_path, variants={"a": []}, base_overrides=["train.steps=3"])
    plan = build_plan(load_sweep(path), path)
    write_run(plan.runs[0], 3.0)
    assert sorted(p.name for p in write_comparison(plan)) == ["comparison.csv", "comparison.md",
                                                             "delta_ppl_per_layer.png", "effects.csv", "effects.md",
                                                             "loss_curves.png", "runs.csv"]


def test_aggregate_only_and_dry_run_from_the_command_line(plan, capsys):
    assert main([str(plan.sweep_file), "--aggregate-only"]) == 0
    assert (plan.output_dir / "comparison.md").is_file()
    assert main([str(plan.sweep_file), "--dry-run", "--only", "c", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "c/seed0: fresh" in out and "a/seed0" not in out and "--override train.seed=0" in out
    assert main([str(plan.sweep_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("a ", "b ", "c "))]
    assert ["a", "0", "done", "a/seed0"] in rows and len(rows) == len(plan.runs)
    assert "--override" not in out and max(len(line) for line in out.splitlines()) < 200
    assert main([str(plan.sweep_file), "--only", "zz"]) == 2


def test_no_difference_to_the_reference_on_other_held_out_tokens(plan):
    for run in plan.runs:
        if run.variant == "b":  # e.g. fine-tuned on one domain, evaluated on that domain only
            path = run.run_dir / "eval" / "final" / "report.json"
            path.write_text(json.dumps({**report(run.steps, 2.0, domains=("math",)), "tokens": 400}))
    _, b = summarise(collect(list(plan.runs), plan.eval), variants=plan.variants, reference="a")
    assert b.delta_to_reference is None and b.mean["lm_loss"] == 2.0


def test_held_out_digest_decides_when_both_reports_have_one(plan):
    """Same token count and domains but other tokens (another tokenizer, split or packing): no difference,
    for any seed (a paired difference uses every seed or none); LOSS gives b - a = -0.1 and -0.2."""
    def rewrite(digest_of):
        for run in plan.runs:
            if run.variant in ("a", "b"):
                path = next(run.run_dir.glob("eval/*/report.json"))
                data = json.loads(path.read_text())
                path.write_text(json.dumps({**data, "held_out_sha256": digest_of(run)}))
        return summarise(collect(list(plan.runs), plan.eval), variants=plan.variants, reference="a")[1]

    b = rewrite(lambda run: f"tokens of seed {run.seed}")
    assert b.delta_to_reference[0] == pytest.approx(-0.15)
    b = rewrite(lambda run: "other tokens" if (run.variant, run.seed) == ("b", 0) else f"tokens of seed {run.seed}")
    assert b.delta_to_reference is None and "seed 0: their eval reports' held_out_sha256 differ" in b.delta_reason
    b = rewrite(lambda run: run.variant)
    assert b.delta_to_reference is None
