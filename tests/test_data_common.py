"""Shared helpers for tests/test_data_*.py (no tests here): small corpora and configs.

The committed fixture ds_moe_div/assets/mini_corpus.jsonl.gz is used when present; otherwise a
synthetic corpus with the same keys (three domains with disjoint vocabularies) stands in.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from ds_moe_div.data import DataConfig, TokenizerConfig
from ds_moe_div.data.readers import FIXTURE

WORDS = {
    "code": ["def", "return", "import", "class", "self", "for", "while", "print", "lambda", "yield", "struct", "impl", "fn"],
    "math": ["theorem", "lemma", "proof", "integral", "sum", "prime", "group", "ring", "field", "limit", "epsilon"],
    "prose": ["the", "whale", "captain", "ship", "sea", "love", "king", "queen", "night", "day", "river"],
}
SUBDOMAINS = {"code": ["python", "go", "rust"], "math": ["metamath", "gap"], "prose": ["moby", "sotu", "kjv"]}


def synthetic_records(n_docs: int = 300, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n_docs):
        domain = list(WORDS)[i % 3]
        sub = rng.choice(SUBDOMAINS[domain])
        text = " ".join(rng.choice(WORDS[domain]) for _ in range(rng.randint(5, 120))) + f" {domain}{i}"
        records.append({"text": text, "domain": domain, "group": domain, "subdomain": sub,
                        "source": f"{sub}/{i}", "license": "CC0", "meta": {"label": domain}})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def read_records(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def corpus_path(tmp_dir: Path) -> Path:
    """The fixture when it exists, else a synthetic corpus written into tmp_dir."""
    if FIXTURE.is_file():
        return FIXTURE
    path = tmp_dir / "synthetic.jsonl.gz"
    if not path.exists():
        write_jsonl(path, synthetic_records())
    return path


def small_cfg(tmp_dir: Path, **overrides) -> DataConfig:
    """A fast config over corpus_path(tmp_dir) with its own cache folder."""
    path = corpus_path(tmp_dir)
    settings = {"corpus": "fixture" if path == FIXTURE else str(path), "cache_dir": str(tmp_dir / "cache"),
                "seq_len": 64, "val_fraction": 0.1, "test_fraction": 0.1,
                "tokenizer": TokenizerConfig(vocab_size=512)}
    settings.update(overrides)
    return DataConfig(**settings)
