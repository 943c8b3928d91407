"""Evaluation building blocks, in one process: held-out sums, router permutations, relabelling, compare.

The end-to-end checks on a trained checkpoint (1 vs 2 ranks, the CLI, the figures) are in
tests/test_evaluation_e2e.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ds_moe_div.evaluation.compare import compare, differences
from ds_moe_div.evaluation.heldout import nll_sums, summarize
from ds_moe_div.evaluation.permutation import (
    derangement,
    draw_permutations,
    permuted_routers,
    summarize_deltas,
)
from ds_moe_div.evaluation.report import plain, render_markdown


def test_nll_sums_split_targets_by_domain_and_skip_ignored_labels():
    nll = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    labels = torch.tensor([[7, 7, -100], [7, 7, 7]])
    domains = torch.tensor([[0, 1, 1], [1, -1, 0]])
    sums = nll_sums(nll, labels, domains, num_domains=2)
    # overall: 1+2+4+5+6 over 5; domain 0: 1+6 over 2; domain 1: 2+4 over 2 (unlabelled 5 counts overall only)
    assert sums.tolist() == [18.0, 5.0, 7.0, 2.0, 6.0, 2.0]
    summary = summarize(sums, ("a", "b"))
    assert summary.lm_loss == pytest.approx(3.6) and summary.ppl == pytest.approx(math.exp(3.6))
    assert summary.per_domain["a"].tokens == 2 and summary.per_domain["b"].lm_loss == pytest.approx(3.0)
    empty = summarize(torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64), ("a",))
    assert empty.lm_loss is None and empty.per_domain["a"].ppl is None


def test_derangements_move_every_row_and_are_reproducible():
    for num_experts in (2, 3, 8):
        perm = derangement(num_experts, torch.Generator().manual_seed(0))
        assert sorted(perm.tolist()) == list(range(num_experts))
        assert not (perm == torch.arange(num_experts)).any()
    a, b = draw_permutations(3, 8, [0, 1]), draw_permutations(3, 8, [0, 1])
    assert all(torch.equal(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb))
    assert not torch.equal(a[0][0], a[1][0])


def _fake_layers(num_layers: int, num_experts: int = 4):
    """Objects shaped like RoutedMoE where the permutation looks: `router_tensors()` (weight [E, M], bias [E])."""
    layers = []
    for _ in range(num_layers):
        gate, bias = torch.nn.Linear(5, num_experts, bias=False), torch.randn(num_experts)
        layers.append(SimpleNamespace(gate=SimpleNamespace(wg=gate), bias=bias,
                                      router_tensors=lambda gate=gate, bias=bias: [gate.weight, bias]))
    return layers


def test_permuted_routers_permute_rows_then_restore_bit_identically():
    layers = _fake_layers(2)
    before = [layer.gate.wg.weight.detach().clone() for layer in layers]
    perm = torch.tensor([1, 2, 3, 0])
    biases = [layer.bias.clone() for layer in layers]
    with permuted_routers(layers, [perm, None]):
        assert torch.equal(layers[0].gate.wg.weight, before[0][perm]) and torch.equal(layers[0].bias, biases[0][perm])
        assert torch.equal(layers[1].gate.wg.weight, before[1]) and torch.equal(layers[1].bias, biases[1])
    assert all(torch.equal(layer.gate.wg.weight, b) for layer, b in zip(layers, before))
    with pytest.raises(RuntimeError), permuted_routers(layers, [perm, perm]):
        raise RuntimeError("a failing pass")
    assert all(torch.equal(layer.gate.wg.weight, b) for layer, b in zip(layers, before))
    assert all(torch.equal(layer.bias, b) for layer, b in zip(layers, biases))


def test_summarize_deltas_mean_and_sample_std():
    base = summarize(torch.tensor([2.0, 2.0, 2.0, 2.0], dtype=torch.float64), ("a",))
    same = summarize_deltas(base, [base, base])
    assert same["mean"] == 0.0 and same["std"] == 0.0 and same["per_domain"]["a"]["mean"] == 0.0
    worse = [summarize(torch.tensor([2.0 + d, 2.0, 2.0 + d, 2.0], dtype=torch.float64), ("a",)) for d in (0.2, 0.4)]
    deltas = summarize_deltas(base, worse)
    expected = [math.exp(1.0 + d / 2) - math.e for d in (0.2, 0.4)]
    assert deltas["per_seed"] == pytest.approx(expected)
    assert deltas["std"] == pytest.approx(abs(expected[1] - expected[0]) / math.sqrt(2))


def test_relabelled_split_keeps_the_sequences_and_refines_the_labels():
    from ds_moe_div.data import DataConfig, TokenizerConfig, prepare_data
    from ds_moe_div.evaluation.relabel import relabelled_split

    cfg = DataConfig(corpus="fixture", seq_len=32, tokenizer=TokenizerConfig(vocab_size=512))
    data = prepare_data(cfg, show_progress=False)
    split, names = relabelled_split(cfg, data, "test", column="group")
    ref = data.splits["test"]
    assert np.array_equal(split.tokens_NS1, ref.tokens_NS1)
    assert np.array_equal(split.domains_NS1 < 0, ref.domains_NS1 < 0)
    assert len(names) == 7 and split.num_domains == 7
    pairs = set(zip(ref.domains_NS1[ref.domains_NS1 >= 0].tolist(), split.domains_NS1[ref.domains_NS1 >= 0].tolist()))
    parents = {}
    for old, new in pairs:  # group refines domain: each group lies in exactly one domain
        assert parents.setdefault(new, old) == old
    assert {names[g] for g, d in parents.items() if data.domain_names[d] == "code"} == {"code"}



def _fixture_cfg(**options):
    from ds_moe_div.data import DataConfig, TokenizerConfig

    return DataConfig(corpus="fixture", seq_len=32, tokenizer=TokenizerConfig(vocab_size=512), **options)


def _target_counts(split, num_domains: int) -> np.ndarray:
    """Labelled targets per domain, by the domain of the input token (the evaluation's convention)."""
    domains = np.asarray(split.domains_NS1)
    inputs = domains[:, :-1][domains[:, 1:] >= 0]
    return np.bincount(inputs[inputs >= 0], minlength=num_domains)


def test_relabelled_split_of_an_include_labels_run_keeps_its_documents():
    from ds_moe_div.data import prepare_data
    from ds_moe_div.evaluation.relabel import relabelled_split

    cfg = _fixture_cfg(include_labels=("math", "prose"))
    data = prepare_data(cfg, show_progress=False)
    split, names = relabelled_split(cfg, data, "test", column="group")  # re-pack checked token for token
    ref = data.splits["test"]
    assert np.array_equal(split.tokens_NS1, ref.tokens_NS1)
    assert np.array_equal(split.domains_NS1 < 0, ref.domains_NS1 < 0)
    assert "code" not in names and len(names) == 6 and split.num_domains == 6  # the groups of math and prose
    assert set(np.unique(split.domains_NS1[split.domains_NS1 >= 0]).tolist()) <= set(range(6))
    own, own_names = relabelled_split(cfg, data, "test", column="domain")  # no shuffle: the prepared labels
    assert own_names == data.domain_names == ("math", "prose")
    assert np.array_equal(own.domains_NS1, ref.domains_NS1)


def test_relabelled_split_of_a_shuffled_run_has_the_true_labels():
    from ds_moe_div.data import prepare_data
    from ds_moe_div.evaluation.relabel import relabelled_split

    for packing in ("mixed", "by_domain"):  # by_domain: the shuffled labels decided the packing streams
        cfg = _fixture_cfg(packing=packing, shuffle_labels_seed=0)
        shuffled, true = prepare_data(cfg, show_progress=False), prepare_data(replace(cfg, shuffle_labels_seed=None),
                                                                                show_progress=False)
        split, names = relabelled_split(cfg, shuffled, "test", column="domain")
        assert names == true.domain_names
        assert np.array_equal(split.tokens_NS1, shuffled.splits["test"].tokens_NS1)
        counts = _target_counts(split, 3)
        as_trained, reference = _target_counts(shuffled.splits["test"], 3), _target_counts(true.splits["test"], 3)
        assert np.abs(as_trained - reference).max() > 50  # the shuffle moved whole documents
        if packing == "mixed":  # the same stream: the very same arrays as the unshuffled run's
            assert np.array_equal(split.domains_NS1, true.splits["test"].domains_NS1)
        else:  # other streams: each domain's count moves by at most one token per stream (3 streams)
            assert counts.sum() == reference.sum() and np.abs(counts - reference).max() <= 3
        group, _ = relabelled_split(cfg, shuffled, "test", column="group")
        assert np.array_equal(group.tokens_NS1, split.tokens_NS1)


def test_labels_note_and_the_as_trained_option():
    from ds_moe_div.evaluation.runner import _held_out, labels_used, parse_args

    shuffled = _fixture_cfg(shuffle_labels_seed=5)
    assert labels_used(_fixture_cfg(), "domain", False) == "true"
    assert labels_used(shuffled, "domain", False) == "true (run trained with shuffled labels, seed 5)"
    assert labels_used(shuffled, "domain", True) == "as trained: shuffled (seed 5)"
    assert parse_args(["--run-dir", "r", "--as-trained-labels"]).as_trained_labels
    assert not parse_args(["--run-dir", "r"]).as_trained_labels
    loaded = SimpleNamespace(cfg=SimpleNamespace(data=shuffled))
    with pytest.raises(ValueError, match="--as-trained-labels"):
        _held_out(loaded, "test", "group", True)

def _report(coef: float, ppl: float, step: int = 10) -> dict:
    domain = {"lm_loss": math.log(ppl), "ppl": ppl, "tokens": 100}
    delta = {"mean": 2.0 * coef, "std": 0.5, "per_seed": [1.0, 2.0], "per_domain": {"code": {"mean": 1.0, "std": 0.1}}}
    return {"checkpoint": "ck", "run_dir": "run", "tag": f"global_step{step}", "step": step, "split": "test",
            "domain_column": "domain", "domain_names": ["code"], "tokens": 100, "lm_loss": math.log(ppl), "ppl": ppl,
            "per_domain": {"code": domain}, "delta_ppl": {"layer_0": delta, "all_layers": delta},
            "permutations": {"kind": "derangement", "seeds": [0, 1], "layer_0": [[1, 0], [1, 0]]},
            "routing": {"routing/mi/layer_0": coef, "routing/mi/mean": coef, "routing/entropy/code/mean": 0.5,
                        "routing/tokens": 100.0, "routing/padding_fraction": 0.0},
            "routing_matrices": {"layer_0": {"frequency": [[0.5, float("nan")]]}}, "figures": [],
            "eval": {"max_batches": 4, "micro_batch_size": 8, "world_size": 1, "ep_size": 1, "dtype": "fp32",
                     "eval_capacity_factor": 2.0, "passes": 7, "seconds": 1.0},
            "config": {"objectives": {"divergence": {"coef": coef}}, "train": {"run_dir": "x"},
                       "data": {"domain_column": "domain"}}}


def test_compare_finds_the_latest_report_and_tables_the_differences(tmp_path, capsys):
    for name, coef, ppl in (("base", 0.0, 20.0), ("ed", 0.01, 18.0)):
        for step in (5, 10):
            out = tmp_path / name / "eval" / f"global_step{step}"
            out.mkdir(parents=True)
            (out / "report.json").write_text(json.dumps(plain(_report(coef, ppl + (step == 5), step))))
    text, out = compare([tmp_path / "base", tmp_path / "ed"], names=["baseline", "ED"])
    assert out == tmp_path / "comparison"
    assert "objectives.divergence.coef" in text and "train.run_dir" not in text
    assert "| PPL | 20.0000 | 18.0000 (-2) |" in text
    assert "| delta-PPL layer 0 | 0.000 ± 0.500 | 0.020 ± 0.500 (+0.02) |" in text
    rows = {line.split(",")[0]: line.split(",")[1:] for line in (out / "comparison.csv").read_text().splitlines()}
    assert [float(v) for v in rows["ppl"]] == [20.0, 18.0, -2.0]
    assert rows["delta_ppl/layer_0/std"] == ["0.5", "0.5", "0.0"]
    assert differences([_report(0.0, 1.0), _report(0.0, 1.0)]) == []


def test_markdown_report_renders_every_section_and_escapes_table_pipes():
    report = _report(0.01, 18.0)
    report["figures"] = ["figures/heatmap_layer_0.png", "figures/heatmap_all_layers.png", "figures/delta_ppl.png"]
    text = render_markdown(plain(report))
    for needle in ("## Held-out loss", "## Router-permutation delta-PPL", "H(E \\| code)",
                   "![all layers](figures/heatmap_all_layers.png)", "![delta-PPL](figures/delta_ppl.png)",
                   "| layer 0 | 0.020 ± 0.500 | 1.000 ± 0.100 |", "divergence 0.01"):
        assert needle in text, needle
    assert plain(report)["routing_matrices"]["layer_0"]["frequency"] == [[0.5, None]]
    assert "- labels:" not in text  # true labels: no line
    shuffled = render_markdown(plain(dict(report, labels="true (run trained with shuffled labels, seed 5)")))
    lines = shuffled.splitlines()
    held_out = next(i for i, line in enumerate(lines) if line.startswith("- held-out split"))
    assert lines[held_out + 1] == "- labels: true (run trained with shuffled labels, seed 5)"
