"""The built-in per-domain cloze task: which continuation is the document's own? (offline, seeded)

    items = cloze_items(data.splits["test"], tokenizer, data.domain_names, eos_id=data.eos_id, seed=0)
    result = score_cloze(scorer, items)        # {"acc", "acc_stderr", "acc_norm", ..., "per_domain": {...}}
    write_lm_eval_tasks(items, out_dir)        # the same items as local lm-eval tasks (lm_eval_bridge)

Items come from the packed TEST split (no text is in two splits): a document starts after an <|eos|>
inside a packed row; context = its first `context_tokens` tokens, the true continuation = its next
`continuation_tokens` tokens; the distractors are the same token span (same offset) of `distractors`
other documents of the same domain, so every choice is document text at the same position and differs
in content only. Choices are decoded to text (the task is defined on strings, as lm-eval's are) and put
in a seeded random order. Documents whose first context+continuation tokens do not fit inside one packed
row are not used; a domain with fewer than distractors+1 usable documents gets no items (reported).

Scoring is lm-eval's multiple-choice semantics: log-likelihood of each choice given the context, summed
over its tokens; acc = the true choice has the highest score; acc_norm = the highest score divided by
the choice's length in characters (lm-eval's `acc_norm`); ties go to the first choice (np.argmax).
Standard errors are lm-eval's: sample std (n - 1) / sqrt(n).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ds_moe_div import fileio

TASK_PREFIX = "ds_moe_div_cloze"
ROW_CHUNK = 4096


@dataclass(frozen=True)
class ClozeItem:
    domain: str
    context: str
    choices: tuple[str, ...]
    label: int  # index of the true continuation in choices
    source: str  # "row<r>:<position>" of the document start in the packed test split


def document_starts(tokens_NS1: np.ndarray, domains_NS1: np.ndarray, *, eos_id: int, span: int) -> list[tuple[int, int, int]]:
    """(row, start, domain) of every document that starts inside a row (right after an <|eos|>) and whose
    first `span` tokens lie in the row without another <|eos|> or padding."""
    out = []
    width = tokens_NS1.shape[1]
    for first in range(0, len(tokens_NS1), ROW_CHUNK):
        tokens = np.asarray(tokens_NS1[first:first + ROW_CHUNK])
        domains = np.asarray(domains_NS1[first:first + ROW_CHUNK])
        for row, pos in zip(*np.nonzero(tokens[:, :width - span] == eos_id)):
            start = pos + 1
            window = tokens[row, start:start + span]
            dom = domains[row, start:start + span]
            if (window != eos_id).all() and (dom >= 0).all() and (dom == dom[0]).all():
                out.append((first + int(row), int(start), int(dom[0])))
    return out


def cloze_items(split, tokenizer, domain_names: Sequence[str], *, eos_id: int, context_tokens: int = 24,
                continuation_tokens: int = 8, distractors: int = 3, per_domain: int = 50,
                seed: int = 0) -> list[ClozeItem]:
    """Up to `per_domain` items per domain, reproducible from (split, seed). See the module docstring."""
    if context_tokens < 1 or continuation_tokens < 1 or distractors < 1 or per_domain < 1:
        raise ValueError("context_tokens, continuation_tokens, distractors and per_domain must be >= 1")
    span = context_tokens + continuation_tokens
    if span >= split.tokens_NS1.shape[1]:
        raise ValueError(f"context_tokens + continuation_tokens = {span} must be shorter than a packed row "
                         f"({split.tokens_NS1.shape[1]} tokens): lower them")
    starts = document_starts(split.tokens_NS1, split.domains_NS1, eos_id=eos_id, span=span)

    def text(row: int, begin: int, end: int) -> str:
        return tokenizer.decode([int(t) for t in split.tokens_NS1[row, begin:end]], skip_special_tokens=False)

    items = []
    for d, name in enumerate(domain_names):
        docs = [(row, start) for row, start, dom in starts if dom == d]
        if len(docs) < distractors + 1:
            continue
        rng = np.random.default_rng([seed, d])
        for i in rng.permutation(len(docs))[:per_domain].tolist():
            row, start = docs[i]
            truth = text(row, start + context_tokens, start + span)
            others = []
            for j in rng.permutation(len(docs)).tolist():
                if j == i:
                    continue
                candidate = text(docs[j][0], docs[j][1] + context_tokens, docs[j][1] + span)
                if candidate != truth and candidate not in others:
                    others.append(candidate)
                if len(others) == distractors:
                    break
            if len(others) < distractors:
                continue
            label = int(rng.integers(distractors + 1))
            choices = others[:label] + [truth] + others[label:]
            items.append(ClozeItem(name, text(row, start, start + context_tokens), tuple(choices), label,
                                   f"row{row}:{start}"))
    return items


def _mean_stderr(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, std / math.sqrt(len(values))


def accuracy(items: Sequence[ClozeItem], loglikelihoods: Sequence[Sequence[float]]) -> dict:
    """{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "items"} overall and under "per_domain"."""
    hits: dict[str, list[tuple[float, float]]] = {}
    for item, lls in zip(items, loglikelihoods, strict=True):
        lls = np.asarray(lls, dtype=np.float64)
        lengths = np.array([float(len(c)) for c in item.choices])
        hits.setdefault(item.domain, []).append((float(np.argmax(lls) == item.label),
                                                 float(np.argmax(lls / lengths) == item.label)))

    def summary(pairs) -> dict:
        acc, acc_se = _mean_stderr([a for a, _ in pairs])
        norm, norm_se = _mean_stderr([n for _, n in pairs])
        return {"acc": acc, "acc_stderr": acc_se, "acc_norm": norm, "acc_norm_stderr": norm_se, "items": len(pairs)}

    everything = [p for pairs in hits.values() for p in pairs]
    return {**summary(everything), "per_domain": {name: summary(pairs) for name, pairs in hits.items()}}


def score_cloze(scorer, items: Sequence[ClozeItem]) -> dict:
    """Our own harness: every (context, choice) pair through scorer.loglikelihood, then `accuracy`."""
    requests = [(item.context, choice) for item in items for choice in item.choices]
    scores = iter(ll for ll, _ in scorer.loglikelihood(requests))
    return accuracy(items, [[next(scores) for _ in item.choices] for item in items])


def task_name(domain: str) -> str:
    return f"{TASK_PREFIX}_{''.join(c if c.isalnum() else '_' for c in domain)}"


def write_lm_eval_tasks(items: Sequence[ClozeItem], out_dir: Path) -> dict[str, str]:
    """One lm-eval task per domain (<task>.yaml + <task>.jsonl in out_dir, the YAML pointing at the data
    by absolute path); load them with TaskManager(include_path=out_dir). Returns {domain: task name}."""
    out_dir = Path(out_dir).resolve()
    by_domain: dict[str, list[ClozeItem]] = {}
    for item in items:
        by_domain.setdefault(item.domain, []).append(item)
    names = {}
    for domain, domain_items in by_domain.items():
        name = names[domain] = task_name(domain)
        data = out_dir / f"{name}.jsonl"
        fileio.write_text(data, "".join(json.dumps({**asdict(i), "choices": list(i.choices)}) + "\n"
                                        for i in domain_items))
        fileio.write_text(out_dir / f"{name}.yaml", "\n".join([
            f"task: {name}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data))}",
            "test_split: test",
            "output_type: multiple_choice",
            "doc_to_text: context",
            "doc_to_choice: choices",
            "doc_to_target: label",
            'target_delimiter: ""',
            "metric_list:",
            "  - {metric: acc, aggregation: mean, higher_is_better: true}",
            "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
            "metadata: {version: 1.0}",
            "",
        ]))
    return names
