"""manifest.json (what was fetched) and stats.json (what was built) for a corpus build."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ds_moe_div.corpus.build import PackageCache, SubdomainResult


def manifest(
    cache: PackageCache, results: list[SubdomainResult], settings: dict
) -> dict:
    packages = sorted(
        (asdict(r) for r in cache.records.values()),
        key=lambda r: (r["registry"], r["name"]),
    )
    return {
        "settings": settings,
        "packages": packages,
        "subdomains": {
            r.source.subdomain: sorted(
                {
                    f"{reg}:{name}"
                    for part in r.source.parts_for(settings["tier"])
                    for reg, name in part.packages
                }
            )
            for r in results
        },
        "downloaded_this_run": sorted(cache.downloaded),
        "apt": cache.apt.summary(),
        "warnings": warnings(results, cache),
    }


def warnings(results: list[SubdomainResult], cache: PackageCache) -> list[str]:
    """Everything that makes this build differ from a complete one on a current mirror."""
    lines = [f"missing subdomain {r.source.subdomain}: {r.missing}" for r in results if r.missing]
    lines += [f"debian:{r.name} {r.version}: {r.note}" for r in cache.records.values() if r.note]
    return sorted(lines)


def stats(
    results: list[SubdomainResult], settings: dict, seconds: float, corpus_sha256: str,
    warning_lines: list[str] | None = None,
) -> dict:
    rows = {}
    totals: dict[str, dict[str, dict[str, int]]] = {"domain": {}, "group": {}}
    for r in results:
        s = r.source
        rows[s.subdomain] = {
            "domain": s.domain,
            "group": s.group,
            "license": s.license,
            "documents": len(r.documents),
            "bytes": r.bytes,
            "mb": round(r.bytes / 1e6, 3),
            "items_read": r.items_read,
            "exact_duplicates": r.exact_duplicates,
            "near_duplicates": r.near_duplicates,
            "missing": r.missing,
            "seconds": round(r.seconds, 1),
        }
        for level, key in (("domain", s.domain), ("group", s.group)):
            entry = totals[level].setdefault(key, {"documents": 0, "bytes": 0})
            entry["documents"] += len(r.documents)
            entry["bytes"] += r.bytes
    return {
        "settings": settings,
        "documents": sum(len(r.documents) for r in results),
        "bytes": sum(r.bytes for r in results),
        "build_seconds": round(seconds, 1),
        "corpus_sha256": corpus_sha256,
        "missing": {r.source.subdomain: r.missing for r in results if r.missing},
        "warnings": warning_lines or [],
        "labels": {
            level: sorted({getattr(r.source, level) for r in results if r.documents})
            for level in ("domain", "group", "subdomain")
        },
        "totals": totals,
        "subdomains": rows,
    }
