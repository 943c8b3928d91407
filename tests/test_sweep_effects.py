"""Paired effects of a sweep's contrasts: pairing rules, numbers against ds_moe_div.stats, Holm over the
endpoint family, and the same tables from run dirs and from a committed runs.csv."""
from __future__ import annotations

import csv
import json
import math
import shutil

import pytest

from ds_moe_div import stats
from ds_moe_div.config_loader import ConfigError
from ds_moe_div.sweep.aggregate import collect, summarise
from ds_moe_div.sweep.cli import main, write_comparison
from ds_moe_div.sweep.config import load_sweep
from ds_moe_div.sweep.effects import derived_metrics, effects
from ds_moe_div.sweep.plan import build_plan
from tests.test_sweep_aggregate import write_run
from tests.test_sweep_config import write_sweep

# lm_loss per (variant, seed): b - a = -0.1, -0.2, -0.05; s (shuffled labels) - a = +0.1, +0.12, +0.08
LOSS = {("a", 0): 3.0, ("a", 1): 3.2, ("a", 2): 3.1, ("b", 0): 2.9, ("b", 1): 3.0, ("b", 2): 3.05,
        ("s", 0): 3.1, ("s", 1): 3.32, ("s", 2): 3.18}


def make_plan(tmp_path, *, packing="by_domain", **fields):
    variants = {"a": [], "b": ["objectives.orthogonality.coef=0.01"],
                "s": ["objectives.divergence.coef=0.01", "data.shuffle_labels_seed={seed}"]}
    path = write_sweep(tmp_path, variants=variants, seeds=[0, 1, 2], reference="a",
                       base_overrides=["train.steps=3", f"data.packing={packing}"], **fields)
    plan = build_plan(load_sweep(path), path)
    for run in plan.runs:
        write_run(run, LOSS[(run.variant, run.seed)])
    return plan


def set_digest(plan, digest_of):
    """Give (or, with None, take away) each report's held_out_sha256."""
    for run in plan.runs:
        path = next(run.run_dir.glob("eval/*/report.json"))
        data = {k: v for k, v in json.loads(path.read_text()).items() if k != "held_out_sha256"}
        if digest_of(run) is not None:
            data["held_out_sha256"] = digest_of(run)
        path.write_text(json.dumps(data))


def by_contrast(found, metric="lm_loss"):
    return {(e.variant, e.reference): e for e in found if e.metric == metric}


def test_effect_numbers_are_the_stats_of_the_paired_differences(tmp_path):
    plan = make_plan(tmp_path, contrasts=["b", "s", {"variant": "b", "reference": "s"}])
    found, pairings = effects(collect(list(plan.runs), plan.eval, num_ranks=2),
                              contrasts=plan.sweep.contrast_pairs(), endpoints=("lm_loss",))
    b = by_contrast(found)[("b", "a")]
    d = [-0.1, -0.2, -0.05]
    assert b.diffs == pytest.approx(d) and b.n == 3 and b.seeds == "0 1 2" and b.primary
    assert b.mean_diff == pytest.approx(stats.mean(d)) and b.sd_diff == pytest.approx(stats.sample_sd(d))
    assert (b.ci_t_low, b.ci_t_high) == pytest.approx(stats.t_interval(d))
    assert (b.ci_boot_low, b.ci_boot_high) == pytest.approx(stats.bootstrap_interval(d, seed=0))
    assert b.p_t == pytest.approx(stats.paired_t_test(d).p) and b.p_sign_flip == 0.25
    assert b.mde == pytest.approx(stats.mde(sd=stats.sample_sd(d), n=3))
    assert b.n_for_observed == stats.n_for_mde(sd=stats.sample_sd(d), target=stats.mean(d))
    # by_domain packing: the shuffled-label run packs other held-out tokens -> refused, outside no family
    assert "data.shuffle_labels_seed (0 vs None)" in pairings[("s", "a")].reason
    primary = [e for e in found if e.primary]
    assert [e.variant for e in primary] == ["b", "s", "b"]
    assert [e.p_holm for e in primary] == pytest.approx(stats.holm([b.p_t, math.nan, math.nan]), nan_ok=True)
    assert b.p_holm == pytest.approx(min(1.0, 3 * b.p_t))  # the refused ones count as p = 1
    secondary = {e.metric for e in found if e.variant == "b" and not e.primary}
    assert {"lm_loss/code", "lm_loss/math", "delta_logppl/layer_0", "final/val_lm_loss"} <= secondary
    assert all(math.isnan(e.p_holm) for e in found if not e.primary)


def test_mixed_packing_pairs_the_shuffled_label_control(tmp_path):
    plan = make_plan(tmp_path, packing="mixed", contrasts=["s"])
    found, pairings = effects(collect(list(plan.runs), plan.eval), contrasts=[("s", "a")], endpoints=("lm_loss",))
    assert pairings[("s", "a")].seeds == (0, 1, 2)
    assert by_contrast(found)[("s", "a")].mean_diff == pytest.approx(0.1)


def test_the_ed3_shuffled_inconsistency_is_gone(tmp_path):
    """v1's comparison.md printed a Δ over seeds 1 and 2 for a by_domain shuffled-label run: its reports had no
    held_out_sha256, the fallback compared token counts and domain names, seed 0 scored fewer tokens (refused)
    and seeds 1-2 the same number (paired, although other tokens). Now every path refuses the whole contrast
    with the reason, from the run dirs and from runs.csv alike; with digests, the digests decide."""
    plan = make_plan(tmp_path)
    set_digest(plan, lambda run: None)
    shuffled0 = next(r for r in plan.runs if (r.variant, r.seed) == ("s", 0))
    path = next(shuffled0.run_dir.glob("eval/*/report.json"))
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokens": 990}))
    s = summarise(collect(list(plan.runs), plan.eval), variants=plan.variants, reference="a")[2]
    assert s.variant == "s" and s.delta_to_reference is None
    assert s.delta_reason.startswith("seed 0: other held-out tokens: data.shuffle_labels_seed (0 vs None)")
    set_digest(plan, lambda run: None if run.seed else "shuffled packing" if run.variant == "s" else "tokens")
    results = collect(list(plan.runs), plan.eval)
    s = summarise(results, variants=plan.variants, reference="a")[2]
    assert s.delta_to_reference is None
    assert s.delta_reason.startswith("seed 0: their eval reports' held_out_sha256 differ")
    write_comparison(plan)
    md = (plan.output_dir / "comparison.md").read_text()
    assert "- s: seed 0: their eval reports' held_out_sha256 differ" in md
    # the same from runs.csv, without run dirs: seeds 1-2 have no digest, the planned data settings decide
    runs_csv = tmp_path / "committed" / "runs.csv"
    runs_csv.parent.mkdir()
    shutil.copy(plan.output_dir / "runs.csv", runs_csv)
    shutil.rmtree(plan.output_dir)
    assert main([str(plan.sweep_file), "--aggregate-only", "--runs-csv", str(runs_csv)]) == 0
    md = (runs_csv.parent / "comparison.md").read_text()
    assert "| s | 3 | 3.2 ± 0.11 |  |" in md and "| b | 3 | 2.983 ± 0.076 | -0.1167 ± 0.076 |" in md and \
        "- s: seed 0: their eval reports' held_out_sha256 differ" in md
    rows = list(csv.DictReader((runs_csv.parent / "effects.csv").open()))
    assert [r["reason"] != "" for r in rows if r["metric"] == "lm_loss"] == [False, True]
    without_digests = [{k: v for k, v in row.items() if k != "held_out_sha256"} for row in csv.DictReader(runs_csv.open())]
    with runs_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(without_digests[0]))
        writer.writeheader()
        writer.writerows(without_digests)
    assert main([str(plan.sweep_file), "--aggregate-only", "--runs-csv", str(runs_csv)]) == 0
    assert "- s: seed 0: other held-out tokens: data.shuffle_labels_seed (0 vs None)" in \
        (runs_csv.parent / "comparison.md").read_text()


def test_runs_csv_regenerates_the_same_effects_as_the_run_dirs(tmp_path, capsys):
    plan = make_plan(tmp_path, contrasts=["b"], endpoints=["lm_loss", "lm_loss/math"])
    set_digest(plan, lambda run: f"tokens of seed {run.seed}")
    write_comparison(plan)
    from_dirs = (plan.output_dir / "effects.csv").read_text()
    md = (plan.output_dir / "effects.md").read_text()
    assert "Regenerate: `python -m ds_moe_div sweep" in md and "--aggregate-only" in md
    assert "Held-out target tokens scored per run: 1,000" in md and "lm_loss, lm_loss/math x the 1 declared" in md
    runs_csv = tmp_path / "runs.csv"
    shutil.copy(plan.output_dir / "runs.csv", runs_csv)
    shutil.rmtree(plan.output_dir)
    assert main([str(plan.sweep_file), "--aggregate-only", "--runs-csv", str(runs_csv)]) == 0
    assert (tmp_path / "effects.csv").read_text() == from_dirs
    assert f"--runs-csv {runs_csv}" in (tmp_path / "effects.md").read_text()
    assert not plan.output_dir.exists()  # nothing written where the run dirs were


def test_runs_csv_errors(tmp_path, capsys):
    plan = make_plan(tmp_path)
    write_comparison(plan)
    assert main([str(plan.sweep_file), "--aggregate-only", "--runs-csv", str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err
    stranger = tmp_path / "other.csv"
    stranger.write_text("variant,seed,lm_loss\nzz,0,3.0\n")
    assert main([str(plan.sweep_file), "--aggregate-only", "--runs-csv", str(stranger)]) == 2
    assert "zz/seed0 is not in the sweep's plan" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(plan.sweep_file), "--runs-csv", str(stranger)])


def test_seeds_must_all_pair(tmp_path):
    plan = make_plan(tmp_path, contrasts=["b"])
    shutil.rmtree(next(r.run_dir for r in plan.runs if (r.variant, r.seed) == ("b", 2)) / "eval")
    found, pairings = effects(collect(list(plan.runs), plan.eval), contrasts=[("b", "a")], endpoints=("lm_loss",))
    assert pairings[("b", "a")].reason.startswith("seeds differ (b: [0, 1], a: [0, 1, 2])")
    assert by_contrast(found)[("b", "a")].n == 0 and not pairings[("b", "a")].not_run


def test_derived_metrics_are_nats():
    m = derived_metrics({"ppl": 100.0, "ppl/math": math.e ** 2, "delta_ppl/layer_3": 50.0})
    assert m["lm_loss/math"] == pytest.approx(2.0) and m["delta_logppl/layer_3"] == pytest.approx(math.log(1.5))
    assert derived_metrics({"lm_loss/math": 1.0, "ppl/math": 5.0})["lm_loss/math"] == 1.0  # kept when present


@pytest.mark.parametrize("fields,message", [
    ({"contrasts": ["zz"]}, "contrasts[0].variant='zz' is not a variant"),
    ({"contrasts": [{"variant": "b", "reference": "zz"}]}, "contrasts[0].reference='zz' is not a variant"),
    ({"contrasts": ["a"]}, "'a' against itself"),
    ({"contrasts": ["b", {"variant": "b", "reference": "a"}]}, "listed twice"),
    ({"endpoints": []}, "name at least one metric"),
    ({"endpoints": ["lm loss"]}, "write metric names as in runs.csv"),
    ({"contrasts": [{"variant": "b", "ref": "a"}]}, "ref"),
])
def test_contrast_and_endpoint_validation(tmp_path, fields, message):
    with pytest.raises((ConfigError, ValueError), match=message.replace("[", r"\[").replace("]", r"\]")):
        load_sweep(write_sweep(tmp_path, reference="a", **fields))


def test_default_contrasts_are_every_variant_against_the_reference(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, variants={"a": [], "b": [], "c": []}, reference="b"))
    assert sweep.contrast_pairs() == [("a", "b"), ("c", "b")] and sweep.endpoints == ("lm_loss",)
