"""Evaluation end to end on a tiny checkpoint trained in-process to route domains apart.

    .venv/bin/python -m pytest tests/test_evaluation_e2e.py -q      (~1 minute on 2 cores)

One 1-rank process trains and saves the checkpoint; one evaluates it (identity permutation, weights
restored, full report); two gloo ranks evaluate it again (same numbers); the CLI evaluates it with
another label scheme and writes the figures and TensorBoard events. A few steps of a shuffled-label
run (the negative control, on an include_labels subset) check that it is evaluated on the true labels.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

from tests.dist_utils import run_on_ranks
from tests.train_utils import train_smoke

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "ds_configs" / "experiments" / "smoke.json"
STEPS = 60
# Whole test split (974 sequences) in micro-batches of 16: 61 on 1 rank; 2 ranks add one of pure padding.
EVAL_ARGS = ["--max-batches", "all", "--permutation-seeds", "2", "--micro-batch-size", "16", "--no-progress"]

pytestmark = pytest.mark.slow


def _train(rank, world_size, run_dir):
    # a short, strong run: I(D;E) ~0.23 nats vs ~0.04 without the loss
    train_smoke(run_dir, steps=STEPS, warmup_steps=5, lr=3e-3,
                overrides=["objectives.divergence.coef=1.0", "objectives.orthogonality.coef=0",
                           "objectives.variance.coef=0", "objectives.z_loss.coef=0"])


def _identity_and_restore(run_dir) -> dict:
    import torch

    from ds_moe_div.data import BatchLoader
    from ds_moe_div.evaluation.heldout import heldout_sums
    from ds_moe_div.evaluation.loading import load_for_eval
    from ds_moe_div.evaluation.permutation import draw_permutations, permuted_routers

    loaded = load_for_eval(run_dir, show_progress=False)
    layers = loaded.model.moe_layers()
    loader = BatchLoader(loaded.data.splits["test"], micro_batch_size=8, shuffle=False, loop=False)

    def sums():
        return heldout_sums(loaded.engine, islice(loader, 6), num_domains=len(loaded.data.domain_names))

    base = sums()
    def weight(layer):  # AutoEP router (the default path) or DeepSpeed's native gate
        return layer.router_weight

    before = [weight(layer).detach().clone() for layer in layers]
    with permuted_routers(layers, [torch.arange(len(before[0]))] * len(layers)):
        identity = sums()
    with permuted_routers(layers, draw_permutations(len(layers), len(before[0]), [0])[0]):
        permuted = sums()
    restored = all(torch.equal(weight(layer), b) for layer, b in zip(layers, before))
    return {"identity_equal": torch.equal(base, identity), "permuted_differs": not torch.equal(base, permuted),
            "restored": restored, "after_restore_equal": torch.equal(base, sums())}


def _evaluate(rank, world_size, run_dir, out, checks):
    from ds_moe_div.evaluation.runner import evaluate, parse_args

    extra = _identity_and_restore(run_dir) if checks else None
    report = evaluate(parse_args(["--run-dir", run_dir, "--out", out, *EVAL_ARGS]))
    return report, extra


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "run"
    run_on_ranks(_train, world_size=1, args=(str(path),), timeout=300)
    return path


@pytest.fixture(scope="module")
def one_rank(run_dir):
    out = run_dir / "eval" / "one_rank"
    [(report, checks)] = run_on_ranks(_evaluate, world_size=1, args=(str(run_dir), str(out), True), timeout=300)
    return report, checks, out


def test_identity_permutation_changes_nothing_and_weights_are_restored(one_rank):
    _, checks, _ = one_rank
    assert checks == {"identity_equal": True, "permuted_differs": True, "restored": True,
                      "after_restore_equal": True}


def test_delta_ppl_is_positive_on_a_model_trained_to_route_domains_apart(one_rank):
    report, _, _ = one_rank
    delta = report["delta_ppl"]
    assert set(delta) == {"layer_0", "layer_1", "all_layers"}
    assert sum(delta[k]["mean"] for k in ("layer_0", "layer_1")) / 2 > 0
    assert delta["all_layers"]["mean"] > 0
    assert report["routing"]["routing/mi/mean"] > 0.1  # the divergence loss separated the domains
    assert report["tokens"] == sum(d["tokens"] for d in report["per_domain"].values())


def test_report_has_the_paper_metrics_with_the_silhouette_sample(one_rank):
    report, _, out = one_rank
    routing = report["routing"]
    for name in ("max_violation_global", "routing_variance", "expert_overlap", "coselection_jaccard", "silhouette",
                 "expert_output_norm"):
        for suffix in ("layer_0", "layer_1", "mean"):
            assert routing[f"routing/{name}/{suffix}"] is not None, (name, suffix)
    assert 0 <= routing["routing/expert_overlap/mean"] <= 1 and -1 <= routing["routing/silhouette/mean"] <= 1
    assert routing["routing/expert_output_norm/mean"] > 0
    assert report["silhouette"]["sample_size"] == 2000 and report["silhouette"]["distance"] == "cosine"
    md = (out / "report.md").read_text()
    assert "MaxVio_global" in md and "Silhouette: 2000 sampled tokens" in md


def test_expert_ablation_and_keep_k_are_in_the_report(one_rank):
    report, _, _ = one_rank
    ablation = report["ablation"]  # on by default with 3 domains
    assert set(ablation["masked"]) == set(report["domain_names"]) and ablation["top_m"] == 2
    for name, entry in ablation["masked"].items():
        freq = report["routing_matrices"]["layer_0"]["frequency"][report["domain_names"].index(name)]
        assert entry["experts"]["layer_0"] == sorted(sorted(range(4), key=lambda e: (-freq[e], e))[:2])
        assert entry["specificity"] == pytest.approx(entry["own"] - entry["others"])
    assert list(ablation["keep_k"]) == ["k=1"] and ablation["keep_k"]["k=1"]["rel"] > 0
    # Trained to route domains apart (I(D;E) > 0.1): masking a domain's experts hurts it more than the rest
    # (measured: specificity 0.023 / 0.096 / 0.073 for code / math / prose).
    assert ablation["specificity_mean"] > 0
    assert report["eval"]["passes"] == 2 + 3 * 2 + 3 + 1  # + the specialisation pass


def test_two_gloo_ranks_give_the_single_process_report(run_dir, one_rank):
    single, _, _ = one_rank
    out = run_dir / "eval" / "two_ranks"
    results = run_on_ranks(_evaluate, world_size=2, args=(str(run_dir), str(out), False), timeout=300)
    for report, _ in results:
        assert report["eval"]["world_size"] == 2
        assert report["tokens"] == single["tokens"]
        assert report["held_out_sha256"] == single["held_out_sha256"] and len(single["held_out_sha256"]) == 64
        assert report["lm_loss"] == pytest.approx(single["lm_loss"], rel=1e-9)
        for name, domain in single["per_domain"].items():
            assert report["per_domain"][name]["ppl"] == pytest.approx(domain["ppl"], rel=1e-9)
        for key, entry in single["delta_ppl"].items():
            assert report["delta_ppl"][key]["per_seed"] == pytest.approx(entry["per_seed"], rel=1e-6, abs=1e-9)
        assert report["routing"].keys() == single["routing"].keys()
        for tag, value in single["routing"].items():
            assert report["routing"][tag] == pytest.approx(value, rel=1e-9, abs=1e-12), tag
        assert report["routing_matrices"] == single["routing_matrices"]
        for name, entry in single["ablation"]["masked"].items():
            assert report["ablation"]["masked"][name]["experts"] == entry["experts"]
            assert report["ablation"]["masked"][name]["own"] == pytest.approx(entry["own"], rel=1e-6, abs=1e-9)
        assert report["ablation"]["keep_k"]["k=1"]["ppl"] == pytest.approx(single["ablation"]["keep_k"]["k=1"]["ppl"],
                                                                           rel=1e-9)


def test_report_files_and_figures_are_written(one_rank):
    report, _, out = one_rank
    md = (out / "report.md").read_text()
    saved = json.loads((out / "report.json").read_text())
    assert saved["lm_loss"] == report["lm_loss"] and saved["config"]["train"]["steps"] == STEPS
    assert saved["checkpoint"].endswith(f"global_step{STEPS}") and saved["step"] == STEPS
    assert saved["eval"]["split_global_batches"] >= saved["eval"]["global_batches"] >= 1  # the split's size
    for figure in ("heatmap_layer_0", "heatmap_layer_1", "heatmap_all_layers", "delta_ppl", "expert_ablation"):
        png = out / "figures" / f"{figure}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/{figure}.png)" in md


def test_cli_with_another_label_scheme_writes_report_and_tensorboard(run_dir, one_rank):
    cmd = [sys.executable, "-m", "ds_moe_div", "eval", "--run-dir", str(run_dir), "--max-batches", "4",
           "--permutation-seeds", "1", "--domain-column", "group", "--tensorboard", "--no-progress",
           "--tasks", "cloze", "--cloze-context-tokens", "5", "--cloze-continuation-tokens", "3", "--ablation", "off"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ds-moe-div eval timed out")
    assert proc.returncode == 0, stdout[-4000:]
    out = run_dir / "eval" / f"global_step{STEPS}-by-group"
    report = json.loads((out / "report.json").read_text())
    assert report["domain_column"] == "group" and len(report["domain_names"]) == 7
    assert "delta-PPL layer_0" in stdout and str(out / "report.md") in stdout
    cloze = report["tasks"]["cloze"]
    assert cloze["items"] == sum(d["items"] for d in cloze["per_domain"].values()) > 0
    assert set(cloze["per_domain"]) | set(cloze["domains_without_items"]) == set(report["domain_names"])
    assert "cloze: acc" in stdout and "## Downstream tasks" in (out / "report.md").read_text()
    assert report["ablation"] == {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"routing/heatmap/layer_0", "routing/heatmap/all_layers", "eval/test_delta_ppl"} <= set(tags["images"])
    assert {"eval/test_lm_loss", "eval/test_ppl/code", "routing/mi/layer_1", "eval/test_tasks/cloze/acc"} <= \
        set(tags["scalars"])
    assert events.Scalars("eval/test_lm_loss")[0].step == STEPS


def test_compare_command_tables_two_reports(run_dir, one_rank, capsys):
    from ds_moe_div.evaluation.compare import main

    _, _, out = one_rank
    assert main([str(out), str(run_dir / "eval" / "one_rank" / "report.json"), "--names", "a", "b",
                 "--out", str(run_dir / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "| held-out LM loss (nats) |" in printed and "(+0)" in printed
    assert "| ablation specificity, mean over domains |" in printed and "| keep-k k=1: rel. PPL change |" in printed
    assert (run_dir / "cmp" / "comparison.csv").read_text().startswith("metric,a,b,b - a")


# The negative control on a subset: shuffled labels (seed 0) of math and prose only; mixed packing keeps the
# very sequences of the unshuffled run, so its per-domain counts can be compared exactly.
SHUFFLED = ['data.include_labels=["math","prose"]', "data.shuffle_labels_seed=0", "data.packing=mixed"]
SHUFFLED_EVAL = ["--max-batches", "4", "--permutation-seeds", "0", "--micro-batch-size", "16", "--no-progress"]


def _train_and_evaluate_shuffled(rank, world_size, run_dir):
    from ds_moe_div.evaluation.runner import evaluate, parse_args

    train_smoke(run_dir, steps=2, overrides=SHUFFLED)
    runs = {"true": ["--out", f"{run_dir}/eval/true"], "as_trained": ["--as-trained-labels"],
            "group": ["--domain-column", "group", "--out", f"{run_dir}/eval/group"]}
    return {name: evaluate(parse_args(["--run-dir", run_dir, *extra, *SHUFFLED_EVAL])) for name, extra in runs.items()}


def _unshuffled_counts() -> dict[str, int]:
    """Per-domain target counts of the first 4 batches of the same run without the shuffle."""
    import dataclasses

    from ds_moe_div.config import load_experiment
    from ds_moe_div.data import IGNORE_INDEX, BatchLoader, prepare_data

    cfg = load_experiment(SMOKE, SHUFFLED).data
    data = prepare_data(dataclasses.replace(cfg, shuffle_labels_seed=None), show_progress=False)
    counts = dict.fromkeys(data.domain_names, 0)
    loader = BatchLoader(data.splits["test"], micro_batch_size=16, shuffle=False, loop=False)
    for batch in islice(loader, 4):
        labelled = batch["domain_ids"][batch["labels"] != IGNORE_INDEX]
        for d, name in enumerate(data.domain_names):
            counts[name] += int((labelled == d).sum())
    return counts


@pytest.fixture(scope="module")
def shuffled_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_shuffled") / "run"
    reports = run_on_ranks(_train_and_evaluate_shuffled, world_size=1, args=(str(path),), timeout=300)[0]
    return path, reports


def test_a_shuffled_label_run_is_evaluated_on_the_true_labels(shuffled_run):
    path, reports = shuffled_run
    true, as_trained = reports["true"], reports["as_trained"]
    counts = {name: d["tokens"] for name, d in true["per_domain"].items()}
    assert counts == _unshuffled_counts() and set(counts) == {"math", "prose"}
    assert {name: d["tokens"] for name, d in as_trained["per_domain"].items()} != counts
    assert true["labels"] == "true (run trained with shuffled labels, seed 0)"
    assert as_trained["labels"] == "as trained: shuffled (seed 0)"
    assert true["tokens"] == as_trained["tokens"] and true["lm_loss"] == pytest.approx(as_trained["lm_loss"], rel=1e-12)
    assert true["held_out_sha256"] == as_trained["held_out_sha256"]  # labels differ, tokens do not
    assert "- labels: true (run trained with shuffled labels, seed 0)" in (path / "eval" / "true" / "report.md").read_text()
    saved = json.loads((path / "eval" / "global_step2-as-trained" / "report.json").read_text())
    assert saved["labels"] == as_trained["labels"] and saved["domain_column"] == "domain"


def test_another_label_column_on_an_include_labels_run(shuffled_run):
    path, reports = shuffled_run
    group = reports["group"]
    assert group["domain_column"] == "group" and "code" not in group["domain_names"]
    assert len(group["domain_names"]) == 6 and group["tokens"] == reports["true"]["tokens"]
    assert sum(d["tokens"] for d in group["per_domain"].values()) == group["tokens"]
    assert group["labels"] == "true (run trained with shuffled labels, seed 0)"
    assert json.loads((path / "eval" / "group" / "report.json").read_text())["domain_names"] == group["domain_names"]
